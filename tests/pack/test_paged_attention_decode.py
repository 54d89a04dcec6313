"""paged_attention_decode against SDPA (float64) on the CPU interpreter: contexts of 1,
block_size - 1, block_size, block_size + 1, 0 and longer ones in one batch, blocks out of
order, GQA ratios 1, 4 and 8, head sizes 64 and 128, split-KV on and off."""

from __future__ import annotations

import gc
import importlib

import pytest
import torch

import tunebook
from tunebook.kernels import paged_attention_decode, reshape_and_cache
from tunebook.kernels._attention import LOG2E, NO_SCORE
from tunebook.kernels._decode_merge import MERGE_ONE_BY_ONE, TREE_GROUP, merge_chunk, merge_warps
from tunebook.kernels.paged_attention_decode import (
    MAX_STAGED_TILE_PER_THREAD,
    MAX_TILE_PER_THREAD,
    SPACE,
    _descriptors,
    _paged_attention_decode,
    _paged_attention_decode_kernel,
    first_guess,
    hand_picked,
    max_splits,
    programmatic_launch,
)

from .attention_reference import PagedCache, attention, paged_cache
from .packutil import assert_close, poisoned, randn

PAGE = 16
LENS = [1, PAGE - 1, PAGE, PAGE + 1, 0, 70]  # 0: an unused batch slot


def reference(q: torch.Tensor, cache: PagedCache, scale: float | None = None) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        k, v = cache.keys(b)
        qb = q[b : b + 1] if scale is None else q[b : b + 1] * (scale * q.shape[2] ** 0.5)
        out[b] = attention(qb, k, v, causal=False)[0]
    return out


def check(q, cache, *, config=None, max_context_len=None, scale=None):  # type: ignore[no-untyped-def]
    """Run into a poisoned output and compare; the inputs are left untouched."""
    before = [t.clone() for t in (q, cache.k_cache, cache.v_cache, cache.block_table)]
    lens = torch.tensor(cache.lens, dtype=torch.int32)
    out = poisoned(q.shape, q.dtype)
    got = _paged_attention_decode(
        q, cache.k_cache, cache.v_cache, cache.block_table, lens, scale, max_context_len, out, config
    )
    assert got is out
    assert_close(out, reference(q, cache, scale))
    after = [q, cache.k_cache, cache.v_cache, cache.block_table]
    # NaN-poisoned rows compare equal to themselves here
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(before, after)), (
        "an input was modified"
    )


@pytest.mark.parametrize(
    ("n_q", "n_kv", "head_size", "dtype"),
    [
        (2, 2, 64, torch.float32),  # GQA ratio 1
        (8, 2, 128, torch.bfloat16),  # ratio 4
        (8, 1, 64, torch.float16),  # ratio 8
    ],
    ids=["mha-64-fp32", "gqa4-128-bf16", "gqa8-64-fp16"],
)
def test_mixed_contexts_match_sdpa(gen, n_q, n_kv, head_size, dtype) -> None:  # type: ignore[no-untyped-def]
    """Split-KV with the 2-D loop (the hand-picked launch's tiles, 8 splits) and with warp
    slices (the op's first guess, 2 splits)."""
    cache = paged_cache(gen, LENS, PAGE, n_kv, head_size, dtype)
    q = randn(gen, len(LENS), n_q, head_size, dtype=dtype)
    for config in (
        {"BLOCK_N": 16, "SPLITS": 8, "SLICES": 1, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 16, "SPLITS": 2, "SLICES": 4, "num_warps": 4, "num_stages": 3},
    ):
        check(q, cache, max_context_len=max(LENS), config=config)
    assert tunebook.stats()["benchmarked"] == 0


@pytest.mark.parametrize(("n_q", "head_size", "splits"), [(8, 128, 32), (7, 64, 64)], ids=["g8-128", "g7-64"])
def test_the_two_level_split_merge_matches_sdpa(gen, n_q, head_size, splits) -> None:  # type: ignore[no-untyped-def]
    """Past MERGE_ONE_BY_ONE splits the merge takes two levels: the last of every TREE_GROUP
    splits merges them into a group partial, the last group merges the groups. Here 4 and 8
    groups, a group of query heads that is not a power of two (its padded rows masked), and
    splits left without keys (the short sequences') among them; run twice, so every counter
    must be back at zero after a call."""
    assert splits > MERGE_ONE_BY_ONE.value and splits % TREE_GROUP.value == 0
    lens = [splits * 32 - 3, 1, 0, PAGE + 1]  # the first sequence has keys in every split
    cache = paged_cache(gen, lens, PAGE, 1, head_size, torch.bfloat16)
    q = randn(gen, len(lens), n_q, head_size, dtype=torch.bfloat16)
    config = {"BLOCK_N": 16, "SPLITS": splits, "SLICES": 1, "num_warps": 4, "num_stages": 1}
    for _ in range(2):
        check(q, cache, max_context_len=max(lens), config=config)


@pytest.mark.parametrize(
    ("n_q", "n_kv", "head_size", "splits", "dtype"),
    [
        (8, 2, 128, 2, torch.bfloat16),
        (7, 1, 64, 8, torch.float16),  # a group of 7 query heads
        (4, 2, 64, 64, torch.float32),
        (2, 2, 128, 32, torch.bfloat16),  # GQA ratio 1
        (6, 2, 80, 4, torch.float16),  # a head padded to 128 (the store masks the padding)
        (4, 1, 128, 64, torch.float16),  # 8,192 floats a merge program: two warps
        # past 64 splits: the merge kernel's alone (24 s in the interpreter)
        pytest.param(2, 1, 64, 256, torch.float16, marks=pytest.mark.slow),
    ],
    ids=["g4-s2", "g7-s8", "g2-s64", "mha-s32", "g3-s4-head80", "g4-s64-head128", "g2-s256"],
)
def test_the_merge_kernel_matches_sdpa(gen, n_q, n_kv, head_size, splits, dtype) -> None:  # type: ignore[no-untyped-def]
    """MERGE_KERNEL=1: the split programs only store their partials and _merge_kernel,
    launched after them, merges them, a program a (query head, sequence), or a chunk of its
    head where the pairs are few and their partials many (here 64 splits of 128-wide heads:
    8 chunks of 16 lanes; 256 of 64-wide heads: 4 of 16). Splits left without keys, an
    empty batch slot and the poisoned output check every lane it writes."""
    lens = [splits * 16 + 5, 1, 0, PAGE + 1]
    cache = paged_cache(gen, lens, PAGE, n_kv, head_size, dtype)
    q = randn(gen, len(lens), n_q, head_size, dtype=dtype)
    for slices in (1, 2):
        config = {
            "MERGE_KERNEL": 1,
            "BLOCK_N": 16,
            "SPLITS": splits,
            "SLICES": slices,
            "num_warps": slices,
            "num_stages": 1,
        }
        check(q, cache, max_context_len=max(lens), config=config)


