"""benchmarks/kernels/compare_grids.py on grids whose ratios are known: the arithmetic, the
issue's target counts, the table, and clear refusals of files it cannot compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "compare_grids.py"
OP = "paged_attention_decode"


def row(
    layout: tuple[int, int], batch: int, context: int, ratio: float, of_copy: float, splits: int = 1
) -> dict:
    shape = {"n_q": layout[0], "n_kv": layout[1], "head_size": 128, "page": 16, "context": context}
    label = f"{OP}[" + ",".join(f"{k}={v}" for k, v in shape.items()) + f"] tokens={batch} bfloat16"
    return {
        "label": label,
        "shape": shape,
        "tokens": batch,
        "tuned_config": {"BLOCK_N": 64, "SPLITS": splits},
        "tuning": {"configs_benchmarked": 0, "fallback": False},
        "timings": {"tunebook": {"median_us": 10.0, "of_copy": of_copy}, "sdpa": {"median_us": 10.0 * ratio}},
        "ratios": {"sdpa/tunebook": ratio, "hand-picked/tunebook": 2.0},
    }


def grid(path: Path, rows: list[dict], op: str = OP) -> Path:
    path.write_text(json.dumps({"meta": {"op": op}, "results": rows}))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_geomean_the_targets_and_the_table_are_the_grids(tmp_path: Path) -> None:
    old = grid(
        tmp_path / "old.json",
        [
            row((8, 1), 1, 8192, 0.50, 0.10, 32),
            row((8, 1), 16, 8192, 0.90, 0.60, 8),
            row((32, 8), 64, 512, 1.00, 0.90),
            row((32, 8), 256, 32768, 1.05, 1.02),  # only in old: not compared
        ],
    )
    new = grid(
        tmp_path / "new.json",
        [
            row((8, 1), 1, 8192, 0.80, 0.20, 64),
            row((8, 1), 16, 8192, 1.08, 0.75, 8),
            row((32, 8), 64, 512, 0.90, 0.85),
        ],
    )
    done = run("--new", new, "--old", old, "--table")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    expected = math.exp((math.log(0.8 / 0.5) + math.log(1.08 / 0.9) + math.log(0.9 / 1.0)) / 3)
    assert out.startswith(
        f"{OP}: 3 cells; geomean new/old of sdpa/tunebook {expected:.3f}; range 0.900-1.600"
    )
    targets = "batch >= 8 at sdpa or better {} of {}; contexts >= 8192 under 0.70 of copy {} of {}"
    assert "new: at sdpa or better 1 of 3; " + targets.format(1, 2, 1, 2) in out
    assert "old: at sdpa or better 2 of 4; " + targets.format(2, 3, 2, 3) in out
    assert "benchmarked 0, fallbacks 0 over 1 run(s)" in out
    assert "| heads q/kv | batch | 512 | 8,192 |" in out
    assert "| 8/1 | 1 | — | 0.80 (0.50) |" in out and "| 32/8 | 64 | 0.90 (1.00) | — |" in out
    moved = out.split("moved most")[1].splitlines()
    assert moved[1].startswith("0.900  0.900 1.000") and moved[3].startswith("1.600  0.800 0.500")
    assert "SPLITS=64" in moved[3]


def test_runs_of_a_side_are_averaged_and_their_spread_is_the_noise(tmp_path: Path) -> None:
    old1 = grid(tmp_path / "o1.json", [row((8, 1), 1, 512, 1.0, 0.1), row((8, 1), 4, 512, 1.0, 0.2)])
    old2 = grid(tmp_path / "o2.json", [row((8, 1), 1, 512, 1.21, 0.1), row((8, 1), 4, 512, 1.0, 0.2)])
    new = grid(tmp_path / "n.json", [row((8, 1), 1, 512, 1.1, 0.1), row((8, 1), 4, 512, 1.0, 0.2)])
    done = run("--new", new, "--old", old1, old2)
    assert done.returncode == 0, done.stderr
    # old's first cell is sqrt(1.0 * 1.21) = 1.1: no change there
    assert "geomean new/old of sdpa/tunebook 1.000; range 1.000-1.000" in done.stdout
    assert f"old: second run over first {math.sqrt(1.21):.3f} (1.000-1.210 a cell): the noise" in done.stdout
    assert "new: second run" not in done.stdout


def test_files_it_cannot_compare_are_refused_with_the_reason(tmp_path: Path) -> None:
    decode = grid(tmp_path / "d.json", [row((8, 1), 1, 512, 1.0, 0.1)])
    varlen = grid(tmp_path / "v.json", [row((8, 1), 1, 512, 1.0, 0.1)], op="varlen_attention")
    other = grid(tmp_path / "o.json", [row((32, 8), 1, 512, 1.0, 0.1)])
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"meta": ')
    for args, reason in [
        (("--new", decode, "--old", varlen), "--new is paged_attention_decode and --old is varlen_attention"),
        (("--new", decode, varlen, "--old", decode), "the files are of different ops"),
        (("--new", decode, "--old", other), "no cell in common"),
        (("--new", damaged, "--old", decode), "damaged.json: not a benchmark's results file"),
    ]:
        done = run(*args)
        assert done.returncode != 0 and reason in done.stderr, (args, done.stderr)


def test_long_contexts_are_also_counted_against_a_copy_of_their_own_bytes(tmp_path: Path) -> None:
    """Where a grid timed a copy of each cell's bytes (GPU runs), the long-context target is
    also counted against it; grids without it print the device-copy count alone."""
    rows = [row((8, 1), 1, 8192, 1.2, 0.16), row((8, 1), 16, 8192, 1.0, 0.68), row((32, 8), 1, 512, 1.5, 0.2)]
    for r, same in zip(rows, (0.55, 0.93, 0.40)):
        r["ratios"]["copy/tunebook"] = same
    timed = grid(tmp_path / "timed.json", rows)
    plain = grid(tmp_path / "plain.json", [row((8, 1), 1, 8192, 1.2, 0.16)])
    done = run("--new", timed, "--old", plain)
    assert done.returncode == 0, done.stderr
    new_line = next(line for line in done.stdout.splitlines() if line.startswith("new: "))
    old_line = next(line for line in done.stdout.splitlines() if line.startswith("old: "))
    assert "under 0.70 of copy 2 of 2; of a copy of the same bytes 1 of 2; benchmarked" in new_line
    assert "same bytes" not in old_line


PICTURE = SCRIPT.with_name("grid_picture.py")


def test_the_grid_picture_is_drawn_from_the_runs_and_counts_the_targets(tmp_path: Path) -> None:
    """grid_picture.py: runs combined per cell by the geometric mean, both targets counted,
    a PNG written; a file of another op is refused with the reason."""
    first = grid(
        tmp_path / "a.json",
        [row((8, 1), 1, 8192, 1.2, 0.50), row((8, 1), 16, 8192, 0.9, 0.80), row((32, 8), 16, 512, 1.1, 0.3)],
    )
    second = grid(tmp_path / "b.json", [row((8, 1), 16, 8192, 1.21, 0.80)])  # that cell: sqrt(0.9 * 1.21) > 1
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, str(PICTURE), "--runs", first, second, "--out", out], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (
        "3 cells; batch >= 8 at SDPA or better 2 of 2; contexts >= 8192 at 0.70 of copy or more 1 of 2"
        in done.stdout
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    varlen = grid(tmp_path / "v.json", [row((8, 1), 1, 512, 1.0, 0.1)], op="varlen_attention")
    refused = subprocess.run(
        [sys.executable, str(PICTURE), "--runs", varlen, "--out", out], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "not a paged_attention_decode grid" in refused.stderr


def test_the_linear_picture_is_drawn_from_the_runs_and_counts_the_target(tmp_path: Path) -> None:
    """linear_picture.py: a cell in two runs is their geometric mean; the target counted over
    M >= 1,024; a file that is not linear.py's is refused."""

    def linear_run(path: Path, rows: list[tuple[str, int, float]]) -> Path:
        body = [{"model": "m", "layer": layer, "M": m, "vs_cublas": ratio} for layer, m, ratio in rows]
        path.write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11", "rows": body}))
        return path

    first = linear_run(tmp_path / "a.json", [("qkv", 1024, 0.81), ("o", 1024, 0.95), ("qkv", 16, 0.5)])
    second = linear_run(tmp_path / "b.json", [("qkv", 1024, 1.21)])  # qkv 1024: sqrt(0.81 * 1.21) = 0.99
    out = tmp_path / "linear.png"
    script = SCRIPT.with_name("linear_picture.py")
    done = subprocess.run(
        [sys.executable, str(script), "--runs", first, second, "--out", out], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "3 cells; M >= 1,024 at 0.90 of cuBLAS or more 2 of 2" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = subprocess.run(
        [sys.executable, str(script), "--runs", grid(tmp_path / "g.json", []), "--out", out],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "not linear.py's results" in refused.stderr


def test_mixed_block_sizes_left_out_rows_and_bad_outputs_are_said(tmp_path: Path) -> None:
    """Found by a misuse review: grid_picture.py drew runs of 16- and 64-token blocks as one
    grid (a cell of one overwrote the other's: the picture was the 16-token run's, its counts
    both runs'); compare_grids.py left out rows timed against another baseline and rows a
    deadline skipped without a word; --out onto a directory wrote '<dir>.png' beside it."""
    sixteen = grid(tmp_path / "b16.json", [row((8, 1), 16, 512, 1.2, 0.5)])
    r64 = row((8, 1), 16, 512, 0.9, 0.5)
    r64["shape"]["page"] = 64
    r64["label"] = r64["label"].replace("page=16", "page=64")
    sixty_four = grid(tmp_path / "b64.json", [r64])
    picture = [sys.executable, str(PICTURE), "--runs", sixteen, sixty_four, "--out", tmp_path / "g.png"]
    mixed = subprocess.run(picture, capture_output=True, text=True)
    assert mixed.returncode != 0 and "cache blocks of 16 and 64 tokens" in mixed.stderr, mixed.stderr
    onto_dir = subprocess.run([*picture[:4], "--out", tmp_path], capture_output=True, text=True)
    assert onto_dir.returncode != 0 and "a directory; give the PNG file's path" in onto_dir.stderr
    flash = row((8, 1), 1, 512, 1.0, 0.1)
    flash["ratios"] = {"sdpa-flash/tunebook": 1.1}
    skipped = {"shape": {"n_q": 8}, "tokens": 64, "skipped": "deadline"}
    both = grid(tmp_path / "both.json", [row((8, 1), 16, 512, 1.0, 0.5), flash, skipped])
    done = run("--new", both, "--old", both)
    assert done.returncode == 0, done.stderr
    assert "new: rows left out: 1 skipped by a deadline; 1 timed against sdpa-flash instead" in done.stdout


def test_the_linear_picture_takes_a_models_old_name_as_the_same_model(tmp_path: Path) -> None:
    """linear.py's results before it took the pack's model names (llama3-8b) and after
    (llama-3-8b) were drawn as two models, each cell counted twice."""
    for name, model, ratio in (("old.json", "llama3-8b", 0.81), ("new.json", "llama-3-8b", 1.21)):
        body = [{"model": model, "layer": "qkv", "M": 1024, "vs_cublas": ratio}]
        (tmp_path / name).write_text(json.dumps({"device": "NVIDIA H200", "rows": body}))
    script = SCRIPT.with_name("linear_picture.py")
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--runs",
            tmp_path / "old.json",
            tmp_path / "new.json",
            "--out",
            tmp_path / "l.png",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "1 cells; M >= 1,024 at 0.90 of cuBLAS or more 1 of 1" in done.stdout, done.stdout
