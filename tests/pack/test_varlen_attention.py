"""varlen_attention against SDPA (float64) on the CPU interpreter: packed sequences of
mixed lengths (1, block_size - 1, block_size, block_size + 1, empty, longer), GQA ratios 1,
4 and 8, head sizes 64 and 128, causal or not; and chunked prefill on top of a prefix in
the paged cache, whose rows must equal those of one prefill over the whole sequence."""

from __future__ import annotations

import pytest
import torch

import tunebook
from tunebook.kernels import varlen_attention
from tunebook.kernels.varlen_attention import _varlen_attention, _varlen_attention_kernel, hand_picked

from .attention_reference import PagedCache, attention, paged_cache
from .packutil import assert_close, poisoned, randn

PAGE = 16
LENS = [1, PAGE - 1, PAGE, PAGE + 1, 0, 40]


def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def reference(q, k, v, cu_q, cu_k, causal, cache: PagedCache | None = None):  # type: ignore[no-untyped-def]
    """Each sequence alone: its cached prefix (if any) then its new keys, through SDPA."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(len(cu_q) - 1):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys, values = k[int(cu_k[b]) : int(cu_k[b + 1])], v[int(cu_k[b]) : int(cu_k[b + 1])]
        if cache is not None:
            pk, pv = cache.keys(b)
            keys, values = torch.cat([pk, keys]), torch.cat([pv, values])
        out[rows] = attention(q[rows], keys, values, causal)
    return out


def run(q, k, v, cu_q, cu_k, causal=True, cache=None, config=None, **kw):  # type: ignore[no-untyped-def]
    """The op into a poisoned output, checked against the reference; inputs untouched."""
    paged = (
        (cache.k_cache, cache.v_cache, cache.block_table, torch.tensor(cache.lens)) if cache else (None,) * 4
    )
    before = [t.clone() for t in (q, k, v, *(t for t in paged if t is not None))]
    out = poisoned(q.shape, q.dtype)
    got = _varlen_attention(
        q, k, v, cu_q, cu_k, causal, None, kw.get("max_q"), kw.get("max_k"), *paged, out, config
    )
    assert got is out
    assert_close(out, reference(q, k, v, cu_q, cu_k, causal, cache))
    after = [q, k, v, *(t for t in paged if t is not None)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"
    return out


@pytest.mark.parametrize(
    ("n_q", "n_kv", "head_size", "dtype", "causal"),
    [
        (2, 2, 64, torch.float32, True),  # GQA ratio 1
        (4, 1, 128, torch.bfloat16, True),  # ratio 4
        (8, 1, 64, torch.float16, False),  # ratio 8, every key visible
    ],
    ids=["mha-64-fp32-causal", "gqa4-128-bf16-causal", "gqa8-64-fp16-full"],
)
def test_packed_sequences_match_sdpa(gen, n_q, n_kv, head_size, dtype, causal) -> None:  # type: ignore[no-untyped-def]
    cu = offsets(LENS)
    total = int(cu[-1])
    q = randn(gen, total, n_q, head_size, dtype=dtype)
    k, v = randn(gen, total, n_kv, head_size, dtype=dtype), randn(gen, total, n_kv, head_size, dtype=dtype)
    run(q, k, v, cu, cu, causal)
    assert tunebook.stats()["benchmarked"] == 0


def test_chunked_prefill_on_a_cached_prefix(gen, head_size: int = 64) -> None:  # type: ignore[no-untyped-def]
    """New chunks on top of prefixes of 0, 1, block_size - 1, block_size, block_size + 1 and
    more tokens, in blocks out of order: each chunk's rows equal the last rows of one
    causal prefill over its whole sequence (to rounding: the tiles split differently)."""
    prefix = [0, 1, PAGE - 1, PAGE, PAGE + 1, 37]
    chunks = [5, 1, 3, PAGE + 2, 0, 9]
    cache = paged_cache(gen, prefix, PAGE, 2, head_size, torch.bfloat16)
    cu = offsets(chunks)
    q = randn(gen, int(cu[-1]), 4, head_size, dtype=torch.bfloat16)
    k, v = (randn(gen, int(cu[-1]), 2, head_size, dtype=torch.bfloat16) for _ in range(2))
    out = run(q, k, v, cu, cu, cache=cache)
    # The same rows from a prefill of the whole of sequence 5 (prefix + chunk), no cache.
    pk, pv = cache.keys(5)
    whole_k, whole_v = torch.cat([pk, k[int(cu[5]) :]]), torch.cat([pv, v[int(cu[5]) :]])
    whole_q = torch.cat([randn(gen, prefix[5], 4, head_size, dtype=torch.bfloat16), q[int(cu[5]) :]])
    cu_whole = offsets([whole_q.shape[0]])
    full = varlen_attention(whole_q, whole_k, whole_v, cu_whole, cu_whole)
    assert_close(out[int(cu[5]) :], full[prefix[5] :].double(), "chunk vs whole prefill")


@pytest.mark.parametrize("config", [None, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}])
def test_every_key_from_the_cache(gen, config) -> None:  # type: ignore[no-untyped-def]
    """A server that wrote the chunk's K/V into the cache first passes no new keys: the
    queries are the last rows of what the cache holds (the whole of it for the last
    sequence, whose causal diagonal then runs through the cached blocks)."""
    lens, chunks = [20, 7, 1, 40], [4, 7, 1, 40]
    cache = paged_cache(gen, lens, PAGE, 1, 64, torch.float16)
    cu_q = offsets(chunks)
    q = randn(gen, int(cu_q[-1]), 2, 64, dtype=torch.float16)
    none = torch.zeros(0, 1, 64, dtype=torch.float16)
    run(q, none, none, cu_q, torch.zeros(5, dtype=torch.int32), cache=cache, config=config, max_k=40)


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1},
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 2},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    ],
    ids=lambda c: f"m{c['BLOCK_M']}-n{c['BLOCK_N']}",
)
def test_config_sweep(gen, config) -> None:  # type: ignore[no-untyped-def]
    """Query tiles shorter and longer than a sequence, key tiles across the prefix/new-key
    boundary and on the causal diagonal."""
    cache = paged_cache(gen, [PAGE + 1, 0, 30], PAGE, 1, 64, torch.bfloat16)
    cu = offsets([3, PAGE + 1, 40])
    q = randn(gen, int(cu[-1]), 2, 64, dtype=torch.bfloat16)
    k, v = (randn(gen, int(cu[-1]), 1, 64, dtype=torch.bfloat16) for _ in range(2))
    run(q, k, v, cu, cu, cache=cache, config=config)


def test_serve_mode_runs_the_hand_picked_config(gen) -> None:  # type: ignore[no-untyped-def]
    """vLLM's 128x128 launch where the shapes allow it (the nearest config otherwise)."""
    cu = offsets([200])
    q, k = randn(gen, 200, 2, 64, dtype=torch.float16), randn(gen, 200, 1, 64, dtype=torch.float16)
    varlen_attention(q, k, k, cu, cu, max_seqlen_q=200, max_seqlen_k=200)
    cfg = _varlen_attention_kernel.best_config
    assert {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} == hand_picked({})
    assert tunebook.stats()["benchmarked"] == 0 and tunebook.stats()["fallbacks"] == 1