def test_the_merge_kernel_cuts_heads_into_chunks_only_while_its_programs_are_few() -> None:
    """About MERGE_PROGRAMS (128) merge programs where a pair has more than one warp's
    4,096 partials: a head is halved while (query head, sequence) pairs are fewer, down to
    16 lanes; never cut where the pairs fill the programs or the partials fit a warp."""
    assert merge_chunk(8, 256, 128) == 16 and merge_chunk(32, 64, 128) == 32
    assert merge_chunk(16, 64, 128) == 16 and merge_chunk(64, 128, 128) == 64
    assert merge_chunk(8, 32, 128) == 128 and merge_chunk(4, 64, 64) == 64  # a warp's partials
    assert merge_chunk(128, 256, 128) == 128  # programs enough
    assert merge_chunk(1, 1024, 64) == 16  # 16 lanes at least


def test_splits_past_64_are_offered_for_few_pairs_and_merged_by_the_merge_kernel() -> None:
    """128 and 256 splits reach a call of few (sequence, KV head) pairs and long contexts
    (at most MAX_SPLIT_PROGRAMS programs, a 16-key tile a split at least), and only with the
    merge kernel: the in-kernel merge stops at 64."""
    assert max_splits(1, 1, 32768) == 256 and max_splits(4, 2, 32768) == 256
    assert max_splits(4, 4, 32768) == 128 and max_splits(1, 1, 2048) == 128
    assert max_splits(32, 1, 32768) == 64 and max_splits(1, 1, 1024) == 64
    cache = torch.empty(4, PAGE, 1, 64, dtype=torch.float16)
    args = {"NQ": 8, "NK": 1, "HEAD_SIZE": 64, "PAGE": PAGE, "batch": 1, "max_context_len": 32768,
            "k_cache_ptr": cache, "k_desc": None}  # fmt: skip
    many = [c for c in SPACE.candidates(args=args) if c["SPLITS"] > 64]
    assert {c["SPLITS"] for c in many} == {128, 256}
    assert all(c["MERGE_KERNEL"] == 1 for c in many)
    assert any(c["SPLITS"] == 64 and c["MERGE_KERNEL"] == 0 for c in SPACE.candidates(args=args))


def test_the_merge_kernel_runs_on_one_warp_until_its_partials_need_more() -> None:
    """One warp up to 4,096 partial floats a program (32 splits of 128-wide heads), then a
    power of two more per doubling, at most 8."""
    assert [merge_warps(s, 128) for s in (2, 8, 32, 64)] == [1, 1, 1, 2]
    assert merge_warps(64, 64) == 1 and merge_warps(64, 256) == 4 and merge_warps(256, 256) == 8


@pytest.mark.parametrize(
    ("n_q", "n_kv", "head_size", "dtype"),
    [(8, 2, 64, torch.float16), (2, 2, 16, torch.float32), (7, 1, 32, torch.float16)],
    ids=["gqa4-64-fp16", "mha-16-fp32", "g7-32-fp16"],
)
def test_tma_block_loads_match_sdpa(gen, n_q, n_kv, head_size, dtype) -> None:  # type: ignore[no-untyped-def]
    """TMA=1: a cache block a step loaded as a box through tensor descriptors (fp16 and fp32
    in the interpreter, which misreads bf16 through one). A box has no mask: the rows of a
    sequence's last block past its length are NaN here, and must not reach the output. One
    split and several, merged in the kernel and by the merge kernel; an empty slot."""
    lens = [1, PAGE - 1, PAGE, PAGE + 1, 0, 70, 200]
    cache = paged_cache(gen, lens, PAGE, n_kv, head_size, dtype)
    for b, n in enumerate(lens):
        if n % PAGE:
            last = int(cache.block_table[b, n // PAGE])
            cache.k_cache[last, n % PAGE :] = float("nan")
            cache.v_cache[last, n % PAGE :] = float("nan")
    q = randn(gen, len(lens), n_q, head_size, dtype=dtype)
    for splits, merge_kernel, warps in ((1, 0, 1), (4, 0, 2), (4, 1, 1), (16, 1, 4)):
        config = {
            "MERGE_KERNEL": merge_kernel,
            "BLOCK_N": PAGE,
            "SPLITS": splits,
            "SLICES": 1,
            "num_warps": warps,
            "num_stages": 3,
            "TMA": 1,
        }
        check(q, cache, max_context_len=max(lens), config=config)


def test_tma_configs_are_offered_only_where_the_caches_allow_a_box() -> None:
    """A TMA config steps one whole cache block (BLOCK_N = the block size) with one softmax
    state, and is offered only where the op could build the caches' descriptors: rows
    16-byte aligned and heads a power of two; the interpreter leaves bf16 out."""
    cache = torch.empty(4, PAGE, 2, 64, dtype=torch.float16)
    k_desc, v_desc = _descriptors(cache, cache)
    assert k_desc is not None and v_desc is not None
    args = {"NQ": 8, "NK": 2, "HEAD_SIZE": 64, "PAGE": PAGE, "batch": 4, "max_context_len": 512,
            "k_cache_ptr": cache, "k_desc": k_desc}  # fmt: skip
    tma = [c for c in SPACE.candidates(args=args) if c["TMA"]]
    assert tma and {(c["BLOCK_N"], c["SLICES"]) for c in tma} == {(PAGE, 1)}
    assert {c["SPLITS"] for c in tma} == {1, 2, 4, 8, 16, 32}  # a block a split at 32
    assert not any(c["TMA"] for c in SPACE.candidates(args={**args, "k_desc": None}))
    padded = torch.empty(4, PAGE, 2, 80, dtype=torch.float16)[..., :64]  # heads of 64 in rows of 80
    assert _descriptors(padded, padded) == (None, None)
    assert _descriptors(cache.bfloat16(), cache.bfloat16()) == (None, None)
    short_blocks = torch.empty(4, 8, 2, 64, dtype=torch.float16)
    assert _descriptors(short_blocks, short_blocks) == (None, None)
    head_major = torch.empty(4, 2, PAGE, 64, dtype=torch.float16).permute(0, 2, 1, 3)
    assert _descriptors(head_major, head_major) == (None, None)


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "SPLITS": 2, "num_warps": 2, "num_stages": 2}])
def test_head_major_blocks_match_sdpa(gen, config) -> None:  # type: ignore[no-untyped-def]
    """Blocks stored head-major ([blocks, NK, block_size, head], FlashInfer's HND) and passed
    as the permuted token-major view: every (block, head) one contiguous run. The kernel reads
    them through their strides."""
    cache = paged_cache(gen, LENS, PAGE, 2, 64, torch.float32)
    for name in ("k_cache", "v_cache"):
        stored = getattr(cache, name).permute(0, 2, 1, 3).contiguous()
        setattr(cache, name, stored.permute(0, 2, 1, 3))
    check(randn(gen, len(LENS), 8, 64, dtype=torch.float32), cache, config=config)


