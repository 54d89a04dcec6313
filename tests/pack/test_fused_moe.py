"""tunebook.kernels.fused_moe against an fp64 PyTorch reference, in the CPU interpreter.

Serve mode (vLLM's default rule picks the configs) for most tests; explicit configs cover
blocks smaller than the alignment, the largest blocks and vLLM's table format; one test
tunes both GEMMs and reads the book back in a new process.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import tunebook
from conftest import run_python
from tunebook.kernels.fused_moe import (
    fused_moe,
    moe_align,
    moe_align_size,
    moe_space,
    vllm_config_to_kernel,
    vllm_default_config,
)

from .gemm_reference import MOE_TOL, assert_close, generator, poisoned, randn
from .gemm_reference import moe_reference as reference

moe_mod = importlib.import_module("tunebook.kernels.fused_moe")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")


def inputs(T: int, E: int, H: int, inter: int, k: int, dtype: torch.dtype, *case: object, experts=None):
    """Random weights; routing by softmax top-k, over ``experts`` only when given (so others get none)."""
    gen = generator(T, E, H, inter, k, dtype, *case)
    x = randn((T, H), dtype, gen)
    w13 = randn((E, 2 * inter, H), dtype, gen, scale=H**-0.5)
    w2 = randn((E, H, inter), dtype, gen, scale=inter**-0.5)
    logits = torch.randn((T, E), generator=gen)
    if experts is not None:
        blocked = torch.ones(E, dtype=torch.bool)
        blocked[list(experts)] = False
        logits[:, blocked] = -torch.inf
    topk_weights, topk_ids = torch.topk(logits.softmax(-1), k)
    return x, w13, w2, topk_weights, topk_ids.to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T,E,H,inter,k",
    [(1, 4, 24, 40, 2), (3, 4, 72, 40, 1), (17, 8, 24, 100, 2), (40, 4, 72, 40, 2)],
)
def test_matches_reference(T, E, H, inter, k, dtype):
    x, w13, w2, tw, ti = inputs(T, E, H, inter, k, dtype)
    out = fused_moe(x, w13, w2, tw, ti, out=poisoned((T, H), dtype))
    assert_close(out, reference(x, w13, w2, tw, ti), dtype, MOE_TOL[dtype])


def test_strided_expert_ids_route_as_their_values():
    """A column slice of the ids (ids[:, :1], a stride of k) routes each token by its own id:
    the alignment kernel once read the slice as contiguous memory, and token 1 went to
    token 0's second expert, with no error."""
    x, w13, w2, tw, ti = inputs(5, 4, 24, 40, 2, torch.float32)
    ids, weights = ti[:, :1], tw[:, :1]
    assert not ids.is_contiguous()
    out = fused_moe(x, w13, w2, weights, ids, out=poisoned((5, 24), torch.float32))
    assert_close(out, reference(x, w13, w2, weights, ids.contiguous()), torch.float32, MOE_TOL[torch.float32])


@pytest.mark.parametrize("k", [1, 2])
def test_experts_without_tokens(k):
    x, w13, w2, tw, ti = inputs(9, 8, 24, 40, k, torch.bfloat16, experts=[1, 6])
    assert set(ti.flatten().tolist()) <= {1, 6}
    out = fused_moe(x, w13, w2, tw, ti, out=poisoned((9, 24), torch.bfloat16))
    assert_close(out, reference(x, w13, w2, tw, ti), torch.bfloat16, MOE_TOL[torch.bfloat16])


@pytest.mark.parametrize("k", [1, 2, 6])
def test_expert_ids_outside_the_local_experts_add_nothing(k):
    """vLLM's expert parallelism maps the experts of other ranks to -1 (and an id past E is
    no local expert either): such a (token, expert) pair is dropped, its weight ignored. Such
    an id once failed in the alignment ("index -1 is out of bounds"). k = 6 > E = 4: a rank's
    local experts can be fewer than the experts a token is routed to."""
    T, E = 7, 4
    x, w13, w2, tw, _ = inputs(T, E, 24, 40, 1, torch.float32, "ep", k)
    gen = torch.Generator().manual_seed(k)
    ti = torch.randint(-1, E + 2, (T, k), generator=gen, dtype=torch.int32)  # -1, 0..3, 4, 5
    ti[0] = -1  # every pair of token 0 dropped: it gets 0
    ti[1, 0] = 2  # token 1 keeps one pair at least
    tw = torch.rand((T, k), generator=gen)
    out = fused_moe(x, w13, w2, tw, ti, out=poisoned((T, 24), torch.float32))
    want = reference(x, w13, w2, tw, ti)
    assert_close(out, want, torch.float32, MOE_TOL[torch.float32])
    assert (out[0] == 0).all() and want[1].abs().sum() > 0


CONFIGS = {
    "smallest": dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1),
    "largest": dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=256, GROUP_SIZE_M=64, num_warps=8),
    "grouped": dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_stages=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("align", [None, 128], ids=["align=BLOCK_SIZE_M", "align=128"])