def test_empty_inputs_launch_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    none = torch.zeros(0, 1, 64)
    assert varlen_attention(torch.zeros(0, 2, 64), none, none, offsets([0, 0]), offsets([0, 0])).shape == (
        0,
        2,
        64,
    )
    zero = torch.zeros(1, dtype=torch.int32)
    assert varlen_attention(torch.zeros(0, 2, 64), none, none, zero, zero).shape == (0, 2, 64)
    assert tunebook.stats()["misses"] == 0


def _call(**changes):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    cu = offsets([3, 2])
    args = {
        "q": randn(g, 5, 4, 64),
        "k": randn(g, 5, 2, 64),
        "v": randn(g, 5, 2, 64),
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
    }
    args.update(changes)
    return varlen_attention(**args)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"k": torch.zeros(5, 3, 64), "v": torch.zeros(5, 3, 64)},
            r"positive multiple of KV heads .* found 4 and 3",
        ),
        ({"v": torch.zeros(5, 2, 64, dtype=torch.float16)}, "k and v must be"),
        ({"cu_seqlens_k": offsets([5])}, r"both be \[batch \+ 1\]"),
        ({"cu_seqlens_q": torch.tensor([0.0, 3.0, 5.0])}, "cu_seqlens_q must be a 1-D int32 or int64"),
        (
            {"k_cache": torch.zeros(2, PAGE, 2, 64)},
            "needs k_cache, v_cache, block_table and prefix_lens together",
        ),
        (
            {
                "k_cache": torch.zeros(2, PAGE, 2, 64),
                "v_cache": torch.zeros(2, PAGE, 2, 64),
                "block_table": torch.zeros(3, 1, dtype=torch.int32),
                "prefix_lens": torch.zeros(2, dtype=torch.int32),
            },
            "one row per sequence",
        ),
        ({"out": torch.zeros(5, 4, 32)}, "out must have shape"),
        # a string ran as causal=True; a NaN or infinite scale made every output NaN
        ({"causal": "no"}, r"causal must be True or False; found 'no'"),
        ({"causal": torch.tensor(False)}, "causal must be True or False; found tensor"),
        (
            {"scale": float("nan")},
            r"scale must be a finite number \(or None: head_size \*\* -0.5\); found nan",
        ),
        ({"scale": float("inf")}, "scale must be a finite number .* found inf"),
        ({"scale": "0.1"}, "scale must be a finite number .* found a str"),
        # a string failed deep in the checks ("'<' not supported between 'str' and 'int'")
        (
            {"max_seqlen_q": "3"},
            r"max_seqlen_q must be a whole number of at least 0 \(or None: read from the lengths\); "
            "found a str",
        ),
        ({"max_seqlen_k": -1}, "max_seqlen_k must be a whole number .* found -1"),
        ({"max_seqlen_k": True}, "max_seqlen_k must be a whole number .* found True"),
        (
            {
                "k_cache": torch.zeros(4, PAGE, 2, 64),
                "v_cache": torch.zeros(4, PAGE, 2, 64),
                "block_table": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                "prefix_lens": torch.tensor([3, 2 * PAGE + 1], dtype=torch.int32),  # one past the table
            },
            r"a prefix of 33 tokens does not fit the block table \(2 blocks of 16 tokens = 32\)",
        ),
    ],
)
def test_rejects_bad_inputs(changes, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        _call(**changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"cu_seqlens_q": offsets([3, 3]), "cu_seqlens_k": offsets([3, 2])},
            r"cu_seqlens_q .* q's 5 rows; found \[0, 3, 6\]",
        ),
        (
            {"cu_seqlens_k": torch.tensor([0, 4, 9], dtype=torch.int32)},
            r"cu_seqlens_k .* k's 5 rows; found \[0, 4, 9\]",
        ),
        (
            {"cu_seqlens_q": torch.tensor([0, 4, 3], dtype=torch.int32)},
            r"never decrease .* found \[0, 4, 3\]",
        ),
        (
            {"cu_seqlens_k": torch.tensor([-1, 2, 5], dtype=torch.int32)},
            r"offsets from 0 .* found \[-1, 2, 5\]",
        ),
        # lengths.cumsum(0) without the leading 0: once one sequence, the rows before it unwritten
        (
            {"cu_seqlens_q": torch.tensor([3, 5], dtype=torch.int32), "cu_seqlens_k": offsets([5])},
            r"offsets from 0 .* found \[3, 5\] \(the cumulative sum of the lengths without its leading 0\?\)",
        ),
        # too few tiles launched: rows past the bound were left unwritten
        ({"max_seqlen_q": 2}, r"max_seqlen_q=2 is less than the longest query sequence, 3 rows"),
    ],
    ids=["q-past-rows", "k-past-rows", "decreasing", "negative", "no-leading-zero", "max-seqlen-q-short"],
)
def test_offsets_read_from_the_device_are_checked_before_the_launch(changes, match) -> None:  # type: ignore[no-untyped-def]
    """Where max_seqlen_q/k are read from the offsets, an offset past the rows of q or k is a
    ValueError, not a kernel reading and writing past them (on the CPU: a corrupted heap)."""
    with pytest.raises(ValueError, match=match):
        _call(**changes)
    assert tunebook.stats()["misses"] == 0, "nothing launched"