def test_descriptors_are_remembered_per_cache_pair_and_let_go_with_it() -> None:
    """A server passes the same caches at every step: their descriptors are built once. They
    hold views of the caches, so the entry goes when a cache tensor is freed (else a freed
    cache's memory would stay allocated)."""
    module = importlib.import_module("tunebook.kernels._decode_tma")  # where they are remembered
    k, v = (torch.empty(4, PAGE, 2, 64, dtype=torch.float16) for _ in range(2))
    first = _descriptors(k, v)
    assert first[0] is not None and _descriptors(k, v) is first
    pair = (id(k), id(v))
    assert pair in module._DESCRIPTORS
    del k
    gc.collect()
    assert pair not in module._DESCRIPTORS


def test_the_merge_kernel_is_the_tuners_post_hook(gen) -> None:  # type: ignore[no-untyped-def]
    """The tuner times a config with its post_hook inside the timing, as Triton does: for a
    MERGE_KERNEL=1 config the hook launches the merge from the split kernel's named
    arguments, and for any other launch it does nothing."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    assert _paged_attention_decode_kernel.user_defined_post_hook
    lens = [100, 3]
    cache = paged_cache(gen, lens, PAGE, 2, 64, torch.bfloat16)
    q = randn(gen, len(lens), 8, 64, dtype=torch.bfloat16)
    table, context_lens = cache.block_table, torch.tensor(lens, dtype=torch.int32)
    want = reference(q, cache)
    for merge, exception in [(1, None), (0, None), (1, RuntimeError("a failed launch"))]:
        config = {
            "MERGE_KERNEL": merge,
            "BLOCK_N": 16,
            "SPLITS": 4,
            "SLICES": 1,
            "num_warps": 4,
            "num_stages": 1,
        }
        out = poisoned(q.shape, q.dtype)
        grid, args = module._launch(
            q, cache.k_cache, cache.v_cache, table, context_lens, None, 100, out, config
        )
        _paged_attention_decode_kernel.fn[grid(config)](*args, **config)
        named = {**dict(zip(_paged_attention_decode_kernel.arg_names, args)), **config}
        _paged_attention_decode_kernel.post_hook(named, exception=exception)
        if exception is None:
            assert_close(out, want)  # merged in the kernel, or by the hook
        else:
            assert out.isnan().all(), "the hook merged after a launch that raised"


# Tunes one key in tune mode with every measured launch counted: those of a MERGE_KERNEL=1
# config and the merges launched while they run. Prints the counts and the chosen config.
TUNE_AND_COUNT_MERGES = """
import importlib, json, torch, tunebook
from tunebook._hooks import Hooks
from tunebook.kernels import _models

module = importlib.import_module("tunebook.kernels.paged_attention_decode")
merges = importlib.import_module("tunebook.kernels._decode_merge")
counts = {"measured": 0, "merged": 0, "merged_while_measuring": 0}
merge, timed_launch = merges._merge, Hooks.timed_launch
measuring = [False]

def counted_merge(*args, **kwargs):
    counts["merged"] += 1
    counts["merged_while_measuring"] += measuring[0]
    return merge(*args, **kwargs)

def counted_timed_launch(self, run, call, config, defaults):
    launch = timed_launch(self, run, call, config, defaults)
    if not (config.kwargs.get("MERGE_KERNEL") and config.kwargs["SPLITS"] > 1):
        return launch
    def measured():
        counts["measured"] += 1
        measuring[0] = True
        try:
            launch()
        finally:
            measuring[0] = False
    return measured