def test_explicit_configs(name, align):
    # align=128 with 16-row blocks: most blocks of a chunk are padding and must return early.
    dtype = torch.bfloat16
    x, w13, w2, tw, ti = inputs(21, 4, 72, 40, 2, dtype, name)
    out = moe_mod._fused_moe(x, w13, w2, tw, ti, poisoned((21, 72), dtype), CONFIGS[name], "ieee", align)
    assert_close(out, reference(x, w13, w2, tw, ti), dtype, MOE_TOL[dtype])


def test_different_configs_per_gemm_and_non_contiguous_inputs():
    dtype = torch.float16
    x, w13, w2, tw, ti = inputs(6, 4, 24, 40, 2, dtype)
    x_strided = torch.empty((6, 48), dtype=dtype)[:, ::2]
    x_strided.copy_(x)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, I] with strides of [E, I, H]
    pair = (CONFIGS["smallest"], CONFIGS["grouped"])
    out = fused_moe(x_strided, w13, w2_t, tw, ti, config=pair, out=poisoned((6, 24), dtype))
    assert_close(out, reference(x, w13, w2, tw, ti), dtype, MOE_TOL[dtype])


def test_alignment_sorts_pads_and_names_each_chunk():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_ids, chunk_expert, num_padded = moe_align(ids, E=4, align=4)
    n = ids.numel()
    # Expert 0 owns flat pairs 1 and 4, expert 1 pair 3, expert 2 pairs 0, 2, 5; expert 3 none.
    assert sorted_ids[:12].tolist() == [1, 4, n, n, 3, n, n, n, 0, 2, 5, n]
    assert (sorted_ids[12:] == n).all() and sorted_ids.numel() % 4 == 0
    assert chunk_expert[:3].tolist() == [0, 1, 2] and int(num_padded) == 12
    # ids outside [0, E) get no row: here pairs 1 (-1) and 4 (4) are left out
    sorted_ids, chunk_expert, num_padded = moe_align(torch.tensor([[2, -1], [2, 1], [4, 2]]), E=4, align=4)
    assert sorted_ids[:8].tolist() == [3, n, n, n, 0, 2, 5, n] and (sorted_ids[8:] == n).all()
    assert chunk_expert[:2].tolist() == [1, 2] and int(num_padded) == 8
    assert moe_align_size(1) == 16 and moe_align_size(40) == 64 and moe_align_size(5000) == 128


@pytest.mark.parametrize(
    "T,k,E,align,block,programs",
    [
        (1, 2, 8, 16, 512, 32),  # decode: one program, one step
        (7, 2, 8, 4, 4, 32),  # 4 programs of one step each, chunks shared out
        (40, 3, 5, 8, 8, 32),  # E + 1 not a power of two; 15 programs
        (11, 2, 64, 16, 2, 4),  # the program cap reached: 4 programs of 3, 3, 3 and 2 steps
        (6, 4, 16, 128, 2, 32),  # more experts than pairs; chunks larger than the pairs
        (9, 1, 1, 16, 4, 32),  # one expert
    ],
)
def test_alignment_kernel_matches_the_pytorch_version(T, k, E, align, block, programs, monkeypatch):
    """Every output of the one-launch kernel equals the PyTorch version's, outputs poisoned
    first (every element must be written), with ids outside [0, E) mixed in. (The program
    cap is lowered where reaching 32 would take minutes in the interpreter.)"""
    gen = torch.Generator().manual_seed(T * 1000 + E)
    ids = torch.randint(-1, E + 2, (T, k), generator=gen)
    align_mod = importlib.import_module("tunebook.kernels._moe_align")
    monkeypatch.setattr(align_mod, "_ALIGN_PROGRAMS", programs)
    want = align_mod._moe_align_torch(ids, E, align)
    got = [torch.full_like(w, -7) for w in want]
    align_mod.launch_align(ids.reshape(-1), E, align, *got, block)
    for name, g, w in zip(("sorted_ids", "chunk_expert", "num_padded"), got, want):
        assert torch.equal(g, w), name
    # and through the public function, which picks the block itself
    assert all(torch.equal(g, w) for g, w in zip(moe_align(ids, E, align), want))


def test_alignment_past_the_kernels_sizes_is_the_pytorch_version(monkeypatch: pytest.MonkeyPatch):
    align_mod = importlib.import_module("tunebook.kernels._moe_align")
    launched = []
    monkeypatch.setattr(align_mod, "launch_align", lambda *a: launched.append(a))
    ids = torch.randint(0, 1024, (4, 2))
    moe_align(ids, 1024, 16)  # E + 1 pads to 2,048 bins: more than the kernel takes
    monkeypatch.setattr(align_mod, "_ALIGN_MAX_WORK", 8 * 16 - 1)
    moe_align(ids % 8, 8, 16)  # 8 pairs x 16 bins: one compare past the (lowered) limit
    assert launched == []
    monkeypatch.setattr(align_mod, "_ALIGN_MAX_WORK", 8 * 16)
    moe_align(ids % 8, 8, 16)
    assert len(launched) == 1


def test_empty_batch_launches_nothing():
    x, w13, w2, tw, ti = inputs(1, 4, 24, 40, 2, torch.float32)
    out = fused_moe(x[:0], w13, w2, tw[:0], ti[:0])
    assert out.shape == (0, 24)
    assert tunebook.stats()["fallbacks"] == 0


