"""rotary_embedding against a float64 PyTorch reference, on the CPU interpreter."""

from __future__ import annotations

import pytest
import torch

import tunebook
from tunebook.kernels import cos_sin_cache as make_cos_sin_cache
from tunebook.kernels import rotary_embedding
from tunebook.kernels.rotary_embedding import (
    SPACE,
    _rotary_embedding,
    _rotary_embedding_kernel,
    hand_picked,
)

from .packutil import DTYPES, assert_close, poisoned, randn, sweep_configs

MAX_POS = 64


def cos_sin_cache(rotary_dim: int, dtype: torch.dtype = torch.float32, base: float = 10000.0) -> torch.Tensor:
    """vLLM's layout: [max_position, rotary_dim], cos in the first half, sin in the second."""
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def reference(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, style: str) -> torch.Tensor:
    """x: [tokens, heads, head_size]; the rotation written out pair by pair, in float64."""
    rot = cache.shape[1]
    half = rot // 2
    out = x.double().clone()
    cos = cache[positions, :half].double()[:, None, :]
    sin = cache[positions, half:].double()[:, None, :]
    i1 = torch.arange(half) if style == "neox" else torch.arange(0, rot, 2)
    i2 = i1 + half if style == "neox" else i1 + 1
    x1, x2 = x[..., i1].double(), x[..., i2].double()
    out[..., i1] = x1 * cos - x2 * sin
    out[..., i2] = x2 * cos + x1 * sin
    return out


def check(q, k, positions, cache, style="neox", *, head_size=None, config=None):  # type: ignore[no-untyped-def]
    """Run into poisoned outputs; compare with the reference; inputs untouched."""
    before = [t.clone() for t in (q, k, positions, cache)]
    outs = (poisoned(q.shape, q.dtype), poisoned(k.shape, k.dtype))
    q_out, k_out = _rotary_embedding(q, k, positions, cache, style, None, head_size, outs, config)
    assert q_out is outs[0] and k_out is outs[1]
    hs = head_size or q.shape[-1]
    for name, x, y in (("q", q, q_out), ("k", k, k_out)):
        x3 = x.reshape(x.shape[0], -1, hs)
        assert_close(y.reshape(x3.shape), reference(x3, positions, cache, style), name)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, positions, cache))), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize(
    ("tokens", "n_q", "n_k", "head_size", "rotary_dim"),
    [(1, 4, 2, 64, 64), (5, 9, 3, 64, 64), (3, 3, 1, 48, 48), (4, 4, 2, 96, 32)],
    ids=["1-token", "smollm2-heads", "head-48", "partial-rotary"],
)
def test_matches_reference(gen, dtype, style, tokens, n_q, n_k, head_size, rotary_dim) -> None:  # type: ignore[no-untyped-def]
    q = randn(gen, tokens, n_q, head_size, dtype=dtype)
    k = randn(gen, tokens, n_k, head_size, dtype=dtype)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    check(q, k, positions, cos_sin_cache(rotary_dim), style)


def test_flat_heads_and_int32_positions(gen) -> None:  # type: ignore[no-untyped-def]
    """vLLM's [tokens, heads * head_size] layout with head_size given; a bf16 cache."""
    q, k = randn(gen, 3, 4 * 32, dtype=torch.float16), randn(gen, 3, 2 * 32, dtype=torch.float16)
    positions = torch.randint(0, MAX_POS, (3,), generator=gen, dtype=torch.int32)
    check(q, k, positions, cos_sin_cache(32, torch.bfloat16), "gptj", head_size=32)


def test_slices_of_a_fused_qkv(gen) -> None:  # type: ignore[no-untyped-def]
    """q and k as column slices of one [tokens, (n_q + 2 n_k) * head_size] projection output
    (token stride larger than the row) are read in place; outputs may be strided too."""
    n_q, n_k, hs, tokens = 4, 2, 32, 5
    qkv = randn(gen, tokens, (n_q + 2 * n_k) * hs, dtype=torch.bfloat16)
    q, k = qkv[:, : n_q * hs], qkv[:, n_q * hs : (n_q + n_k) * hs]
    positions = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    cache = cos_sin_cache(hs)
    check(q, k, positions, cache, head_size=hs)
    check(q.view(tokens, n_q, hs), k.view(tokens, n_k, hs), positions, cache)
    heads_first = randn(gen, n_q, tokens, hs).transpose(0, 1)  # token stride hs, head stride tokens * hs
    check(heads_first, randn(gen, tokens, n_k, hs), positions, cache)
    # A strided last dimension (a transposed buffer) is copied, in either layout.
    check(randn(gen, n_q * hs, tokens).t(), randn(gen, n_k * hs, tokens).t(), positions, cache, head_size=hs)
    check(randn(gen, hs, n_q, tokens).permute(2, 1, 0), randn(gen, tokens, n_k, hs), positions, cache)
    buf = poisoned((tokens, 2 * (n_q + n_k) * hs), torch.bfloat16)
    out = (buf[:, : n_q * hs], buf[:, n_q * hs : (n_q + n_k) * hs])
    q_out, k_out = rotary_embedding(q, k, positions, cache, head_size=hs, out=out)
    assert_close(q_out.view(tokens, n_q, hs), reference(q.view(tokens, n_q, hs), positions, cache, "neox"))
    assert_close(k_out.view(tokens, n_k, hs), reference(k.view(tokens, n_k, hs), positions, cache, "neox"))