merges._merge, Hooks.timed_launch = counted_merge, counted_timed_launch
shape = {"n_q": 2, "n_kv": 1, "head_size": 16, "page": 16, "context": 200}
w = _models.workload("paged_attention_decode", shape, 1, torch.float32, "cpu")
w.run(None)
best = module._paged_attention_decode_kernel.best_config
print(json.dumps({**counts, "benchmarked": tunebook.stats()["benchmarked"], "chosen": best.kwargs}))
"""


def test_a_merge_kernel_config_is_measured_with_its_merge(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The tuner must time a MERGE_KERNEL=1 config at its whole cost: every measured launch
    of one launches the merge kernel inside it (the post_hook), or the search would favour
    it by the merge's time. The key's first guess, measured first, is such a config."""
    from conftest import run_python

    env = {"TUNEBOOK_DIR": str(tmp_path), "TUNEBOOK_MODE": "tune", "TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    got = run_python(TUNE_AND_COUNT_MERGES, env=env)
    assert got["benchmarked"] == 2 and got["measured"] > 0, got
    assert got["merged_while_measuring"] == got["measured"], got
    # and the call's own launch, when the chosen config merges in the merge kernel
    own = int(got["chosen"].get("MERGE_KERNEL", 0) == 1 and got["chosen"]["SPLITS"] > 1)
    assert got["merged"] == got["measured"] + own, got


TUNE_OR_SERVE_A_TMA_GUESS = """
import importlib, json, os, torch, tunebook
from tunebook.kernels import _models

module = importlib.import_module("tunebook.kernels.paged_attention_decode")
module._tma_here = lambda: True  # as on an H200: the first guess is a TMA config
shape = {"n_q": 4, "n_kv": 2, "head_size": 16, "page": 16, "context": 200}
w = _models.workload("paged_attention_decode", shape, 3, torch.float16, "cpu")
if os.environ.get("HEAD_MAJOR"):  # the same values in head-major blocks (FlashInfer's HND)
    for name in ("k_cache", "v_cache"):
        w.tensors[name] = w.tensors[name].permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
w.run(None)
t = w.tensors
ref = torch.zeros(t["q"].shape, dtype=torch.float64)
for b in range(3):
    n = int(t["context_lens"][b])
    blocks = t["block_table"][b, : -(-n // 16)].long()
    k = t["k_cache"][blocks].reshape(-1, 2, 16)[:n].double().repeat_interleave(2, 1)
    v = t["v_cache"][blocks].reshape(-1, 2, 16)[:n].double().repeat_interleave(2, 1)
    probs = torch.softmax(torch.einsum("hd,thd->ht", t["q"][b].double(), k) / 4, -1)
    ref[b] = torch.einsum("ht,thd->hd", probs, v)
best = module._paged_attention_decode_kernel.best_config
stats = tunebook.stats()
print(json.dumps({"error": float((t["out"].double() - ref).abs().max()), "chosen": best.kwargs,
                  "benchmarked": stats["benchmarked"], "fallbacks": stats["fallbacks"]}))
"""


def test_a_tma_winner_is_tuned_then_served_from_the_book_by_another_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The calls carry the caches' descriptors: a search whose one measured config is the
    TMA first guess stores it, and a fresh process in serve mode reads it back and runs it
    (fp16 in the interpreter), benchmarking nothing."""
    from conftest import run_python

    env = {"TUNEBOOK_DIR": str(tmp_path), "TUNEBOOK_MODE": "tune", "TUNEBOOK_KERNELS_MAX_CONFIGS": "1"}
    tuned = run_python(TUNE_OR_SERVE_A_TMA_GUESS, env=env)
    assert tuned["chosen"]["TMA"] == 1 and tuned["benchmarked"] == 1 and tuned["error"] < 2e-2, tuned
    served = run_python(TUNE_OR_SERVE_A_TMA_GUESS, env={**env, "TUNEBOOK_MODE": "serve"})
    assert served["chosen"] == tuned["chosen"] and served["benchmarked"] == 0, served
    assert served["error"] < 2e-2, served
    # The key does not name the caches' layout: head-major blocks, which no box can read,
    # get a config without TMA (the chain's answer where the winner does not fit), counted
    # as a fallback, and the right answer.
    serve_hm = {**env, "TUNEBOOK_MODE": "serve", "HEAD_MAJOR": "1"}
    head_major = run_python(TUNE_OR_SERVE_A_TMA_GUESS, env=serve_hm)
    assert head_major["chosen"]["TMA"] == 0 and head_major["benchmarked"] == 0, head_major
    assert head_major["fallbacks"] == 1 and head_major["error"] < 2e-2, head_major


@pytest.mark.parametrize(("head_size", "context"), [(8, 16), (4, 32), (4, 33)])
def test_a_head_smaller_than_a_dot_tile_with_a_short_context_runs(gen, head_size, context) -> None:  # type: ignore[no-untyped-def]
    """Tiny test models have heads of 4 or 8: the kernel pads them to 16, and the Space's
    per-thread rule must count the padded tile (it once found no config at all here)."""
    cache = paged_cache(gen, [context, 3], PAGE, 2, head_size, torch.float32)
    check(randn(gen, 2, 4, head_size, dtype=torch.float32), cache, max_context_len=context)


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_N": 16, "SPLITS": 1, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 32, "SPLITS": 2, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 16, "SPLITS": 4, "num_warps": 2, "num_stages": 2},
        {"BLOCK_N": 64, "SPLITS": 1, "num_warps": 8, "num_stages": 1},
    ],
    ids=lambda c: f"n{c['BLOCK_N']}-s{c['SPLITS']}",
)
def test_config_sweep(gen, config) -> None:  # type: ignore[no-untyped-def]
    """Tiles shorter and longer than a block, one split and several (some splits with no
    keys at all for the short sequences), all compute the same."""
    lens = [1, PAGE + 1, 0, 70]
    cache = paged_cache(gen, lens, PAGE, 2, 64, torch.bfloat16)
    check(randn(gen, len(lens), 4, 64, dtype=torch.bfloat16), cache, config=config)


@pytest.mark.parametrize(
    ("page", "lens", "config"),
    [
        (16, [1100, 2100, 5, 0], {"BLOCK_N": 64, "SPLITS": 1, "num_warps": 4, "num_stages": 2}),
        (16, [2100, 1100, 17], {"BLOCK_N": 32, "SPLITS": 2, "num_warps": 2, "num_stages": 3}),
        (5, [300, 777, 4], {"BLOCK_N": 16, "SPLITS": 1, "num_warps": 1, "num_stages": 2}),
        (5, [777, 300], {"BLOCK_N": 32, "SPLITS": 2, "num_warps": 2, "num_stages": 1}),
    ],
    ids=["page16-one-split", "page16-two-splits", "page5-one-split", "page5-two-splits"],
)
def test_splits_longer_than_a_table_chunk(gen, page, lens, config) -> None:  # type: ignore[no-untyped-def]
    """A split's whole tiles read their block numbers a chunk at a time (table_chunk: 1,024
    keys for 16-token blocks, 256 for 5-token ones, whose chunks start and end mid-block):
    splits of one chunk and several, a ragged tail after them, all compute the same."""
    cache = paged_cache(gen, lens, page, 1, 16, torch.float32)
    check(randn(gen, len(lens), 2, 16, dtype=torch.float32), cache, config=config)


@pytest.mark.parametrize(
    ("page", "lens", "config"),
    [
        (
            PAGE,
            [1, PAGE - 1, PAGE, PAGE + 1, 0, 70, 300],
            {"BLOCK_N": 16, "SPLITS": 1, "SLICES": 4, "num_warps": 4, "num_stages": 2},
        ),
        (
            PAGE,
            [1, PAGE - 1, PAGE, PAGE + 1, 0, 70, 300],
            {"BLOCK_N": 16, "SPLITS": 4, "SLICES": 2, "num_warps": 2, "num_stages": 1},
        ),
        (
            PAGE,
            [1100, 2100, 5, 0],
            {"BLOCK_N": 32, "SPLITS": 1, "SLICES": 4, "num_warps": 4, "num_stages": 3},
        ),
        (5, [300, 777, 4], {"BLOCK_N": 16, "SPLITS": 2, "SLICES": 2, "num_warps": 2, "num_stages": 2}),
    ],
    ids=["4-slices", "2-slices-4-splits", "4-slices-past-a-chunk", "page5-2-slices-2-splits"],
)
@pytest.mark.parametrize(
    ("head_size", "dtype"), [(64, torch.float32), (128, torch.bfloat16)], ids=["64-fp32", "128-bf16"]
)
def test_warp_slices_match_sdpa(gen, page, lens, config, head_size, dtype) -> None:  # type: ignore[no-untyped-def]
    """SLICES independent softmax states a program, merged at its end: with splits and
    without, sequences shorter than one step, empty ones, a ragged last step, chunks of the
    table that start mid-block."""
    cache = paged_cache(gen, lens, page, 2, head_size, dtype)
    check(randn(gen, len(lens), 8, head_size, dtype=dtype), cache, config=config)


def test_warp_slices_are_one_a_warp() -> None:
    """The Space offers SLICES > 1 only with as many warps, and counts a step's SLICES tiles
    in the per-thread and shared-memory rules."""
    configs = SPACE.candidates(args=llama_3_8b(batch=16, max_context_len=512))
    sliced = [c for c in configs if c["SLICES"] > 1]
    assert sliced and all(c["SLICES"] == c["num_warps"] and c["BLOCK_N"] >= 16 for c in sliced)
    assert {
        "MERGE_KERNEL": 0,
        "BLOCK_N": 16,
        "SPLITS": 1,
        "SLICES": 4,
        "num_warps": 4,
        "num_stages": 3,
        "TMA": 0,
    } in configs
    # 8 slices of 64 keys is 512 keys a step: one step of a 512-token context, nothing to pipeline
    assert not [c for c in sliced if c["SLICES"] * c["BLOCK_N"] > 512]
    assert not [c for c in sliced if c["num_stages"] > 1 and c["SLICES"] * c["BLOCK_N"] * c["SPLITS"] > 256]


@pytest.mark.parametrize(("page", "head_size"), [(1, 16), (5, 16), (5, 64), (16, 16), (16, 128)])
def test_no_step_crosses_a_chunk_of_the_table(page, head_size) -> None:  # type: ignore[no-untyped-def]
    """A step (SLICES tiles of BLOCK_N keys) longer than a chunk of block numbers would read
    past the register copy of the table (page 5 with 4 slices of 128 keys did, in review)."""
    from tunebook.kernels._attention import table_chunk

    args = {**llama_3_8b(batch=1, max_context_len=32768), "PAGE": page, "HEAD_SIZE": head_size}
    configs = SPACE.candidates(args=args)
    assert configs
    assert max(c["SLICES"] * c["BLOCK_N"] for c in configs) <= table_chunk(page)[0]


def llama_3_8b(**call: int) -> dict:  # type: ignore[type-arg]
    """The kernel's arguments the Space's rules read, for Llama-3-8B's heads and ``call``."""
    k_cache = torch.empty(0, dtype=torch.bfloat16)
    return {"NQ": 32, "NK": 8, "HEAD_SIZE": 128, "PAGE": 16, "k_cache_ptr": k_cache, **call}


