"""The decode structure study (benchmarks/kernels/decode_structures.py, a GPU-only script)
stays runnable: every variant it times computes what the pack's kernel computes, on the CPU
interpreter, with ragged and empty sequences and split-KV on and off."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
pytestmark = pytest.mark.once  # a script's plumbing (conftest.py)


@pytest.fixture(scope="module")
def study():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(SCRIPTS))
    try:
        import decode_structures

        yield decode_structures
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("variant", ["hf", "hfp", "hfs", "hfw", "hfe", "tma", "vm", "hu", "he"])
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
    # Ragged (a short sequence and an empty slot beside a full one), NaN in every slot no
    # sequence owns and -1 past each sequence's blocks: reading past the end shows.
    t = study.ragged(study.build("tiny", 3, context, "cpu", dtype), [100, 17, 0])
    run, want = study.calls(t, config, "cur", context)
    run()
    run, got = study.calls(t, config, variant, context)
    got.fill_(float("nan"))
    run()
    assert not want.isnan().any() and not got.isnan().any()
    # bf16: split merges round, and split partials are stored in bf16 (as the pack stores
    # them), so a variant that sums in another order may land one step (7.8e-3 at 1-2) apart.
    tolerance = 4e-3 if config["SPLITS"] == 1 else 8e-3
    assert (got.float() - want.float()).abs().max().item() <= tolerance
    assert got[2].eq(0).all()


def test_the_ragged_check_catches_a_kernel_reading_past_the_end(study, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """check_ragged, the study's GPU pre-pass, flags a variant whose output is wrong."""
    monkeypatch.setattr(study, "LAYOUTS", {"tiny": (8, 2, 64)})
    config = {"BLOCK_N": 16, "SPLITS": 2, "num_warps": 4, "num_stages": 1}
    assert study.check_ragged([("hf", "tiny", config)], device="cpu") == {}
    real = study.calls

    def broken(t, cfg, variant, context):  # type: ignore[no-untyped-def]
        run, out = real(t, cfg, variant, context)
        if variant == "cur":
            return run, out

        def run_broken():  # type: ignore[no-untyped-def]
            run()
            out[1] = float("nan")  # as if the short sequence had read a poisoned slot

        return run_broken, out

    monkeypatch.setattr(study, "calls", broken)
    assert list(study.check_ragged([("hf", "tiny", config)], device="cpu")) == [f"ragged hf:tiny:{config}"]


def test_the_chunked_merge_takes_several_steps(study, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ "vm" merges CHUNK splits a step; with a small per-thread budget a 4-split merge takes
    two steps of 2, and still matches the pack's one-at-a-time merge."""
    monkeypatch.setitem(study.LAYOUTS, "tiny", (8, 2, 64))
    monkeypatch.setattr(study, "MERGE_PER_THREAD", 8)
    config = {"BLOCK_N": 16, "SPLITS": 4, "num_warps": 2, "num_stages": 1}
    assert study.merge_chunk(config, 4, 64) == 2
    t = study.ragged(study.build("tiny", 3, 100, "cpu", torch.bfloat16), [100, 17, 0])
    run, want = study.calls(t, config, "cur", 100)
    run()
    run, got = study.calls(t, config, "vm", 100)
    got.fill_(float("nan"))
    run()
    assert (got.float() - want.float()).abs().max().item() <= 8e-3 and got[2].eq(0).all()  # as above


def test_merge_chunk_is_the_largest_power_of_two_that_fits(study) -> None:  # type: ignore[no-untyped-def]
    cfg = {"SPLITS": 64, "num_warps": 4}
    assert study.merge_chunk(cfg, 8, 128) == 8  # 64 values x 128 threads / (8 x 128)
    assert study.merge_chunk(cfg, 4, 128) == 16
    assert study.merge_chunk({**cfg, "SPLITS": 4}, 4, 128) == 4  # never more than the splits
    assert study.merge_chunk({**cfg, "num_warps": 1}, 16, 256) == 1  # at least one
