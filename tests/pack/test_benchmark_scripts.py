"""The kernel benchmarks run end to end on a CPU (--dry-run: Triton's interpreter, tiny
shapes, a 2-config tuning budget), so they do not rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import book_files

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
pytestmark = pytest.mark.once  # a script's plumbing (conftest.py)
WORKLOADS = {
    "rms_norm": 4,
    "silu_and_mul": 2,
    "rotary_embedding": 2,
    "reshape_and_cache": 2,
}  # SmolLM2 x 2 token counts


@pytest.mark.slow  # four processes, ~15 s
def test_every_script_dry_runs(tmp_path: Path) -> None:
    env = {**os.environ, "TUNEBOOK_MODE": "tune"}
    env.pop("TRITON_INTERPRET", None)  # --dry-run must set it itself
    procs = {
        op: subprocess.Popen(
            [sys.executable, str(SCRIPTS / f"{op}.py"), "--dry-run", "--out", str(tmp_path / op)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for op in WORKLOADS
    }  # in parallel: each is mostly interpreter start-up
    for op, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{op}: {stderr}"
        assert stdout.rstrip().splitlines()[-1].startswith("(ratios > 1: tunebook faster"), stdout
        doc = json.loads((tmp_path / op / f"{op}.json").read_text())
        assert doc["meta"]["op"] == op and doc["meta"]["copy_gbps"] > 0
        results = doc["results"]
        assert len(results) == WORKLOADS[op]
        for r in results:
            assert set(r["timings"]) == {"tunebook", "hand-picked", "eager"}, r["errors"]
            assert r["max_rel_error_vs_eager"] < 2**-5, r["label"]
            assert r["tuning"]["configs_benchmarked"] == 2 or r["tuning"]["from_book"]
            assert all(len(s) == 3 for s in r["samples_us"].values())
        assert book_files(tmp_path / op / "book"), "the tuning was not written to OUT/book"


@pytest.mark.slow  # one process, ~5 s
def test_serve_check_dry_run_names_every_call_the_books_do_not_answer(tmp_path: Path) -> None:
    """serve_check in serve mode benchmarks nothing; on the CPU no shipped book matches the
    platform, so every call falls back, and each is listed by shape (what to tune next).
    With --tables, an imported vLLM table of this "GPU" answers the MoE's two keys."""
    from click.testing import CliRunner

    from tunebook import _compat, _tables
    from tunebook.cli import _app

    here = _tables.device_label(_compat.device_identity()["device"])
    entry = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8, "num_warps": 8}
    table = tmp_path / f"E=4,N=40,device_name={here}.json"
    table.write_text(json.dumps({"1": entry, "4": entry}))
    imported = CliRunner().invoke(
        _app.cli,
        ["import", "--format", "vllm", str(table), "--kernel", "vllm.fused_moe", "-o", str(tmp_path / "t")],
    )
    assert imported.exit_code == 0, imported.output
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--dry-run", "--out", str(tmp_path), "--tables", str(tmp_path / "t")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "serve_check.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["op"]: r for r in json.loads((tmp_path / "serve_check.json").read_text())["rows"]}
    assert set(rows) == {
        "rms_norm",
        "silu_and_mul",
        "rotary_embedding",
        "linear",
        "fused_moe",
        "reshape_and_cache",
        "paged_attention_decode",
        "varlen_attention",
    }
    for op, r in rows.items():
        assert r["benchmarked"] == 0 and r["book_hits"] == 0, op
        assert r["fallbacks"] >= r["calls"] == len(r["not_answered"]) > 0, op
        assert len(set(r["not_answered"])) == r["calls"], f"{op}: two calls share a label"
    assert "M=1 N=40 K=24" in rows["linear"]["not_answered"]
    assert rows["fused_moe"]["table_answers"] == 4  # 1 and 3 tokens (buckets 1 and 4), two GEMMs each
    assert all(
        "(imported tables answered 2 of its keys)" in label for label in rows["fused_moe"]["not_answered"]
    )
    assert all(r["table_answers"] == 0 for op, r in rows.items() if op != "fused_moe")
    assert "not answered by the books (15 calls" in proc.stdout
    assert "books and 1 imported table pages of this GPU" in proc.stdout
    typo = [*args[:-1], str(tmp_path / "tabels")]  # a mistyped directory is named, not read as "no answers"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "serve_check.py"), *typo], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "no table imported as vllm.fused_moe for this GPU" in proc.stderr