def test_splits_are_in_the_space_and_chosen_per_key() -> None:
    """SPLITS is a tuned parameter, not a threshold: long contexts at small batches offer
    many (up to 256 for one sequence's 8 KV heads: 2,048 programs), large batches one."""
    long_few = SPACE.candidates(args=llama_3_8b(batch=1, max_context_len=32768))
    many_short = SPACE.candidates(args=llama_3_8b(batch=256, max_context_len=512))
    assert {c["SPLITS"] for c in long_few} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert {c["SPLITS"] for c in many_short} == {1}
    assert max_splits(1, 8, 32768) == 256 and max_splits(256, 8, 512) == 1


def test_pipelined_tiles_may_be_larger() -> None:
    """Pipelined configs (num_stages > 1) may hold more tile elements a thread than
    unpipelined ones (the H200 tuner picks 64-key tiles on 2 warps there)."""
    args = llama_3_8b(batch=64, max_context_len=8192)

    def per_thread(c: dict) -> float:  # type: ignore[type-arg]
        return c["BLOCK_N"] * c["SLICES"] * 128 / (32 * c["num_warps"])

    candidates = SPACE.candidates(args=args)
    unstaged = [per_thread(c) for c in candidates if c["num_stages"] == 1]
    staged = [per_thread(c) for c in candidates if c["num_stages"] > 1]
    assert max(unstaged) == MAX_TILE_PER_THREAD < max(staged) == MAX_STAGED_TILE_PER_THREAD
    assert {
        "MERGE_KERNEL": 0,
        "BLOCK_N": 64,
        "SPLITS": 4,
        "SLICES": 1,
        "num_warps": 2,
        "num_stages": 2,
        "TMA": 0,
    } in candidates


