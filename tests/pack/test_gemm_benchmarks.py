"""The GEMM benchmark scripts still run end to end: --dry-run on tiny shapes in the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_module

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.once  # a script's plumbing (conftest.py)


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels" / name), "--dry-run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["linear.py", "fused_moe.py"])
def test_dry_run_tunes_then_measures(script, tmp_path):
    out, book = tmp_path / "out", tmp_path / "book"
    run_script(script, "--out", str(out), "--book-dir", str(book), "--tune", "--tune-m", "1")
    mix = ["--mix", "FAKE_GPU"] if script == "fused_moe.py" else []  # the dry run's made-up table
    run_script(script, "--out", str(out), "--book-dir", str(book), *mix)
    stem = script.removesuffix(".py")
    tuned = json.loads((out / f"{stem}-tune-cpu-interpreter.json").read_text())["tuned"]
    assert tuned and all(row["benchmarked"] > 0 for row in tuned)
    rows = json.loads((out / f"{stem}-cpu-interpreter.json").read_text())["rows"]
    assert [r["M"] for r in rows][:2] == [1, 3]
    assert all(r["rel_err"] < 0.05 for r in rows)
    # (from_book is False here: the dry run tunes 2 configs a key, short of the declared budget)
    assert all(isinstance(r["from_book"], bool) for r in rows)
    if script == "fused_moe.py":
        assert all("vllm:FAKE_GPU" in r and "torch" in r for r in rows)
        mixed = ("tunebook-explicit", "tunebook-g1+FAKE_GPU-g2", "FAKE_GPU-g1+tunebook-g2")
        assert all(r[v]["us"] > 0 for r in rows for v in mixed)
        (port,) = json.loads((out / f"{stem}-cpu-interpreter.json").read_text())["portability"]
        assert port["table"] == "FAKE_GPU" and port["batches"] == len(rows)
        assert port["best"] <= port["geomean"] <= port["worst"]


def _script(monkeypatch: pytest.MonkeyPatch, name: str):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "kernels"))  # its helper modules
    return load_module(ROOT / "benchmarks" / "kernels" / f"{name}.py", f"bench_{name}")


def test_the_portability_summary_of_the_moe_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per shape and table: geomean, worst, best of table / book, and the batches losing > 5%."""
    moe = _script(monkeypatch, "fused_moe")
    rows = [
        {"shape": "s", "M": m, "tunebook": {"us": 100.0}, "vllm:A": {"us": us}, "vllm:B": {"us": 100.0}}
        for m, us in ((1, 110.0), (2, 90.0), (4, 120.0))
    ]
    rows.append({"shape": "t", "M": 1, "tunebook": {"us": 50.0}, "vllm:A": {"us": 50.0}})
    out = {(r["shape"], r["table"]): r for r in moe.portability(rows)}
    assert set(out) == {("s", "A"), ("s", "B"), ("t", "A")}
    a = out["s", "A"]
    assert (a["batches"], a["worst"], a["best"], a["lose >5%"]) == (3, 1.2, 0.9, "2/3")
    assert a["geomean"] == round((1.1 * 0.9 * 1.2) ** (1 / 3), 3)
    assert out["s", "B"]["lose >5%"] == "0/3" and out["t", "A"]["geomean"] == 1.0


def test_the_moe_benchmark_drops_a_foreign_table_entry_that_fails_and_says_why(monkeypatch) -> None:
    """Another GPU's entry this Triton cannot build is left out of the run, not the run's end;
    a failure of the book's own variant still ends it (it is the reference)."""
    moe = _script(monkeypatch, "fused_moe")

    def boom() -> None:
        raise RuntimeError("num_stages=0 is not supported")

    ran = []
    variants = {
        "tunebook": moe.Variant(lambda: ran.append("tunebook")),
        "vllm:ROCM_GPU": moe.Variant(boom),
        "vllm:NVIDIA_GPU": moe.Variant(lambda: ran.append("nvidia")),
    }
    failed = moe.drop_failing(variants)
    assert set(variants) == {"tunebook", "vllm:NVIDIA_GPU"} and ran == ["nvidia"]
    assert failed == {"vllm:ROCM_GPU": "RuntimeError: num_stages=0 is not supported"}


def test_the_linear_benchmark_takes_the_packs_model_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """It once had names of its own (llama3-8b where the pack's tune command takes llama-3-8b)."""
    script = _script(monkeypatch, "linear")

    args = script.parse_args(["--models", "llama-3-8b,smollm2-135m,llama3-70b-tp8"])  # an old name too
    expected = {  # (N, K) of qkv, o, gate_up, down: the shapes the script measured before
        "llama-3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
        "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
        "llama-3-70b-tp8": [(1280, 8192), (8192, 1024), (7168, 8192), (8192, 3584)],
    }
    assert script.layers(args) == [
        (model, layer, n, k)
        for model, shapes in expected.items()
        for layer, (n, k) in zip(("qkv", "o", "gate_up", "down"), shapes, strict=True)
    ]
    with pytest.raises(SystemExit, match=r"--models: unknown model\(s\) llama-3-7b; known: llama-3-8b"):
        script.layers(script.parse_args(["--models", "llama-3-7b", "--dry-run"]))