def test_a_length_read_inside_a_graph_capture_is_refused_with_what_to_pass(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib

    monkeypatch.setattr(importlib.import_module("tunebook.kernels._common"), "capturing", lambda device: True)
    with pytest.raises(ValueError, match=r"max_seqlen_q is needed while a CUDA graph is being captured"):
        _call()
    with pytest.raises(ValueError, match=r"max_seqlen_k is needed while a CUDA graph"):
        _call(max_seqlen_q=3)


@pytest.mark.parametrize("given", [False, True], ids=["read", "max_seqlen_given"])
def test_rows_past_the_last_offset_are_zero_in_an_output_the_op_allocates(gen, given: bool) -> None:  # type: ignore[no-untyped-def]
    """A CUDA graph's padding rows (past cu_seqlens_q[-1]) are written by no program: an
    output the op allocated once returned whatever its memory held there."""
    q, k, v = randn(gen, 7, 2, 16), randn(gen, 7, 1, 16), randn(gen, 7, 1, 16)
    cu = offsets([3, 2])  # rows 5 and 6 are padding
    sizes = {"max_seqlen_q": 3, "max_seqlen_k": 3} if given else {}
    # Deterministic mode fills torch.empty's memory with NaN: rows left unwritten show.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = varlen_attention(q, k, v, cu, cu, **sizes)
        empty = torch.zeros(1, dtype=torch.int32)
        none = varlen_attention(q, k, v, empty, empty)  # no sequence at all: every row is padding
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(out[5:], torch.zeros(2, 2, 16))
    assert_close(out[:5], reference(q, k, v, cu, cu, True)[:5])
    assert torch.equal(none, torch.zeros(7, 2, 16))
    # a given out keeps its padding rows as they were
    mine = poisoned((7, 2, 16), torch.float32)
    varlen_attention(q, k, v, cu, cu, out=mine, **sizes)
    assert mine[5:].isnan().all() and not mine[:5].isnan().any()