def test_too_many_sequences_fail_with_the_limit(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Sequences are the grid's second axis, which CUDA caps at 65,535 programs."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    monkeypatch.setattr(module, "MAX_BATCH", 1)
    with pytest.raises(ValueError, match=r"at most 1 sequences per call .* found 2: split the batch"):
        _call()


def test_split_buffers_keep_their_size_whatever_the_call(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A CUDA graph holds its buffers' addresses: once a layout's first split call has sized
    the workspace, no later call of that layout (any config its Space allows, or the
    hand-picked launch) and no call of another layout may reallocate it. (Sized per call, a
    larger batch after a captured smaller one moved the workspace, and the H200 replayed a
    graph into freed memory.)"""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    for name in ("_workspace", "_lse", "_counters"):
        fresh = module.Scratch(f"test.{name}", zeroed=name == "_counters")
        monkeypatch.setattr(module, name, fresh)
    first: dict[tuple[int, int], list[int]] = {}
    calls = [(1, 32768), (16, 128), (64, 512), (3, 2048), (100, 8192), (128, 8192), (9000, 512)]
    # Llama-3-8B, then Qwen2.5-7B (a larger buffer: it used to move Llama's), then Llama again,
    # in fp32 (partials in the output's dtype: an fp32 call must not grow a bf16 call's buffer).
    for n_q, n_kv, dtype in [(32, 8, torch.bfloat16), (28, 4, torch.bfloat16), (32, 8, torch.float32)]:
        group, head_size = n_q // n_kv, 128
        for batch, context in calls:
            q = torch.empty(batch, n_q, head_size, dtype=dtype)
            k_cache = torch.empty(2, PAGE, n_kv, head_size, dtype=dtype)
            table = torch.zeros(batch, context // PAGE, dtype=torch.int32)
            lens = torch.zeros(batch, dtype=torch.int32)
            call = {**llama_3_8b(batch=batch, max_context_len=context), "NQ": n_q, "NK": n_kv}
            for config in [None, hand_picked(call), first_guess(call), *SPACE.candidates(args=call)]:
                _, args = module._launch(q, k_cache, k_cache, table, lens, None, context, q, config)
                ws, lse, locks = args[18:21]
                splits = max_splits(batch, n_kv, context) if config is None else config["SPLITS"]
                if splits == 1:
                    continue  # SPLITS=1 never touches them
                assert lse.numel() >= batch * n_kv * splits * group
                assert ws.numel() >= lse.numel() * head_size and locks.numel() >= batch * n_kv
                buffers = [ws.data_ptr(), lse.data_ptr()]
                seen = first.setdefault((n_q, n_kv), buffers)
                assert buffers == seen, f"{n_q}/{n_kv}, batch {batch}, context {context}, {config}: moved"


def test_split_partials_land_in_their_own_slots(gen) -> None:  # type: ignore[no-untyped-def]
    """Each (sequence, KV head, split) program owns its workspace slot. Triton's interpreter
    runs one pair's splits back to back, so programs sharing slots would still give the right
    output here (not on a GPU): this reads the log-sum-exp every split left in the workspace,
    in place. The counters must be back at zero after the call (two pairs sharing a counter
    would only show on a GPU, where pairs run at once)."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    lens, n_q, n_kv, splits, block = [70, 0, 17], 4, 2, 4, 16
    cache = paged_cache(gen, lens, PAGE, n_kv, 64, torch.float32)
    q = randn(gen, len(lens), n_q, 64)
    check(q, cache, config={"BLOCK_N": block, "SPLITS": splits, "num_warps": 4, "num_stages": 1})
    lse = module._lse.get(q.device, 0, torch.float32, (n_q // n_kv, 64))  # this layout's buffer
    assert module._counters.get(q.device, 0, torch.int32).eq(0).all()
    log2_scale = 64**-0.5 * LOG2E
    no_score = torch.tensor(NO_SCORE.value, dtype=torch.float32).item()  # as the kernel stores it
    for (b, h, split, g), row, keys, _, scores in split_slots(cache, q, n_kv, splits, block):
        got = float(lse[row])
        if keys is None:
            assert got == no_score, (b, h, split, g)  # a split without keys
            continue
        want = float(torch.logsumexp(scores * log2_scale / LOG2E, 0) * LOG2E)  # log2 of sum 2^s
        assert got == pytest.approx(want, abs=1e-4), (b, h, split, g)


def split_slots(cache, q, n_kv, splits, block):  # type: ignore[no-untyped-def]
    """Per (sequence, KV head, split, query head) of a split call: its index, its workspace
    row, the keys and values its split read (None for a split that read none) and q . keys."""
    group = q.shape[1] // n_kv
    for b, n in enumerate(cache.lens):
        keys, values = cache.keys(b)
        tiles = -(-n // block)
        per_split = -(-tiles // splits) * block
        for h in range(n_kv):
            for split in range(splits):
                lo, hi = split * per_split, min(n, (split + 1) * per_split)
                for g in range(group):
                    row = ((b * n_kv + h) * splits + split) * group + g
                    if hi <= lo:
                        yield (b, h, split, g), row, None, None, None
                        continue
                    k, v = keys[lo:hi, h].double(), values[lo:hi, h].double()
                    yield (b, h, split, g), row, k, v, k @ q[b, h * group + g].double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("merge_kernel", "splits"),
    [(1, 4), (0, 4), (0, 32)],
    ids=["merge-kernel", "in-kernel", "in-kernel-groups"],
)
def test_split_partials_are_stored_in_the_outputs_dtype(gen, dtype, merge_kernel, splits) -> None:  # type: ignore[no-untyped-def]
    """Each split's normalized partial output lies in the fp32 workspace as the output's dtype
    (``_decode_merge._partials``: half the bytes of fp32 in bf16 and fp16), one row of
    BLOCK_D per (sequence, KV head, split, query head): read back as that dtype, every split
    that saw keys holds its softmax-weighted mean of the values it read, to a few steps of the
    dtype. Past 16 splits merged in the kernel, each group of TREE_GROUP splits leaves its
    merged partial after all of them, in that dtype too (rounded twice: twice the tolerance)."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    lens, n_q, n_kv, block, head = [600 if splits > 16 else 70, 33], 4, 2, 16, 64
    cache = paged_cache(gen, lens, PAGE, n_kv, head, dtype)
    q = randn(gen, len(lens), n_q, head).to(dtype)
    config = {
        "BLOCK_N": block,
        "SPLITS": splits,
        "MERGE_KERNEL": merge_kernel,
        "num_warps": 4,
        "num_stages": 1,
    }
    check(q, cache, config=config)
    ws = module._workspace.get(q.device, 0, torch.float32, (n_q // n_kv, head)).view(dtype)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5

    def holds(row, scores, values, steps, slot):  # type: ignore[no-untyped-def]
        got = ws[row * head : (row + 1) * head].double()
        if scores is None:
            assert got.eq(0).all(), slot  # no keys
            return
        want = (torch.softmax(scores * head**-0.5, 0) @ values).to(dtype).double()
        # The kernel rounds the softmax weights to the dtype before P @ V (as the output
        # does): a few steps of the dtype from the exact mean, not one.
        assert torch.allclose(got, want, rtol=4 * steps * eps, atol=steps * eps / 4), (
            slot,
            (got - want).abs().max(),
        )

    grouped = splits > MERGE_ONE_BY_ONE.value and not merge_kernel  # group partials written
    groups: dict[tuple[int, int, int, int], list] = {}
    for slot, row, _, values, scores in split_slots(cache, q, n_kv, splits, block):
        holds(row, scores, values, 1, slot)
        b, h, split, g = slot
        if grouped and scores is not None:
            groups.setdefault((b, h, split // TREE_GROUP.value, g), []).append((scores, values))
    if grouped:
        per_pair = splits // TREE_GROUP.value
        assert groups, "no group partial was checked"
        for (b, h, group, g), parts in groups.items():
            row = len(lens) * n_kv * splits + (b * n_kv + h) * per_pair + group
            scores, values = (torch.cat(t) for t in zip(*parts))
            holds(row * (n_q // n_kv) + g, scores, values, 2, (b, h, "group", group, g))


def test_the_first_guess_is_a_point_of_the_space_with_enough_programs() -> None:
    """Measured first by every search, it must be a candidate as is where its steps pipeline:
    splits until ~128 programs run (16 sequences of 8 KV heads need none; one needs 16)."""
    for batch, context, splits in [(16, 512, 1), (64, 512, 1), (1, 8192, 16), (4, 8192, 4), (1, 32768, 16)]:
        call = llama_3_8b(batch=batch, max_context_len=context)
        guess = first_guess(call)
        assert guess["SPLITS"] == splits, (batch, context, guess)
        assert guess in [dict(point) for point in SPACE.candidates(args=call)], (batch, context)


def test_on_a_tma_gpu_the_first_guess_is_a_tma_point_of_the_space(monkeypatch) -> None:
    """Where the process's GPU has TMA, the first guess reads a block a step through the
    descriptors, one warp, splits until about 1,024 programs run (each keeping 4 blocks);
    it is a candidate wherever the call's caches allow descriptors, and the op's own rule
    otherwise (a block size or head the boxes cannot take)."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    monkeypatch.setattr(module, "_tma_here", lambda: True)
    cache = torch.empty(4, PAGE, 8, 128, dtype=torch.float16)
    k_desc, _ = _descriptors(cache, cache)
    for batch, context, splits in [(16, 512, 8), (256, 2048, 1), (1, 32768, 128), (64, 128, 2)]:
        call = {**llama_3_8b(batch=batch, max_context_len=context), "k_cache_ptr": cache, "k_desc": k_desc}
        guess = first_guess(call)
        assert guess["TMA"] == 1 and guess["BLOCK_N"] == PAGE and guess["SPLITS"] == splits, (batch, context)
        assert guess in [dict(point) for point in SPACE.candidates(args=call)], (batch, context)
    assert first_guess({**llama_3_8b(batch=16, max_context_len=512), "PAGE": 8})["TMA"] == 0


def test_on_a_tma_gpu_the_first_guess_stays_in_the_space_at_a_servers_larger_blocks(monkeypatch) -> None:
    """Blocks of 128 and 256 tokens (a server's own; the books hold 16): the TMA guess takes
    the warps that keep a thread's staged tile within MAX_STAGED_TILE_PER_THREAD, and the
    stages shared memory holds (two at 256-token blocks of 128-wide heads)."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    monkeypatch.setattr(module, "_tma_here", lambda: True)
    expected = {(128, 64): (1, 3), (128, 128): (2, 3), (128, 256): (4, 2), (64, 256): (2, 3)}
    for (head, page), (warps, stages) in expected.items():
        cache = torch.empty(4, page, 8, head, dtype=torch.float16)
        k_desc, _ = _descriptors(cache, cache)
        call = {**llama_3_8b(batch=16, max_context_len=8192), "HEAD_SIZE": head, "PAGE": page}
        call.update(k_cache_ptr=cache, k_desc=k_desc)
        guess = first_guess(call)
        assert (guess["TMA"], guess["BLOCK_N"], guess["num_warps"], guess["num_stages"]) == (
            1,
            page,
            warps,
            stages,
        )
        assert guess in [dict(point) for point in SPACE.candidates(args=call)], (head, page)


def test_short_calls_of_64_and_128_wide_heads_get_tiles_spanning_a_splits_keys(monkeypatch) -> None:
    """At most 512 tokens (as bucketed) and SHORT_WORK (sequences x KV heads x tokens, as
    bucketed), with or without a TMA unit: one 2-D tile a split, at most 8 splits while the
    programs stay within 32 (heads of 128) or none (heads of 64) below 256 tokens and within
    256 from it, enough warps for 64 elements a thread; a point of the Space. More work, a
    longer context or another head size keeps the rules for longer calls."""
    module = importlib.import_module("tunebook.kernels.paged_attention_decode")
    expected = [  # (batch, context, head[, KV heads]): (BLOCK_N, SPLITS, num_warps), 8 KV heads unless said
        ((1, 128, 128), (32, 4, 2)),  # 8 programs: splits until 32 run
        ((4, 128, 128), (128, 1, 8)),  # 32 programs already
        ((1, 512, 128), (64, 8, 4)),  # each split keeps 64 keys
        ((4, 512, 128), (64, 8, 4)),  # 256 programs: 16,384 tokens of work, the most
        ((1, 128, 64), (128, 1, 4)),  # 64-wide heads: no split below 256 tokens
        ((1, 64, 64), (64, 1, 2)),
        ((1, 256, 64), (64, 4, 2)),  # from 256 tokens, as heads of 128: splits of 64 keys
        ((4, 512, 64), (64, 8, 2)),  # 32 programs: 8 splits, 256 programs
        ((1, 256, 64, 3), (64, 4, 2)),  # SmolLM2's 3 KV heads: 3 programs
        ((8, 512, 64, 3), (64, 8, 2)),  # 24 programs: 192 with 8 splits; 12,288 tokens of work
    ]
    for tma in (False, True):
        monkeypatch.setattr(module, "_tma_here", lambda tma=tma: tma)
        for (batch, context, head, *kv_heads), (block_n, splits, warps) in expected:
            call = {**llama_3_8b(batch=batch, max_context_len=context), "HEAD_SIZE": head}
            call["NK"] = kv_heads[0] if kv_heads else call["NK"]
            guess = first_guess(call)
            want = {"MERGE_KERNEL": int(splits > 1), "BLOCK_N": block_n, "SPLITS": splits, "SLICES": 1}
            want.update(num_warps=warps, num_stages=1, TMA=0)
            assert guess == want, (tma, batch, context, head, call["NK"])
            assert guess in [dict(point) for point in SPACE.candidates(args=call)], (batch, context, head)
        for call in (
            llama_3_8b(batch=16, max_context_len=512),  # 65,536 tokens of work
            llama_3_8b(batch=8, max_context_len=512),  # 32,768: just past SHORT_WORK
            llama_3_8b(batch=1, max_context_len=600),  # bucketed to 1,024 tokens
            {**llama_3_8b(batch=1, max_context_len=128), "HEAD_SIZE": 256},
        ):
            assert first_guess(call)["num_stages"] == 3, call  # the TMA or warp-slice rule


@pytest.mark.parametrize(
    "context, n_q, head, launch",
    [
        (100, 4, 128, (16, 8, 1)),  # bucket 128: 8 splits of 16 keys, one warp each
        (200, 3, 64, (64, 4, 2)),  # SmolLM2's head, bucket 256: 4 splits of 64 keys, 2 warps
    ],
)
def test_serve_mode_runs_the_spanning_tiles_guess(gen, context, n_q, head, launch) -> None:  # type: ignore[no-untyped-def]
    """Served without a book, a short call of a 64- or 128-wide head runs the first guess
    above: one sequence on one KV head in splits merged by the merge kernel, and matches
    SDPA."""
    cache = paged_cache(gen, [context], PAGE, 1, head, torch.bfloat16)
    q = randn(gen, 1, n_q, head, dtype=torch.bfloat16)
    out = poisoned(q.shape, q.dtype)
    lens = torch.tensor(cache.lens)
    paged_attention_decode(
        q, cache.k_cache, cache.v_cache, cache.block_table, lens, max_context_len=context, out=out
    )
    assert_close(out, reference(q, cache))
    cfg = _paged_attention_decode_kernel.best_config
    launched = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    guess = first_guess({"batch": 1, "NK": 1, "max_context_len": context, "HEAD_SIZE": head})
    assert (guess["BLOCK_N"], guess["SPLITS"], guess["num_warps"], guess["TMA"]) == (*launch, 0)
    assert launched == guess
    assert tunebook.stats()["benchmarked"] == 0 and tunebook.stats()["fallbacks"] == 1


def test_serve_mode_runs_the_ops_first_guess_the_warp_slices(gen) -> None:  # type: ignore[no-untyped-def]
    """Served without a book: the op's first guess, whose splits the merge kernel merges;
    the op launches it after the tuned kernel on the first call and on the hit after it."""
    cache = paged_cache(gen, [700], PAGE, 1, 64, torch.bfloat16)
    q = randn(gen, 1, 4, 64, dtype=torch.bfloat16)
    for _ in range(2):
        out = poisoned(q.shape, q.dtype)
        paged_attention_decode(
            q,
            cache.k_cache,
            cache.v_cache,
            cache.block_table,
            torch.tensor(cache.lens),
            max_context_len=700,
            out=out,
        )
        assert_close(out, reference(q, cache))
    cfg = _paged_attention_decode_kernel.best_config
    # one sequence of one KV head, past SHORT_CONTEXT: splits until each keeps two 64-key
    # steps of the bucket (1,024), merged by the merge kernel
    guess = first_guess({"batch": 1, "NK": 1, "max_context_len": 700, "HEAD_SIZE": 64})
    assert guess == {
        "MERGE_KERNEL": 1,
        "BLOCK_N": 16,
        "SPLITS": 8,
        "SLICES": 4,
        "num_warps": 4,
        "num_stages": 3,
        "TMA": 0,
    }
    assert {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} == guess
    assert tunebook.stats()["benchmarked"] == 0 and tunebook.stats()["fallbacks"] == 2  # both calls


def test_scale_strided_query_and_computed_max_len(gen) -> None:  # type: ignore[no-untyped-def]
    """q as a slice of a fused QKV output (strided batch and heads), an explicit scale, and
    max_context_len read from context_lens when omitted."""
    lens = [5, 33]
    cache = paged_cache(gen, lens, PAGE, 2, 64, torch.float32)
    qkv = randn(gen, 2, 4 + 2 + 2, 64)
    check(qkv[:, :4], cache, scale=0.05)


def test_sees_tokens_written_by_reshape_and_cache(gen) -> None:  # type: ignore[no-untyped-def]
    """A decode step as a server runs it: write the new token's K/V into its slot, then
    attend over the context that now includes it."""
    cache = paged_cache(gen, [PAGE], PAGE, 2, 64, torch.float32)  # one full block, spare ones
    new_block = next(b for b in range(cache.k_cache.shape[0]) if b not in cache.block_table)
    cache.block_table[0, 1] = new_block
    key, value = randn(gen, 1, 2, 64), randn(gen, 1, 2, 64)
    reshape_and_cache(key, value, cache.k_cache, cache.v_cache, torch.tensor([new_block * PAGE]))
    cache.lens = [PAGE + 1]
    k, v = cache.keys(0)
    assert torch.equal(k[-1], key[0]) and torch.equal(v[-1], value[0])
    check(randn(gen, 1, 4, 64), cache)


def test_empty_batch_launches_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    k_cache = randn(gen, 2, PAGE, 1, 64)
    table = torch.zeros(0, 4, dtype=torch.int32)
    out = paged_attention_decode(
        randn(gen, 0, 2, 64), k_cache, k_cache, table, torch.zeros(0, dtype=torch.int32)
    )
    assert out.shape == (0, 2, 64)
    assert tunebook.stats()["misses"] == 0


def test_a_table_of_no_blocks_with_empty_slots_reads_zeros(gen) -> None:  # type: ignore[no-untyped-def]
    """Every slot empty (context_lens 0) over a zero-width block table: it was refused as
    "holds 1 tokens, more than the block table holds (0 blocks ...)"."""
    k_cache = randn(gen, 2, PAGE, 1, 64)
    table, lens = torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    for bound in ({}, {"max_context_len": 0}):
        out = paged_attention_decode(randn(gen, 3, 2, 64), k_cache, k_cache.clone(), table, lens, **bound)
        assert torch.equal(out, torch.zeros(3, 2, 64))
    mine = poisoned((3, 2, 64), torch.float32)
    paged_attention_decode(randn(gen, 3, 2, 64), k_cache, k_cache.clone(), table, lens, out=mine)
    assert torch.equal(mine, torch.zeros(3, 2, 64))
    with pytest.raises(ValueError, match=r"context_lens holds 1 tokens, more than the block table holds \(0"):
        paged_attention_decode(randn(gen, 3, 2, 64), k_cache, k_cache.clone(), table, lens + 1)


def _call(**changes):  # type: ignore[no-untyped-def]
    max_context_len = changes.pop("max_context_len", 4)
    g = torch.Generator().manual_seed(0)
    args = {
        "q": randn(g, 2, 4, 64),
        "k_cache": randn(g, 3, PAGE, 2, 64),
        "v_cache": randn(g, 3, PAGE, 2, 64),
        "block_table": torch.zeros(2, 2, dtype=torch.int32),
        "context_lens": torch.tensor([3, 4], dtype=torch.int32),
    }
    args.update(changes)
    return paged_attention_decode(**args, max_context_len=max_context_len)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"q": torch.zeros(2, 3, 64)}, r"positive multiple of KV heads .* found 3 and 2"),
        ({"q": torch.zeros(2, 4, 64, dtype=torch.int32)}, "q must be float16, bfloat16 or float32"),
        ({"k_cache": torch.zeros(3, PAGE, 2, 32)}, "k_cache and v_cache must have one shape"),
        (
            {"k_cache": torch.zeros(3, PAGE, 2, 32), "v_cache": torch.zeros(3, PAGE, 2, 32)},
            r"\[num_blocks, block_size, 2, 64\] \(num_kv_heads, head_size\); found \(3, 16, 2, 32\)",
        ),
        (
            {"v_cache": torch.zeros(3, PAGE, 2, 64, dtype=torch.float16)},
            "v_cache must have q's dtype torch.float32; found torch.float16",
        ),
        # a cache of the wrong rank is named as such (it once read as -1 KV heads: "found 4 and -1")
        (
            {"k_cache": torch.zeros(3, 1, PAGE, 2, 64)},
            r"k_cache must have 4 dimensions; found shape \(3, 1, 16",
        ),
        (
            {"k_cache": torch.zeros(3 * PAGE, 2, 64)},
            r"k_cache must have 4 dimensions; found shape \(48, 2, 64\)",
        ),
        ({"block_table": torch.zeros(2, 2)}, "block_table must be a 2-D int32 or int64 tensor"),
        ({"context_lens": torch.tensor([3], dtype=torch.int32)}, "one row per sequence"),
        ({"max_context_len": 40}, "max_context_len=40, more than the block table holds"),
        # read from context_lens: the message names what the caller gave, not max_context_len
        (
            {"context_lens": torch.tensor([3, 40], dtype=torch.int32), "max_context_len": None},
            r"context_lens holds 40 tokens, more than the block table holds \(2 blocks of 16 tokens\)",
        ),
        ({"q": torch.zeros(2, 64, 4).transpose(1, 2)}, "last dimension must be contiguous"),
        # a NaN or infinite scale made every output NaN
        (
            {"scale": float("nan")},
            r"scale must be a finite number \(or None: head_size \*\* -0.5\); found nan",
        ),
        ({"scale": float("-inf")}, "scale must be a finite number .* found -inf"),
        # int() took these for a bound without a word
        (
            {"max_context_len": "9"},
            r"max_context_len must be a whole number of at least 0 \(or None: read from the lengths\); "
            "found a str",
        ),
        ({"max_context_len": 9.7}, "max_context_len must be a whole number .* found 9.7"),
        ({"max_context_len": -3}, "max_context_len must be a whole number .* found -3"),
        # a length one past the table: the bound is the table's tokens, inclusive
        (
            {"context_lens": torch.tensor([3, 33], dtype=torch.int32), "max_context_len": 32},
            r"context_lens\[1\] = 33 must be at most 32 \(a block-table row holds 2 blocks of 16",
        ),
    ],
)
def test_rejects_bad_inputs(changes, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        _call(**changes)


def test_a_length_read_inside_a_graph_capture_is_refused_with_what_to_pass(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Reading max_context_len from context_lens waits for the GPU, which a CUDA graph
    capture refuses with an opaque error that poisons the capture (seen on an H200)."""
    monkeypatch.setattr(importlib.import_module("tunebook.kernels._common"), "capturing", lambda device: True)
    with pytest.raises(
        ValueError,
        match=r"max_context_len is needed while a CUDA graph is being captured.*pass max_context_len=",
    ):
        _call(max_context_len=None)
    assert _call(max_context_len=4).isfinite().all()  # given, nothing is read


def test_no_programmatic_launch_off_a_cuda_gpu() -> None:
    """The merge kernel's PDL launch and the split kernel's signal are for compiled kernels on
    NVIDIA GPUs of compute capability 9 or later: never on the CPU or in the interpreter,
    whose launcher takes no ``launch_pdl``."""
    assert programmatic_launch(torch.device("cpu")) is False