def test_new_tensors_by_default(gen) -> None:  # type: ignore[no-untyped-def]
    q, k = randn(gen, 2, 3, 16), randn(gen, 2, 1, 16)
    positions = torch.tensor([7, 0])
    q_out, k_out = rotary_embedding(q, k, positions, cos_sin_cache(16), "gptj", rotary_dim=16)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert_close(q_out, reference(q, positions, cos_sin_cache(16), "gptj"))


def test_zero_tokens_launch_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    q_out, k_out = rotary_embedding(
        randn(gen, 0, 4, 16), randn(gen, 0, 2, 16), torch.zeros(0, dtype=torch.long), cos_sin_cache(16)
    )
    assert q_out.shape == (0, 4, 16) and k_out.shape == (0, 2, 16)
    assert tunebook.stats()["misses"] == 0 and tunebook.stats()["fallbacks"] == 0


def test_serve_mode_runs_the_hand_picked_config(gen) -> None:  # type: ignore[no-untyped-def]
    rotary_embedding(randn(gen, 2, 8, 64), randn(gen, 2, 2, 64), torch.tensor([1, 2]), cos_sin_cache(64))
    cfg = _rotary_embedding_kernel.best_config
    picked = hand_picked({"NQ": 8, "NK": 2})
    assert {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} == picked
    assert tunebook.stats()["benchmarked"] == 0


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_config_sweep(gen, style) -> None:  # type: ignore[no-untyped-def]
    """One head per tile and all heads in one tile, tiles that straddle q and k, one and many
    tokens per program: all compute the same thing. Partial rotary, so the tail copy runs."""
    tokens, n_q, n_k, hs, rot = 5, 5, 3, 48, 32
    args = {"NQ": n_q, "NK": n_k, "ROTARY_DIM": rot, "n_tokens": tokens}
    configs = sweep_configs(SPACE, args)
    assert {cfg["BLOCK_H"] for cfg in configs} >= {1, 8}
    assert {cfg["HEAD_TILES"] for cfg in configs} >= {1, 64}
    q, k = randn(gen, tokens, n_q, hs, dtype=torch.float16), randn(gen, tokens, n_k, hs, dtype=torch.float16)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    for cfg in configs:
        check(q, k, positions, cos_sin_cache(rot), style, config=cfg)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"style": "llama"}, "style must be 'neox' or 'gptj'; found 'llama'"),
        ({"positions": torch.zeros(3)}, "positions must be a 1-D int32 or int64 tensor"),
        ({"positions": torch.zeros(2, dtype=torch.long)}, "same number of tokens; found 3, 3 and 2"),
        (
            {"q": torch.randn(3, 64), "k": torch.randn(3, 32)},
            r"q is 2-D \[tokens, heads \* head_size\]: pass",
        ),
        ({"q": torch.randn(3, 64)}, "q and k must both be"),
        ({"k": torch.randn(3, 1, 32)}, "same head size; found 16 and 32"),
        ({"rotary_dim": 8}, "rotary_dim=8 but cos_sin_cache has 16 columns"),
        ({"cos_sin_cache": torch.randn(64, 15)}, "must be even"),
        ({"cos_sin_cache": torch.randn(64, 32)}, r"in \[2, head_size=16\]; found 32"),
        ({"head_size": 8}, "head_size=8 but q's last dimension is 16"),
        (
            {"q": torch.randn(3, 64), "k": torch.randn(3, 32), "head_size": 16.0},
            "head_size must be an int; found 16.0",
        ),
        ({"q": torch.randn(3, 4, 16).int()}, "q must be float16, bfloat16 or float32"),
        ({"out": (torch.empty(3, 4, 16),)}, r"out must be a \(q_out, k_out\) pair"),
        ({"out": "q"}, r"out\[0\] must have shape \(3, 4, 16\)"),
        ({"out": "k"}, r"out\[1\] shares memory with k"),
    ],
)
def test_rejects_bad_inputs(gen, change, match) -> None:  # type: ignore[no-untyped-def]
    call = {
        "q": randn(gen, 3, 4, 16),
        "k": randn(gen, 3, 2, 16),
        "positions": torch.zeros(3, dtype=torch.long),
        "cos_sin_cache": cos_sin_cache(16),
    }
    out = change.pop("out", None)
    call.update(change)
    if out == "q":
        out = (torch.empty(3, 64), torch.empty(3, 2, 16))
    elif out == "k":
        out = (torch.empty(3, 4, 16), call["k"])
    with pytest.raises(ValueError, match=match):
        rotary_embedding(**call, out=out)


@pytest.mark.parametrize(
    ("rotary_dim", "max_position", "match"),
    [
        (31, 16, r"rotary_dim must be an even integer >= 2; found 31"),  # was a [16, 32] cache
        (0, 16, r"rotary_dim must be an even integer >= 2; found 0"),  # was [16, 0]
        (32.0, 16, r"rotary_dim must be an even integer >= 2; found 32.0"),
        (32, 0, r"max_position must be an integer >= 1; found 0"),
        (32, -1, r"max_position must be an integer >= 1; found -1"),  # was torch's RuntimeError
    ],
)
def test_cos_sin_cache_refuses_a_width_or_length_it_cannot_build(rotary_dim, max_position, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"^tunebook\.kernels\.rotary_embedding: cos_sin_cache: " + match):
        make_cos_sin_cache(rotary_dim, max_position)
    assert make_cos_sin_cache(2, 1).shape == (1, 2)