def test_a_script_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(SCRIPTS / "silu_and_mul.py")
    proc = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "run with --dry-run" in proc.stderr


@pytest.mark.slow  # three processes on the interpreter, ~15 s
def test_fidelity_dry_runs_both_timers_and_combines(tmp_path: Path) -> None:
    """benchmarks/kernels/fidelity.py: tunes with the current timer and with the short-kernel
    policy (each in its own process and book), re-times in a fresh one, reports both."""
    env = {**os.environ, "TUNEBOOK_MODE": "serve", "TUNEBOOK_TIMER": "bogus"}  # the script sets its own
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    script = str(SCRIPTS / "fidelity.py")
    proc = subprocess.run(
        [sys.executable, script, "--dry-run", "--ops", "silu_and_mul", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned = {t: json.loads((out / f"tuned-{t}.json").read_text())["results"] for t in ("cuda-graph", "short")}
    for timer in (
        "cuda-graph",
        "short",
    ):  # tuned from nothing: no other book was read (not even shipped ones)
        assert json.loads((out / f"tuned-{timer}.json").read_text())["meta"]["read_only_books"] == []
    assert [r["timer_id"] for r in tuned["cuda-graph"]] == ["wallclock"]
    assert [r["timer_id"] for r in tuned["short"]] == ["wallclock-interleaved"]
    assert all(len(r["candidates"]) == 3 for rows in tuned.values() for r in rows)
    assert book_files(out / "book-short") and book_files(out / "book-cuda-graph")
    [result] = json.loads((out / "fidelity.json").read_text())["results"]
    assert result["candidates"] == 3 and set(result["timers"]) == {"cuda-graph", "short"}
    assert len(result["medians_us"]) == 3 and result["best_us"] > 0
    for verdict in result["timers"].values():
        assert verdict["ratio"] >= 1.0 and verdict["within"] == (verdict["ratio"] <= 1.03)
    combined = subprocess.run(
        [sys.executable, script, "--combine", str(out), str(out)], capture_output=True, text=True, env=env
    )
    assert combined.returncode == 0, combined.stderr
    lines = combined.stdout.splitlines()  # a run given twice counts once, and says so
    assert lines[0].split()[:2] == ["timer", "keys"] and lines[1].split()[:2] == ["cuda-graph", "1"]
    assert "is in more than one run" in combined.stderr


@pytest.mark.slow  # five processes on the interpreter, ~1 min
def test_same_arch_dry_run_tunes_answers_and_times_in_fresh_processes(tmp_path: Path) -> None:
    """benchmarks/kernels/same_arch.py: the pack's tune command into OUT/book, the shipped
    books' answers in a fresh serve-mode process (on a CPU none matches, so each is the op's
    rule, said as a fallback), then a fresh process serving OUT/book times every key's
    config against that answer and the hand-picked one, benchmarking nothing; run again, the
    tuning costs nothing."""
    env = {**os.environ, "TUNEBOOK_MODE": "tune", "TUNEBOOK_DIR": str(tmp_path / "elsewhere")}
    env.pop("TRITON_INTERPRET", None)  # --dry-run must set it itself
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPTS / "same_arch.py"), "--dry-run", "--out", str(out)]
    ops = ["--ops", "rms_norm,paged_attention_decode"]
    proc = subprocess.run([*args, *ops], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-2].startswith("(> 1: tuned here is faster"), proc.stdout
    answers = json.loads((out / "answers.json").read_text())["results"]
    assert len(answers) == 3 and all(a["how"] == {"fallbacks": 1} for a in answers), answers
    doc = json.loads((out / "same_arch.json").read_text())
    assert doc["meta"]["stats"]["benchmarked"] == 0 and doc["meta"]["stats"]["fallbacks"] == 0
    assert [r["op"] for r in doc["results"]] == ["rms_norm", "rms_norm", "paged_attention_decode"]
    for r in doc["results"]:
        assert r["served_how"] == {"book_hits": 1}, r  # the key tuned here, from OUT/book
        assert set(r["ratios"]) == {"answer/tuned here", "hand-picked/tuned here"}, r["errors"]
        assert r["same_config"] == (r["tuned"] == r["answer"])
        assert r["answer"] == next(a["config"] for a in answers if a["label"] == r["label"])
    assert book_files(out / "book") and not book_files(tmp_path / "elsewhere")
    again = subprocess.run([*args, "--ops", "rms_norm"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 configs measured, 2 keys already in the book" in again.stdout, again.stdout


@pytest.mark.parametrize(
    ("script", "args", "said"),
    [
        ("silu_and_mul", ["--tokens", "1,0"], "--tokens: every value must be 1 or more"),
        ("silu_and_mul", ["--tokens", ","], "--tokens: expected comma-separated whole numbers"),
        ("rms_norm", ["--rounds", "0"], "--rounds: expected 1 or more"),
        ("rms_norm", ["--mode", "serve", "--book", "{tmp}/typo"], "no such book; serve mode reads one"),
        ("rms_norm", ["--out", "{tmp}/a-file"], "a file, not a directory"),
        ("paged_attention", ["--batches", "16,-4"], "--batches: every value must be 1 or more"),
        ("varlen_attention", ["--tokens", "abc"], "--tokens: expected comma-separated whole numbers"),
        ("rms_norm", ["--dtypes", "int8"], "--dtypes: unknown 'int8'"),
        ("silu_and_mul", ["--models", "nosuch"], "--models: unknown model(s) nosuch"),
        # The GEMM scripts: a mistyped --vllm-configs left the vLLM section out (exit 0), an
        # --out onto a file failed after the whole run, a 0 in --m was timed.
        (
            "fused_moe",
            ["--vllm-configs", "{tmp}/nonexistent"],
            "--vllm-configs {tmp}/nonexistent: no such directory",
        ),
        ("fused_moe", ["--m", "4,0"], "--m: every value must be 1 or more"),
        ("fused_moe", ["--shapes", "nosuch"], "--shapes: unknown nosuch"),
        ("linear", ["--out", "{tmp}/a-file"], "a file, not a directory"),
        ("linear", ["--repeats", "0"], "--repeats: expected 1 or more"),
    ],
)
def test_a_scripts_option_mistake_is_one_line_before_anything_is_measured(
    tmp_path: Path, script: str, args: list[str], said: str
) -> None:
    """Found by a misuse review: a token count of 0 recorded the previous key's config (or
    raised AttributeError alone), lists that were not numbers, an unknown dtype or model and
    an --out that was a file were tracebacks after the device copy had been measured, and
    serve mode with a mistyped --book served every key by its fallback, reported as usual."""
    (tmp_path / "a-file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in argv else []
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{script}.py"), "--dry-run", *out, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and said.replace("{tmp}", str(tmp_path)) in done.stderr, done.stderr[-1500:]
    assert "Traceback" not in done.stderr and "device copy" not in done.stdout


@pytest.mark.parametrize(
    ("script", "flag"),
    [
        ("kernels/linear.py", "--dry-run"),
        ("kernels/serve_check.py", "--dry-run"),
        ("core.py", "--interpret"),
        ("tuning_speed.py", "--interpret"),
        ("decoder.py", "--dry-run"),
    ],
)
def test_without_a_gpu_a_script_names_its_cpu_mode_in_one_line(script: str, flag: str) -> None:
    """Found by a misuse review: these raised torch's "not compiled with CUDA" assertion, a
    paragraph about ATen_cuda, or a ValueError suggesting TRITON_INTERPRET=1."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPTS.parent / script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode != 0 and f"no CUDA GPU: run with {flag} " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
