"""The splits' merge of ``paged_attention_decode``: the partials' workspace as the output's
dtype (``_partials``), the merge inside the split kernel (``_merge_last``: the last of a
(sequence, KV head)'s splits to arrive merges them, in two levels past MERGE_ONE_BY_ONE
splits) and the merge as a kernel of its own (``_merge_kernel``, launched after the split
kernel where the config says ``MERGE_KERNEL=1``), with the rules that size its programs
(``merge_warps``, ``merge_chunk``) and the grid object through which the op learns which
merge a config takes (``_Grid``). Both merges compute, per query head and in fp32::

    out = sum_s w_s o_s / sum_s w_s,    w_s = exp2(lse_s - max_s lse_s)

over the splits' normalized partial outputs ``o_s`` and base-2 log-sum-exps ``lse_s``.

The jitted helpers called by the split kernel (``_partials``, ``_merge_last``, ``_merged``,
``_store_heads``) are part of its page's hash: editing them, even a comment, starts a new
page. ``_merge_kernel`` is not (docs/kernels.md).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._attention import NO_SCORE


@triton.jit
def _partials(ws_ptr, out_ptr):
    """The workspace as the output's dtype: a split's partial output is stored rounded to it
    (fp32 only for fp32 outputs), as vLLM's paged attention v2 and FlashInfer store theirs,
    which halves the partials' round trip through memory; log-sum-exps stay fp32 and merges
    add in fp32 (measured in BENCHMARKS.md 5b, thirtieth session, and docs/kernels.md)."""
    return ws_ptr.to(tl.pointer_type(out_ptr.dtype.element_ty))


# fmt: off
# (the source as the shipped page was tuned with: its hash names the page)
@triton.jit
def _merge_last(
    ws_ptr,
    lse_ptr,
    lock_ptr,
    out_ptr,
    out_stride_b,
    out_stride_h,
    seq,
    kv_head,
    split,
    first,
    batch,
    d,
    d_mask,
    NK: tl.constexpr,
    G: tl.constexpr,
    MERGE_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """The merge inside the kernel: each split, its partial stored, bumps the (sequence, KV
    head) arrival counter; the last to arrive merges the splits, stores the output and
    resets the counter (in two levels past MERGE_ONE_BY_ONE splits)."""
    # Every thread's partial is stored before the (single-thread) release below.
    tl.debug_barrier()
    pair = seq * NK + kv_head
    out_row = out_ptr + seq * out_stride_b
    if SPLITS > MERGE_ONE_BY_ONE:
        # Two levels: the last of each TREE_GROUP splits merges them into a group
        # partial, the last group merges the groups. One program reading 32-64 partials
        # was most of such a call (BENCHMARKS.md 5b, twenty-second and twenty-fourth
        # sessions); at 16 splits the second arrival cost more than it saved.
        GROUPS: tl.constexpr = SPLITS // TREE_GROUP
        group = split // TREE_GROUP
        group_lock = lock_ptr + batch * NK + pair * GROUPS + group  # after the pairs' counters
        if tl.atomic_add(group_lock, 1, sem="acq_rel", scope="gpu") == TREE_GROUP - 1:
            row = batch * NK * SPLITS + pair * GROUPS + group  # after every split's partial
            merged, merged_lse = _merged(
                ws_ptr, lse_ptr, first + group * TREE_GROUP, d, G, MERGE_G, BLOCK_D, TREE_GROUP
            )
            m = tl.arange(0, MERGE_G)
            tl.store(
                ws_ptr + (row * G + m[:, None]) * BLOCK_D + d[None, :],
                merged.to(ws_ptr.dtype.element_ty),
                mask=(m < G)[:, None],
            )
            tl.store(lse_ptr + row * G + m, merged_lse, mask=m < G)
            tl.atomic_xchg(group_lock, 0)
            tl.debug_barrier()  # the group partial is stored before the release below
            lock = lock_ptr + pair
            if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == GROUPS - 1:
                groups_first = batch * NK * SPLITS + pair * GROUPS
                merged, _ = _merged(ws_ptr, lse_ptr, groups_first, d, G, MERGE_G, BLOCK_D, GROUPS)
                _store_heads(out_row, out_stride_h, kv_head, d, d_mask, merged, G, MERGE_G)
                tl.atomic_xchg(lock, 0)
    else:
        lock = lock_ptr + pair
        if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            merged, _ = _merged(ws_ptr, lse_ptr, first, d, G, MERGE_G, BLOCK_D, SPLITS)
            _store_heads(out_row, out_stride_h, kv_head, d, d_mask, merged, G, MERGE_G)
            tl.atomic_xchg(lock, 0)

# fmt: on

# Up to this many splits the last split merges them all, one partial a step; past it the
# merge takes two levels, groups of TREE_GROUP partials then the groups (BENCHMARKS.md 5b,
# twenty-fourth session: 0.62-0.83 of one level's time at 64 splits, 0.90-0.94 at 32, and
# 1.03-1.30 at 16).
MERGE_ONE_BY_ONE: tl.constexpr = tl.constexpr(16)
TREE_GROUP: tl.constexpr = tl.constexpr(8)


@triton.jit
def _merged(
    ws_ptr,
    lse_ptr,
    first,
    d,
    G: tl.constexpr,
    MERGE_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COUNT: tl.constexpr,
):
    """The merge of ``COUNT`` partials from row ``first`` on, in order, one a step:
    ``out = sum_s w_s o_s / sum_s w_s``, ``w_s = exp2(lse_s - max lse)`` (G at its power of
    two, not tl.dot's 16 rows), and its log-sum-exp ``max lse + log2(sum_s w_s)``. Reading
    several partials a step as one [chunk, G, head] load lost at 8 splits and won past 16
    (BENCHMARKS.md 5b, twenty-second session); past 16 the merge now takes two levels."""
    g = tl.arange(0, MERGE_G)
    # Every operand is [count, G, 1] or [count, G, head]: reductions stay in a thread.
    g3 = g[None, :, None]
    g3_mask = g3 < G
    s = tl.arange(0, COUNT)[:, None, None]
    # .cg reads L2, where the other programs' partials are, not a stale L1.
    lses = tl.load(lse_ptr + (first + s) * G + g3, mask=g3_mask, other=NO_SCORE, cache_modifier=".cg")
    top = tl.max(lses, 0)[None, :, :]
    weight = tl.sum(tl.exp2(lses - top), 0)
    total = tl.zeros([1, MERGE_G, BLOCK_D], dtype=tl.float32)
    for i in range(COUNT):
        part = (first + i) * G + g3
        w = tl.exp2(tl.load(lse_ptr + part, mask=g3_mask, other=NO_SCORE, cache_modifier=".cg") - top)
        total += w * tl.load(
            ws_ptr + part * BLOCK_D + d[None, None, :], mask=g3_mask, other=0.0, cache_modifier=".cg"
        ).to(tl.float32)
    lse = tl.reshape(top, [MERGE_G]) + tl.log2(tl.reshape(weight, [MERGE_G]))
    return tl.sum(total, 0) / weight, lse


@triton.jit
def _store_heads(out_row, out_stride_h, kv_head, d, d_mask, merged, G: tl.constexpr, MERGE_G: tl.constexpr):
    """A (sequence, KV head)'s merged output, its G query heads' rows."""
    g = tl.arange(0, MERGE_G)
    rows = out_row + (kv_head * G + g)[:, None] * out_stride_h + d[None, :]
    tl.store(rows, merged.to(out_row.dtype.element_ty), mask=(g < G)[:, None] & d_mask[None, :])


@triton.jit
def _merge_kernel(
    ws_ptr,
    lse_ptr,
    out_ptr,
    out_stride_b,
    out_stride_h,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    CHUNK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    """The splits' merge as a kernel of its own (``MERGE_KERNEL=1``), launched after the
    split kernel: a program takes CHUNK_D lanes of one (query head, sequence) and reads all
    of its SPLITS partials there at once, ``out = sum_s w_s o_s / sum_s w_s``,
    ``w_s = exp2(lse_s - max lse)`` (each program weighs all SPLITS log-sum-exps itself).
    The split programs then store their partials and end, with no barrier, no atomic and no
    last arrival reading the partials one L2 round trip at a time: with many splits of
    few sequences that was 1.1-3.3 us of a 13-17 us call on an H200 (BENCHMARKS.md 5b,
    twenty-fifth session), more than a second launch in a CUDA graph costs."""
    head = tl.program_id(0)
    seq = tl.program_id(1)
    G: tl.constexpr = NQ // NK
    s = tl.arange(0, SPLITS)
    d = tl.program_id(2) * CHUNK_D + tl.arange(0, CHUNK_D)
    # The partial rows of (sequence, KV head) start at (seq * NK + kv head) * SPLITS; each
    # holds G query heads' rows.
    rows = ((seq * NK + head // G) * SPLITS + s) * G + head % G
    if PDL:
        tl.extra.cuda.gdc_wait()  # the split kernel's partials, all written and visible
    lses = tl.load(lse_ptr + rows)
    weights = tl.exp2(lses - tl.max(lses, 0))
    parts = tl.load(_partials(ws_ptr, out_ptr) + rows[:, None] * BLOCK_D + d[None, :]).to(tl.float32)
    merged = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    out = out_ptr + seq * out_stride_b + head * out_stride_h + d
    tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=d < HEAD_SIZE)


# Partial values one warp of a _merge_kernel program holds (128 a thread, widened to fp32 in
# registers). This, MERGE_PROGRAMS and the rules below were measured with fp32 partials in
# memory (sessions 27 and 29); bf16 partials halve the bytes each program reads, which the
# rules have not been re-measured for.
WARP_PARTIALS = 4096


def merge_warps(splits: int, lanes: int) -> int:
    """Warps of a _merge_kernel program, which holds SPLITS x ``lanes`` partial floats: one
    up to WARP_PARTIALS, then one more power of two per doubling. Timed alone on an H200
    (128-wide heads, 1-256 sequences, 2-64 splits), one warp was fastest up to 32 splits
    and two at 64; the four the page was tuned with took 1.02-3.43x one warp's time
    (geomean 1.34), up to 8.9 us more a call (BENCHMARKS.md 5b, twenty-seventh session)."""
    return min(8, max(1, splits * lanes // WARP_PARTIALS))


# The merge kernel runs on about this many programs (one an SM of an H100/H200) where a pair
# has more partials than one warp's WARP_PARTIALS: while (query head, sequence) pairs are
# fewer, each pair's head is cut in halves, down to MERGE_CHUNK_LEAST lanes. One sequence's
# 8-32 query heads otherwise left 8-32 programs reading 32-128 KiB of fp32 partials each at
# 64-256 splits; cut so, the long-context calls of 1-16 sequences ran 1.05x faster at the
# same split config (geomean over 54 config-cells, 0.88-1.38x; BENCHMARKS.md 5b,
# twenty-ninth session). Cutting them only to a warp's partials lost 2-6% at 64 splits,
# and cutting a warp's partials or fewer (8-32 splits) lost 1-2%.
MERGE_PROGRAMS = 128
MERGE_CHUNK_LEAST = 16


def merge_chunk(pairs: int, splits: int, block_d: int) -> int:
    """Lanes of the head a _merge_kernel program merges, for ``pairs`` (query head,
    sequence) pairs of ``splits`` partials: the whole (padded) head where a pair's partials
    fit one warp (WARP_PARTIALS floats), else halved while the programs are fewer than
    MERGE_PROGRAMS and a half keeps MERGE_CHUNK_LEAST lanes."""
    chunk = block_d
    if splits * block_d <= WARP_PARTIALS:
        return chunk
    while pairs * (block_d // chunk) < MERGE_PROGRAMS and chunk // 2 >= MERGE_CHUNK_LEAST:
        chunk //= 2
    return chunk


def _merge(
    ws: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, n_kv: int, block_d: int, splits: int, pdl: bool
) -> None:
    """Launch _merge_kernel over ``out`` ([batch, NQ, head_size]) from the workspace; ``pdl``:
    the split kernel's ``PDL`` (:func:`programmatic_launch`, decided once a call)."""
    batch, n_q, head_size = out.shape
    chunk = merge_chunk(batch * n_q, splits, block_d)
    warps = merge_warps(splits, chunk)
    launch = {"launch_pdl": True} if pdl else {}  # an option the interpreter does not take
    _merge_kernel[(n_q, batch, block_d // chunk)](
        ws, lse, out, out.stride(0), out.stride(1), n_q, n_kv, head_size, block_d, splits, chunk, int(pdl),
        num_warps=warps, **launch,
    )  # fmt: skip


def _merge_splits(meta: dict[str, Any]) -> int:
    """The splits the merge kernel merges after a launch with this config: 0 where there is
    nothing for it (one split, or the merge inside the split kernel)."""
    splits = int(meta["SPLITS"])
    return splits if splits > 1 and meta.get("MERGE_KERNEL", 0) else 0


def _merge_hook(args: dict[str, Any], exception: BaseException | None = None) -> None:
    """The tuner's ``post_hook``: a config that merges in a kernel of its own is timed (and
    checked) with that kernel's launch. ``args``: the split kernel's named arguments and the
    config."""
    splits = _merge_splits(args)
    if exception is None and splits:
        _merge(
            args["ws_ptr"], args["lse_ptr"], args["out_ptr"], args["NK"], args["BLOCK_D"], splits, args["PDL"]
        )


class _Grid:
    """The split kernel's grid, which also notes whether the config launched with it merges
    in a kernel of its own: Triton asks for the grid with the config's meta-parameters on
    every path (tuned, served, explicit), so the op learns the book's choice from it."""

    def __init__(
        self, n_kv: int, batch: int, ws: torch.Tensor, lse: torch.Tensor, block_d: int, pdl: bool
    ) -> None:
        self.n_kv, self.batch, self.ws, self.lse, self.block_d, self.pdl = n_kv, batch, ws, lse, block_d, pdl
        self.merge_splits = 0

    def __call__(self, meta: dict[str, Any]) -> tuple[int, int, int]:
        # Some paths ask for every candidate's grid first (a miss recorded in serve mode);
        # the launch asks last, with the config it launches, and that call decides.
        self.merge_splits = _merge_splits(meta)
        return (self.n_kv, self.batch, meta["SPLITS"])

    def merge(self, out: torch.Tensor) -> None:
        """After the split kernel's launch: its merge, where its config has one of its own."""
        if self.merge_splits:
            _merge(self.ws, self.lse, out, self.n_kv, self.block_d, self.merge_splits, self.pdl)
