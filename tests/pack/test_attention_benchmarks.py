"""The attention benchmarks run end to end on a CPU (--dry-run: Triton's interpreter, one
tiny workload, a 2-config tuning budget) and write the fields BENCHMARKS.md reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
# script -> (op, its PyTorch baseline's name on a CPU, the metric the table shows)
EXPECTED = {
    "paged_attention.py": ("paged_attention_decode", "sdpa", "gbps"),
    "varlen_attention.py": ("varlen_attention", "sdpa", "tflops"),
}
# decode's grid at a block size of the caller's (the dry run's tiny cache, 3 sequences of 40 tokens)
FLAGS = {"paged_attention.py": ("--block-size", "8")}


@pytest.mark.slow  # two processes in parallel, ~20 s
@pytest.mark.once  # the scripts' plumbing (conftest.py); the kernels have their own tests
def test_attention_scripts_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "TUNEBOOK_MODE": "tune"}
    env.pop("TRITON_INTERPRET", None)  # --dry-run must set it itself
    procs = {
        script: subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / script),
                "--dry-run",
                "--out",
                str(tmp_path / script),
                *FLAGS.get(script, ()),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for script in EXPECTED
    }
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{script}: {stderr}"
        assert stdout.rstrip().splitlines()[-1].startswith("(ratios > 1: tunebook faster"), stdout
        op, baseline, measure = EXPECTED[script]
        doc = json.loads((tmp_path / script / f"{op}.json").read_text())
        assert doc["meta"]["op"] == op and doc["meta"]["copy_gbps"] > 0
        (row,) = doc["results"]
        assert row["shape"].get("page") == {"paged_attention.py": 8}.get(script), row["shape"]
        assert set(row["timings"]) == {"tunebook", "hand-picked", baseline}, row["errors"]
        assert row["max_rel_error"] < 2**-5, row["label"]
        assert row["tuning"]["configs_benchmarked"] == 2
        assert all(measure in t for t in row["timings"].values())
        assert set(row["ratios"]) == {"hand-picked/tunebook", f"{baseline}/tunebook"}
        pages = [p for p in (tmp_path / script / "book").iterdir() if not p.name.startswith(".")]
        assert pages, "the tuning was not written to OUT/book"
        # the comparison of served grids reads what the script writes
        grid = str(tmp_path / script / f"{op}.json")
        compare = [sys.executable, str(SCRIPTS / "compare_grids.py"), "--new", grid, "--old", grid, "--table"]
        done = subprocess.run(compare, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{op}: 1 cells; geomean new/old of sdpa/tunebook 1.000"), done.stdout


@pytest.mark.slow  # one process compiling four kernels with ptxas, ~8 s
def test_attention_kernels_compile_for_sm90_without_spills() -> None:
    """What the interpreter never does: each attention kernel's hand-picked launch, and the
    decode study's TMA and chunked-merge variants, compiles for an H100/H200 (sm_90) with the
    ptxas in Triton's wheel, and spills no registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "compile_check.py"), "--first"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " registers, " in line]
    # "align": fused_moe's alignment kernel, which compile_check builds too since 5780f48
    assert [line.split()[0] for line in lines] == ["decode", "tma", "vm", "varlen", "cache", "align"], (
        proc.stdout
    )
    assert all(" 0 spill bytes" in line for line in lines), proc.stdout
    # The hand-picked decode launch asks for 3 stages. Its whole tiles take their block
    # numbers from a register copy of the table (attend_paged_chunks), so Triton keeps 2
    # copies of each K and V tile; the ragged last tile, read through the table, keeps 1.
    (decode,) = [line for line in lines if line.startswith("decode")]
    copies = re.search(r"tile copies \[([\d, ]+)\]", decode)
    assert "stages=3" in decode and copies, decode
    assert max(int(n) for n in copies.group(1).split(",")) == 2, decode


PDL_CHECK = """
import compile_check as cc
from tunebook.kernels._decode_merge import _merge_kernel
jit, pointers, _, consts_of = cc.kernels()["decode"]
meta = {"BLOCK_N": 64, "SPLITS": 8, "MERGE_KERNEL": 1}
merge_ptrs = {"ws_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}
merge_consts = {"NQ": 16, "NK": 2, "HEAD_SIZE": 128, "BLOCK_D": 128, "SPLITS": 8, "CHUNK_D": 128}
for pdl in (0, 1):
    _, split = cc.compile_one(jit, pointers, consts_of((16, 2, 128), {**meta, "PDL": pdl}), 4, 1, 90)
    _, merge = cc.compile_one(_merge_kernel, merge_ptrs, {**merge_consts, "PDL": pdl}, 1, 1, 90)
    signal = split.asm["ptx"].count("griddepcontrol.launch_dependents")
    print(pdl, signal, merge.asm["ptx"].count("griddepcontrol.wait"))
"""


@pytest.mark.slow  # compiles four kernels with ptxas, ~6 s
def test_decode_split_kernel_signals_the_merge_kernel_only_with_pdl() -> None:
    """With PDL (an H100/H200), the split programs signal the merge kernel's programmatic
    dependent launch and the merge waits for their memory before reading it; without it,
    neither instruction is compiled in."""
    from tunebook import _compat

    if not _compat.grid_dependency_control():
        pytest.skip(
            f"Triton {_compat.triton_version()}'s gdc_wait does not compile; the op launches without PDL"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", PDL_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0", "0", "1", "1", "1"], proc.stdout