def _moe_config(**change):
    """A whole explicit config (vLLM's fields), with ``change`` applied."""
    return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, **change}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must be"),
        (lambda a: {**a, "w13": a["w13"][:, :-1]}, "w13 must be"),
        (lambda a: {**a, "w2": a["w2"][:, :, :-1]}, "w2 must be"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:-1]}, "must both be"),
        (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, "int32/int64"),
        (lambda a: {**a, "w2": a["w2"].half()}, "share one of"),
        (lambda a: {**a, "out": torch.empty(3, 5)}, "out must be"),
        (lambda a: {**a, "out": [0.0] * 24}, "out must be a torch tensor or None; found list"),
        # zeroed before GEMM 1 reads x: with one expert a token, out=x returned zeros
        (lambda a: {**a, "out": a["x"]}, "out shares memory with x; in-place updates are not supported"),
        (lambda a: {**a, "fp32_precision": "IEEE"}, "fp32_precision must be 'ieee' or 'tf32'; found 'IEEE'"),
        # a GROUP_SIZE_M of -1 crashed the process, 0 gave wrong results; "ab" was taken for a
        # pair of configs, (dict, None) failed inside
        (
            lambda a: {**a, "config": _moe_config(GROUP_SIZE_M=-1)},
            "config's GROUP_SIZE_M must be a whole number of at least 1; found -1",
        ),
        (lambda a: {**a, "config": _moe_config(GROUP_SIZE_M=0)}, "GROUP_SIZE_M must be a whole number"),
        (
            lambda a: {**a, "config": _moe_config(BLOCK_SIZE_M=0)},
            "config's BLOCK_SIZE_M must be a power of two; found 0",
        ),
        (
            lambda a: {**a, "config": _moe_config(BLOCK_SIZE_K=48)},
            "config's BLOCK_SIZE_K must be a power of two; found 48",
        ),
        (
            lambda a: {**a, "config": "ab"},
            "config= takes one config dict or a \\(gemm1, gemm2\\) pair of them; found 'ab'",
        ),
        (lambda a: {**a, "config": (_moe_config(), None)}, "config= takes one config dict or a"),
    ],
)
def test_errors_say_what_was_expected(change, message):
    x, w13, w2, tw, ti = inputs(3, 4, 24, 40, 2, torch.float32)
    args = change({"x": x, "w13": w13, "w2": w2, "topk_weights": tw, "topk_ids": ti, "out": None})
    # ValueErrors, as docs/kernels.md says of every op (dtypes once gave TypeErrors); TypeError
    # only for an argument that is not a tensor at all
    with pytest.raises(TypeError if "found list" in message else ValueError, match=message):
        fused_moe(**args)


def test_vllm_default_rule_and_table_mapping():
    # Mixtral-8x7B (E=8, I=14336, H=4096, top-2): decode, mid and prefill batches.
    # vLLM 0.33's rule, as read in its wheel (get_default_config, 16-bit weights, CUDA).
    assert vllm_default_config(1, 8, 14336, 4096, 2) == dict(
        BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4
    )
    assert vllm_default_config(96, 8, 14336, 4096, 2) == dict(
        BLOCK_SIZE_M=32, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3
    )
    big = vllm_default_config(4096, 8, 14336, 4096, 2)
    assert big == dict(
        BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=16, num_warps=8, num_stages=3
    )
    mapped, dropped = vllm_config_to_kernel(
        {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "waves_per_eu": 0}
    )
    assert mapped["BLOCK_SIZE_N"] == 32 and mapped["num_warps"] == 4 and "waves_per_eu" in dropped
    # Serve mode without a book launches the candidate nearest to vLLM's rule.
    space = moe_space(1)
    assert 1000 <= len(space) <= 10000
    cands = space.candidates(args={"ALIGN": 16, "N": 14336, "K": 4096})
    assert vllm_default_config(1, 8, 14336, 4096, 2) in cands


TUNE_CHILD = """
import importlib, json, torch, tunebook
mod = importlib.import_module("tunebook.kernels.fused_moe")
g = torch.Generator().manual_seed(0)
x, w13 = torch.randn(3, 24, generator=g), torch.randn(4, 80, 24, generator=g)
w2 = torch.randn(4, 24, 40, generator=g)
tw, ti = torch.topk(torch.randn(3, 4, generator=g).softmax(-1), 2)
mod.fused_moe(x, w13, w2, tw, ti)
print(json.dumps(tunebook.stats()))
"""


@pytest.mark.once  # persistence across processes is the core's, tested on every Triton (test_persistence.py)
def test_tune_then_a_new_process_benchmarks_nothing(book_dir):
    env = {"TUNEBOOK_MODE": "tune", "TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_KERNELS_MAX_CONFIGS": "3"}
    first = run_python(TUNE_CHILD, env=env)
    assert first["benchmarked"] == 6  # 3 configs for each GEMM
    second = run_python(TUNE_CHILD, env=env)
    assert second["benchmarked"] == 0 and second["book_hits"] == 2
