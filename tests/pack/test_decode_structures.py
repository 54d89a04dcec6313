"""The decode structure study (benchmarks/kernels/decode_structures.py, a GPU-only script)
stays runnable: every variant it times computes what the pack's kernel computes, on the CPU
interpreter, with ragged and empty sequences and split-KV on and off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"


@pytest.fixture(scope="module")
def study():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(SCRIPTS))
    try:
        import decode_structures

        yield decode_structures
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("variant", ["hf", "hfp", "hfs", "hfw", "hfe", "tma"])
@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_N": 16, "SPLITS": 1, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 32, "SPLITS": 2, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 16, "SPLITS": 4, "num_warps": 2, "num_stages": 3},
    ],
    ids=["one-split", "two-splits", "four-splits"],
)
def test_every_variant_matches_the_pack_kernel(study, variant, config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(study.LAYOUTS, "tiny", (8, 2, 64))
    context = 100
    # The interpreter reads bf16 through tensor descriptors wrongly (the pack's TMA GEMM is
    # tested in fp16 for the same reason).
    dtype = torch.float16 if variant == "tma" else torch.bfloat16
    t = study.build("tiny", 3, context, "cpu", dtype)
    t["context_lens"][1] = 17  # ragged: a short sequence and an empty slot beside a full one
    t["context_lens"][2] = 0
    run, want = study.calls(t, config, "cur", context)
    run()
    run, got = study.calls(t, config, variant, context)
    got.fill_(float("nan"))
    run()
    assert not got.isnan().any()
    assert (got.float() - want.float()).abs().max().item() <= 4e-3  # bf16: split merges round
    assert got[2].eq(0).all()
