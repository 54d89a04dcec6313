"""Which paged-decode kernel structure reaches SDPA at batch >= 8: the study behind the decode kernel.

Variants of ``paged_attention_decode``'s kernel at the same configs, bf16, blocks of 16
tokens shuffled in the cache, each timed as CUDA-graph replays; per shape the best config of
each variant is re-timed against ``scaled_dot_product_attention`` on contiguous K/V in
interleaved rounds (ratios > 1: the variant is faster than SDPA):

  cur    the pack's kernel through its API (in runs 1-3 still sequence-first: grid
         (sequence, KV head, split); it has since become "hf")
  hf     heads first: grid (KV head, sequence, split), so the programs running together read
         the same cache rows' neighbouring heads (one 2 KiB token row instead of 256 B of it)
  hfp    hf, one block-table load per tile for K and V, no head-size mask when it is a power of
         2, and each tile's block numbers loaded one tile ahead
  hfs    hfp on a cache whose blocks are in order (identity block table): what shuffled blocks cost
  hfw    hf, keys loaded [BLOCK_N, head] and transposed in registers
  hfe    hf, keys and values loaded with evict_first (streamed, not kept in L2)
  tma    hf with K and V read by the TMA unit one cache block at a time (3-D tensor
         descriptors over the caches; BLOCK_N / block_size blocks per loop step): the
         structure that took linear from 0.75-0.81 to 0.90-1.01 of cuBLAS (run 4: slower
         at every shape)
  vm     hf on a flat grid (sequence * NK + KV head, split: no 65,535-sequence limit), the
         last split merging CHUNK partials a step as one [CHUNK, G, head] load (G padded to
         a power of 2, not to tl.dot's 16 rows) instead of one partial per L2 round trip:
         the merge is a serial tail after every split, and at 16-64 splits it is most of
         what keeps the tuner from choosing more splits (run 5: slower)
  hu     hf, the last split's merge unrolled MERGE_STEP = 16 partials a step (loads issued
         together, one L2 round trip a step, in the pack's [G, head] layout)
  he     hu, plus splits cut from the call's max_context_len rather than the sequence's
         own length, so a split's first block numbers are read beside that length
         (unsafe for a loose upper bound: a CUDA graph's bucketed max leaves splits empty)
Pipelined configs may hold up to 256 tile elements a thread (what the pack now allows). The
study kernel repeats the pack kernel's body so that each variant is one flag away from it;
the pack's kernel itself is not touched (editing it invalidates its shipped page). Runs 1-2
compared "cur", "hf", "hfp"/"hfs" (and "hfx", hfp without the early table load) under the
old 64-element bound; run 3 "hf", "hfw", "hfe"; run 4 "cur" against "tma" (BENCHMARKS.md,
section 5b); run 5 "cur" against "vm"; run 6 "cur", "hu", "he" on the cells below SDPA at
batch >= 8; run 7 (as the script stands) "cur" against "hu" on long contexts at 1-16
sequences, with the pack's SPLITS list extended to 128 and 256 in a copy for that run
(neither won a shape).

    python benchmarks/kernels/decode_structures.py OUT_DIR      # one GPU, ~4 min
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import _timing
import torch
import triton
import triton.language as tl

from tunebook.kernels import _models
from tunebook.kernels._attention import NO_SCORE, normalized
from tunebook.kernels._decode_merge import _partials
from tunebook.kernels._gemm_common import mma

pad = importlib.import_module("tunebook.kernels.paged_attention_decode")

LAYOUTS = {"32/8": (32, 8, 128), "16/2": (16, 2, 128), "8/1": (8, 1, 128)}
SHAPES = [  # layout, batch, context: run 7, long contexts at 1-16 sequences, and split cells
    ("8/1", 1, 32768),
    ("8/1", 1, 8192),
    ("16/2", 1, 32768),
    ("32/8", 1, 32768),
    ("8/1", 4, 32768),
    ("8/1", 16, 8192),
    ("16/2", 16, 2048),
    ("32/8", 16, 512),
]
VARIANTS = ["cur", "hu"]  # earlier runs: "hf", "hfx", "hfp", "hfs", "hfw", "hfe", "tma", "vm", "he"
CONFIGS = [
    {"BLOCK_N": n, "SPLITS": s, "num_warps": w, "num_stages": st}
    for n, s, w, st in itertools.product([64, 128], [1, 2, 4, 8, 16, 32, 64], [2, 4, 8], [1, 2, 3])
]


@triton.jit
def _tiles(
    acc, m_i, l_i, q, lo, hi, k_base, v_base, row_stride, block_stride, table_row, qk_scale, d, d_mask,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PAGE: tl.constexpr,
    DOT: tl.constexpr, EVEN_D: tl.constexpr, PREFETCH: tl.constexpr, TRANS_K: tl.constexpr,
    EVICT: tl.constexpr, first_block=None,
):  # fmt: skip
    if PREFETCH:
        if first_block is None:
            j0 = lo + tl.arange(0, BLOCK_N)
            block = tl.load(table_row + j0 // PAGE, mask=j0 < hi, other=0)
        else:
            block = first_block
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        inside = j < hi
        if PREFETCH:
            # The next tile's blocks are asked for before this tile's keys: the table's
            # latency leaves the chain from one tile's keys to the next's.
            cur_block = block
            block = tl.load(table_row + (j + BLOCK_N) // PAGE, mask=j + BLOCK_N < hi, other=0)
        elif MASKED:
            cur_block = tl.load(table_row + j // PAGE, mask=inside, other=0)
        else:
            cur_block = tl.load(table_row + j // PAGE)
        off = cur_block.to(tl.int64) * block_stride + (j % PAGE).to(tl.int64) * row_stride
        if MASKED:
            k_t = tl.load(
                k_base + off[None, :] + d[:, None], mask=inside[None, :] & d_mask[:, None], other=0.0
            )
            v = tl.load(v_base + off[:, None] + d[None, :], mask=inside[:, None] & d_mask[None, :], other=0.0)
        elif TRANS_K:
            k_t = tl.trans(tl.load(k_base + off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0))
            v = tl.load(v_base + off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        elif EVICT:
            k_t = tl.load(k_base + off[None, :] + d[:, None], mask=d_mask[:, None], other=0.0,
                          eviction_policy="evict_first")  # fmt: skip
            v = tl.load(v_base + off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
        elif EVEN_D:
            k_t = tl.load(k_base + off[None, :] + d[:, None])
            v = tl.load(v_base + off[:, None] + d[None, :])
        else:
            k_t = tl.load(k_base + off[None, :] + d[:, None], mask=d_mask[:, None], other=0.0)
            v = tl.load(v_base + off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        s = mma(q, k_t, tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32), DOT) * qk_scale
        if MASKED:
            s = tl.where(inside[None, :], s, float("-inf"))
        acc, m_i, l_i = _fold(acc, m_i, l_i, s, v, DOT)
    return acc, m_i, l_i


@triton.jit
def _fold(acc, m_i, l_i, s, v, DOT: tl.constexpr):
    """One tile's scores ``s`` (base 2) and values ``v`` into the online softmax state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
    return acc, m_new, l_i


@triton.jit
def _program(q_ptr, q_stride_b, q_stride_h, NK: tl.constexpr, G: tl.constexpr, HEAD_SIZE: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr):  # fmt: skip
    """This program's (KV head, sequence, split), its query heads' rows and their queries.
    Grid (KV head, sequence, split), or with FLAT (sequence * NK + KV head, split): the KV
    head still fastest, and no 65,535-sequence limit (CUDA's on a grid's second axis)."""
    if FLAT:
        kv_head = tl.program_id(0) % NK
        seq = tl.program_id(0) // NK
        split = tl.program_id(1)
    else:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    heads = kv_head * G + g
    q = tl.load(
        q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    return kv_head, seq, split, g, d, g_mask, d_mask, heads, q


@triton.jit(do_not_specialize=["batch", "max_context_len"])
def _study_kernel(
    q_ptr, q_stride_b, q_stride_h, k_cache_ptr, v_cache_ptr, stride_b, stride_s, stride_h,
    table_ptr, table_stride, lens_ptr, out_ptr, out_stride_b, out_stride_h, ws_ptr, lse_ptr, lock_ptr,
    qk_scale, batch, max_context_len,
    NQ: tl.constexpr, NK: tl.constexpr, HEAD_SIZE: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, EVEN_D: tl.constexpr, PREFETCH: tl.constexpr, TRANS_K: tl.constexpr,
    EVICT: tl.constexpr, FLAT: tl.constexpr, MERGE_G: tl.constexpr, CHUNK: tl.constexpr,
    UNROLL: tl.constexpr = False, EARLY: tl.constexpr = False,
):  # fmt: skip
    G: tl.constexpr = NQ // NK
    kv_head, seq, split, g, d, g_mask, d_mask, heads, q = _program(
        q_ptr, q_stride_b, q_stride_h, NK, G, HEAD_SIZE, BLOCK_G, BLOCK_D, FLAT
    )
    table_row = table_ptr + seq.to(tl.int64) * table_stride
    if EARLY:
        # Splits cut from the call's longest context, so a split's first keys are known
        # before its own length is: their block numbers are asked for beside the length.
        per_split = tl.cdiv(tl.cdiv(max_context_len, BLOCK_N), SPLITS) * BLOCK_N
        lo = split * per_split
        j0 = lo + tl.arange(0, BLOCK_N)
        first_block = tl.load(table_row + j0 // PAGE, mask=j0 < max_context_len, other=0)
        context = tl.maximum(tl.load(lens_ptr + seq), 0)
    else:
        context = tl.maximum(tl.load(lens_ptr + seq), 0)
        per_split = tl.cdiv(tl.cdiv(context, BLOCK_N), SPLITS) * BLOCK_N
        lo = split * per_split
        first_block = None
    hi = tl.minimum(context, lo + per_split)
    full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NO_SCORE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    k_base = k_cache_ptr + kv_head * stride_h
    v_base = v_cache_ptr + kv_head * stride_h
    acc, m_i, l_i = _tiles(
        acc, m_i, l_i, q, lo, full, k_base, v_base, stride_s, stride_b, table_row, qk_scale, d, d_mask,
        BLOCK_G, BLOCK_N, False, PAGE, DOT, EVEN_D, PREFETCH, TRANS_K, EVICT, first_block,
    )  # fmt: skip
    acc, m_i, l_i = _tiles(
        acc, m_i, l_i, q, full, hi, k_base, v_base, stride_s, stride_b, table_row, qk_scale, d, d_mask,
        BLOCK_G, BLOCK_N, True, PAGE, DOT, EVEN_D, PREFETCH, TRANS_K, EVICT,
    )  # fmt: skip
    _finish(acc, m_i, l_i, seq, kv_head, split, heads, g, d, g_mask, d_mask, out_ptr, out_stride_b,
            out_stride_h, ws_ptr, lse_ptr, lock_ptr, NK, G, BLOCK_G, BLOCK_D, SPLITS, MERGE_G,
            CHUNK, UNROLL)  # fmt: skip


@triton.jit
def _finish(
    acc, m_i, l_i, seq, kv_head, split, heads, g, d, g_mask, d_mask, out_ptr, out_stride_b, out_stride_h,
    ws_ptr, lse_ptr, lock_ptr, NK: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, MERGE_G: tl.constexpr = 0, CHUNK: tl.constexpr = 1,
    UNROLL: tl.constexpr = False,
):  # fmt: skip
    """The pack kernel's epilogue: store the output, or the split's partial and, in the
    last split to arrive, the merge: one split at a time (MERGE_G == 0, as the pack does),
    or CHUNK splits a step as [CHUNK, MERGE_G, BLOCK_D] loads, MERGE_G the group padded to
    a power of 2 (not to tl.dot's 16 rows), so the merge waits on SPLITS / CHUNK round trips
    to L2 instead of SPLITS."""
    out_rows = out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        tl.store(out_rows, normalized(acc, l_i).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        first = (seq * NK + kv_head) * SPLITS
        ws_ptr = _partials(ws_ptr, out_ptr)  # partials in the output's dtype, as the pack stores them
        part = ws_ptr + ((first + split) * G + g[:, None]) * BLOCK_D + d[None, :]
        tl.store(part, normalized(acc, l_i).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), NO_SCORE)
        tl.store(lse_ptr + (first + split) * G + g, lse, mask=g_mask)
        tl.debug_barrier()
        lock = lock_ptr + seq * NK + kv_head
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            if MERGE_G > 0:
                _merge_chunks(lse_ptr, ws_ptr, out_ptr, out_stride_b, out_stride_h, seq, kv_head, first, d,
                              d_mask, G, BLOCK_D, SPLITS, MERGE_G, CHUNK)  # fmt: skip
            else:
                s = tl.arange(0, SPLITS)
                lses = tl.load(lse_ptr + (first + s[:, None]) * G + g[None, :], mask=g_mask[None, :],
                               other=NO_SCORE, cache_modifier=".cg")  # fmt: skip
                top = tl.max(lses, 0)
                total = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
                weight = tl.zeros([BLOCK_G], dtype=tl.float32)
                if UNROLL:  # MERGE_STEP partials asked for at once: one L2 round trip each step
                    STEP: tl.constexpr = min(SPLITS, 16)
                    for i0 in range(0, SPLITS, STEP):
                        for i in tl.static_range(STEP):
                            total, weight = _merge_one(total, weight, top, lse_ptr, ws_ptr, first + i0 + i, g,
                                                       g_mask, d, G, BLOCK_D)  # fmt: skip
                else:
                    for i in range(SPLITS):
                        total, weight = _merge_one(total, weight, top, lse_ptr, ws_ptr, first + i, g, g_mask,
                                                   d, G, BLOCK_D)  # fmt: skip
                tl.store(out_rows, (total / weight[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock, 0)


@triton.jit
def _merge_one(total, weight, top, lse_ptr, ws_ptr, part, g, g_mask, d, G: tl.constexpr,
               BLOCK_D: tl.constexpr):  # fmt: skip
    """Partial ``part`` (a row of G query heads) folded into the merge's running sums."""
    w = tl.exp2(tl.load(lse_ptr + part * G + g, mask=g_mask, other=NO_SCORE, cache_modifier=".cg") - top)
    o = tl.load(ws_ptr + (part * G + g[:, None]) * BLOCK_D + d[None, :], mask=g_mask[:, None], other=0.0,
                cache_modifier=".cg").to(tl.float32)  # fmt: skip
    return total + w[:, None] * o, weight + w


@triton.jit
def _merge_chunks(
    lse_ptr, ws_ptr, out_ptr, out_stride_b, out_stride_h, seq, kv_head, first, d, d_mask, G: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, MERGE_G: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """out = sum_s w_s o_s / sum_s w_s over the pair's SPLITS partials, CHUNK at a time, in
    split order (the same bits whichever program merges)."""
    g = tl.arange(0, MERGE_G)
    g_mask = g < G
    s = tl.arange(0, SPLITS)
    lses = tl.load(lse_ptr + (first + s[:, None]) * G + g[None, :], mask=g_mask[None, :], other=NO_SCORE,
                   cache_modifier=".cg")  # fmt: skip
    top = tl.max(lses, 0)
    c = tl.arange(0, CHUNK)
    total = tl.zeros([MERGE_G, BLOCK_D], dtype=tl.float32)
    weight = tl.zeros([MERGE_G], dtype=tl.float32)
    for i0 in tl.static_range(0, SPLITS, CHUNK):
        rows = (first + i0 + c[:, None]) * G + g[None, :]  # [CHUNK, MERGE_G]
        w = tl.exp2(tl.load(lse_ptr + rows, mask=g_mask[None, :], other=NO_SCORE, cache_modifier=".cg")
                    - top[None, :])  # fmt: skip
        o = tl.load(ws_ptr + rows[:, :, None] * BLOCK_D + d[None, None, :], mask=g_mask[None, :, None],
                    other=0.0, cache_modifier=".cg").to(tl.float32)  # fmt: skip
        total += tl.sum(w[:, :, None] * o, 0)
        weight += tl.sum(w, 0)
    heads = kv_head * G + g
    out_rows = out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + d[None, :]
    tl.store(out_rows, (total / weight[:, None]).to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit
def _page(acc, m_i, l_i, q, k_desc, v_desc, block, col, first_key, context, qk_scale, BLOCK_G: tl.constexpr,
          PAGE: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Fold one cache block (PAGE keys) into the online softmax, K and V read by the TMA unit."""
    k = k_desc.load([block, 0, col]).reshape(PAGE, BLOCK_D)
    v = v_desc.load([block, 0, col]).reshape(PAGE, BLOCK_D)
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_G, PAGE], dtype=tl.float32), DOT) * qk_scale
    if MASKED:  # the last, partly filled block: its unused slots may hold anything, NaN included
        inside = first_key + tl.arange(0, PAGE) < context
        s = tl.where(inside[None, :], s, float("-inf"))
        v = tl.where(inside[:, None], v, 0.0)
    return _fold(acc, m_i, l_i, s, v, DOT)


@triton.jit(do_not_specialize=["batch", "max_context_len", "num_blocks"])
def _study_tma_kernel(
    q_ptr, q_stride_b, q_stride_h, k_cache_ptr, v_cache_ptr, num_blocks, stride_b, stride_s,
    table_ptr, table_stride, lens_ptr, out_ptr, out_stride_b, out_stride_h, ws_ptr, lse_ptr, lock_ptr,
    qk_scale, batch, max_context_len,
    NQ: tl.constexpr, NK: tl.constexpr, HEAD_SIZE: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr, PAGES: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """hf with K and V read block by block through 3-D tensor descriptors over the caches
    ([num_blocks, PAGE, NK * HEAD_SIZE], one box = one block's PAGE rows of one head), PAGES
    blocks per loop step; splits take whole steps. HEAD_SIZE must be a power of 2. The grid
    is flat, (sequence * NK + KV head, split), as a port into the pack would launch it."""
    G: tl.constexpr = NQ // NK
    kv_head, seq, split, g, d, g_mask, d_mask, heads, q = _program(
        q_ptr, q_stride_b, q_stride_h, NK, G, HEAD_SIZE, BLOCK_G, BLOCK_D, True
    )
    # (The shapes written out in each call: a list held in a variable does not reach the
    # compiler as one.)
    k_desc = tl.make_tensor_descriptor(
        k_cache_ptr, shape=[num_blocks, PAGE, NK * HEAD_SIZE], strides=[stride_b, stride_s, 1],
        block_shape=[1, PAGE, BLOCK_D],
    )  # fmt: skip
    v_desc = tl.make_tensor_descriptor(
        v_cache_ptr, shape=[num_blocks, PAGE, NK * HEAD_SIZE], strides=[stride_b, stride_s, 1],
        block_shape=[1, PAGE, BLOCK_D],
    )  # fmt: skip
    context = tl.maximum(tl.load(lens_ptr + seq), 0)
    STEP: tl.constexpr = PAGES * PAGE
    per_split = tl.cdiv(tl.cdiv(context, STEP), SPLITS) * STEP
    lo = split * per_split
    hi = tl.minimum(context, lo + per_split)
    full = lo + tl.maximum(hi - lo, 0) // STEP * STEP  # keys of whole steps; a ragged step after
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NO_SCORE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * table_stride
    col = kv_head * HEAD_SIZE
    for start in range(lo, full, STEP):
        for i in tl.static_range(PAGES):
            block = tl.load(table_row + start // PAGE + i).to(tl.int32)
            acc, m_i, l_i = _page(acc, m_i, l_i, q, k_desc, v_desc, block, col, start + i * PAGE, context,
                                  qk_scale, BLOCK_G, PAGE, BLOCK_D, DOT, False)  # fmt: skip
    for first_key in range(full, hi, PAGE):  # the ragged step, block by block, masked
        block = tl.load(table_row + first_key // PAGE).to(tl.int32)
        acc, m_i, l_i = _page(acc, m_i, l_i, q, k_desc, v_desc, block, col, first_key, context,
                              qk_scale, BLOCK_G, PAGE, BLOCK_D, DOT, True)  # fmt: skip
    _finish(acc, m_i, l_i, seq, kv_head, split, heads, g, d, g_mask, d_mask, out_ptr, out_stride_b,
            out_stride_h, ws_ptr, lse_ptr, lock_ptr, NK, G, BLOCK_G, BLOCK_D, SPLITS)  # fmt: skip


def fits(cfg, layout, batch, context, variant="hf"):
    """The pack's Space rules for this call; for "tma" all but the per-thread tile bound (its
    tiles never sit in registers whole: one block per box)."""
    _, n_kv, hs = LAYOUTS[layout]
    # The study's kernels merge splits in-kernel, in one softmax state, without TMA: the pack's
    # parameters added since (MERGE_KERNEL, SLICES, TMA) at those values.
    cfg = {"MERGE_KERNEL": 0, "SLICES": 1, "TMA": 0, **cfg}
    args = {"HEAD_SIZE": hs, "max_context_len": context, "batch": batch, "NK": n_kv,
            "k_cache_ptr": torch.empty(0, dtype=torch.bfloat16)}  # fmt: skip
    if variant != "tma":
        return pad._feasible(cfg) and pad._fits_call(cfg, args)
    return (
        cfg["BLOCK_N"] <= 64 and cfg["BLOCK_N"] % 16 == 0 and pad._feasible(cfg) and pad.fits_work(cfg, args)
    )


def build(layout, batch, context, device="cuda", dtype=torch.bfloat16):
    n_q, n_kv, hs = LAYOUTS[layout]
    shape = {"n_q": n_q, "n_kv": n_kv, "head_size": hs, "page": 16, "context": context}
    w = _models.workload("paged_attention_decode", shape, batch, dtype, device)
    return w.tensors


def ragged(t, lens):
    """Make the batch ragged, as a server's is: sequence b keeps its first ``lens[b]`` tokens,
    table entries past them become -1 and every cache slot no sequence owns is NaN, so a
    kernel that reads past a sequence's end fails loudly."""
    kc, vc, table = t["k_cache"], t["v_cache"], t["block_table"]
    page = kc.shape[1]
    owned = torch.zeros(kc.shape[:2], dtype=torch.bool, device=kc.device)
    for b, n in enumerate(lens):
        blocks = -(-n // page)
        for i in range(blocks):
            owned[int(table[b, i]), : min(page, n - i * page)] = True
        table[b, blocks:] = -1
    kc[~owned] = float("nan")
    vc[~owned] = float("nan")
    t["context_lens"].copy_(torch.tensor(lens, dtype=t["context_lens"].dtype))
    return t


def calls(t, cfg, variant, context):
    """A no-argument launch of ``variant`` at ``cfg`` on tensors ``t`` (and its output)."""
    q, kc, vc, table, lens = (t[n] for n in ("q", "k_cache", "v_cache", "block_table", "context_lens"))
    out = torch.empty_like(q)
    if variant == "cur":

        def run():
            pad._paged_attention_decode(q, kc, vc, table, lens, None, context, out, cfg)

        return run, out
    _, args = pad._launch(q, kc, vc, table, lens, None, context, out, cfg)
    # By the pack kernel's argument names, not positions: an argument added to the kernel
    # shifted a positional unpacking here once (the twenty-third session's merge arguments).
    a = dict(zip(pad._paged_attention_decode_kernel.fn.arg_names, args))
    wanted = (
        "q_stride_b q_stride_h k_stride_b k_stride_s k_stride_h table_stride out_stride_b out_stride_h "
        "ws_ptr lse_ptr lock_ptr qk_scale batch max_context_len NQ NK HEAD_SIZE PAGE BLOCK_G BLOCK_D DOT"
    )
    (qsb, qsh, sb, ss, sh, tstride, osb, osh, ws, lse, locks,
     scale, b, mcl, n_q, n_kv, hs, page, bg, bd, dot) = (a[n] for n in wanted.split())  # fmt: skip
    if variant == "tma":
        # What the descriptors assume: one box per block of one head, 16-byte aligned rows.
        assert cfg["BLOCK_N"] % page == 0 and bd == hs, "whole blocks per step, a power-of-2 head"
        assert tuple(vc.stride()) == tuple(kc.stride()) and sh == hs, "K and V laid out alike"
        assert (ss * kc.element_size()) % 16 == 0 and kc.data_ptr() % 16 == vc.data_ptr() % 16 == 0

        def run_tma():
            _study_tma_kernel[(n_kv * q.shape[0], cfg["SPLITS"])](
                q, qsb, qsh, kc, vc, kc.shape[0], sb, ss, table, tstride, lens, out, osb, osh, ws, lse,
                locks, scale, b, mcl, n_q, n_kv, hs, page, bg, bd, dot, PAGES=cfg["BLOCK_N"] // page,
                SPLITS=cfg["SPLITS"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )  # fmt: skip

        return run_tma, out
    meta = {k: cfg[k] for k in ("BLOCK_N", "SPLITS")}
    flat = variant == "vm"
    merge_g = triton.next_power_of_2(n_q // n_kv) if flat else 0
    chunk = merge_chunk(cfg, merge_g, bd) if flat else 1
    grid = (n_kv * q.shape[0], cfg["SPLITS"]) if flat else (n_kv, q.shape[0], cfg["SPLITS"])
    even = variant in ("hfp", "hfs") and bd == hs
    if variant == "hfs":  # the same data with the blocks in table order
        kc, vc = kc[table.reshape(-1).long()], vc[table.reshape(-1).long()]
        table = torch.arange(table.numel(), dtype=table.dtype, device=table.device).view(table.shape)

    def run():
        _study_kernel[grid](
            q, qsb, qsh, kc, vc, sb, ss, sh, table, tstride, lens, out, osb, osh, ws, lse, locks,
            scale, b, mcl, n_q, n_kv, hs, page, bg, bd, dot, **meta, EVEN_D=even,
            PREFETCH=variant in ("hfp", "hfs", "he"), TRANS_K=variant == "hfw", EVICT=variant == "hfe",
            FLAT=flat, MERGE_G=merge_g, CHUNK=chunk, UNROLL=variant in ("hu", "he"),
            EARLY=variant == "he", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

    return run, out


# Values of a merge chunk ([CHUNK, MERGE_G, BLOCK_D] fp32) each thread may hold.
MERGE_PER_THREAD = 64


def merge_chunk(cfg, merge_g, block_d):
    """Splits merged per step by "vm": as many as fit MERGE_PER_THREAD values a thread."""
    fit = MERGE_PER_THREAD * 32 * cfg["num_warps"] // (merge_g * block_d)
    return max(1, min(cfg["SPLITS"], triton.next_power_of_2(fit + 1) // 2))


def rel_err(got, want):
    """The largest absolute error over the reference's largest magnitude (NaN if any is NaN)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def check_ragged(jobs, device="cuda"):
    """Every (variant, config) of ``jobs`` on a ragged batch with NaN in every cache slot no
    sequence owns, against the pack's kernel: the timed shapes are all whole blocks, so the
    masked last block is checked here. Returns the disagreements."""
    lens, context, wrong = [512, 17, 0, 33, 300, 1], 512, {}
    reference = {"BLOCK_N": 16, "SPLITS": 1, "num_warps": 4, "num_stages": 1}
    for layout in LAYOUTS:
        t = ragged(build(layout, len(lens), context, device), lens)
        run, want = calls(t, reference, "cur", context)
        run()
        for variant, lay, cfg in jobs:
            if lay != layout:
                continue
            run, got = calls(t, cfg, variant, context)
            try:
                got.fill_(float("nan"))
                run()
                err = rel_err(got, want)
                if not err < 2e-2:  # NaN fails too
                    raise RuntimeError(f"rel err {err}")
            except Exception as e:
                wrong[f"ragged {variant}:{layout}:{cfg}"] = f"{type(e).__name__}: {str(e)[:200]}"
    return wrong


def _alloc(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _compile_shard(jobs):
    """Run each (variant, layout, cfg) once on a small input: fills Triton's disk cache."""
    torch.cuda.set_device(0)
    triton.set_allocator(_alloc)  # device-side tensor descriptors ("tma") need launch scratch
    failures = {}
    small = {layout: build(layout, 2, 512) for layout in LAYOUTS}
    for variant, layout, cfg in jobs:
        run, _ = calls(small[layout], cfg, variant, 512)
        try:
            run()
        except Exception as e:  # reported by the timing pass too
            failures[f"{variant}:{layout}:{cfg}"] = f"{type(e).__name__}: {str(e)[:200]}"
    torch.cuda.synchronize()
    return failures


def sdpa_call(t, layout, batch, context):
    _, n_kv, hs = LAYOUTS[layout]

    def contiguous(cache):
        gathered = cache[t["block_table"].long()].reshape(batch, -1, n_kv, hs)[:, :context]
        return gathered.transpose(1, 2).contiguous()

    k, v = contiguous(t["k_cache"]), contiguous(t["v_cache"])
    q = t["q"][:, :, None, :]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)[:, :, 0]


def main(out):
    from tunebook._short import graph_sampler

    t0 = time.time()
    triton.set_allocator(_alloc)
    # (The pack sizes its split buffers per head layout, once: no graph sees them move.)
    jobs = sorted(
        {
            (v, layout, tuple(sorted(cfg.items())))
            for v in VARIANTS
            for layout, b, ctx in SHAPES
            for cfg in CONFIGS
            if fits(cfg, layout, b, ctx, v)
        }
    )
    jobs = [(v, layout, dict(cfg)) for v, layout, cfg in jobs]
    shards = [jobs[i::14] for i in range(14)]
    failures = {}
    with ProcessPoolExecutor(14, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        for f in pool.map(_compile_shard, shards):
            failures.update(f)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f}s, {len(failures)} failures", flush=True)
    wrong = check_ragged(jobs)
    failures.update(wrong)
    print(
        f"ragged, NaN-poisoned batch: {len(wrong)} of {len(jobs)} disagree with the pack's kernel", flush=True
    )
    rows = []
    for layout, batch, context in SHAPES:
        t = build(layout, batch, context)
        ref = sdpa_call(t, layout, batch, context)()
        screen = {}
        for variant in VARIANTS:
            for cfg in CONFIGS:
                if not fits(cfg, layout, batch, context, variant):
                    continue
                run, o = calls(t, cfg, variant, context)
                try:
                    o.fill_(float("nan"))
                    run()
                    torch.cuda.synchronize()
                    err = rel_err(o, ref)
                    if not err < 2e-2:
                        raise RuntimeError(f"wrong result: rel err {err}")
                    sample = graph_sampler(run, 10)
                    us = statistics.median(sample() for _ in range(5))
                except Exception as e:
                    failures[f"{variant}:{layout}:{batch}:{context}:{cfg}"] = (
                        f"{type(e).__name__}: {str(e)[:200]}"
                    )
                    continue
                if variant not in screen or us < screen[variant][0]:
                    screen[variant] = (us, cfg)
        # Finalists and SDPA, interleaved rounds.
        print(json.dumps({"screen": screen}), flush=True)
        # The callables stay referenced: a graph holds their tensors' addresses, not the tensors.
        fns = {"sdpa": sdpa_call(t, layout, batch, context)}
        fns.update({variant: calls(t, cfg, variant, context)[0] for variant, (_, cfg) in screen.items()})
        samplers = {n: graph_sampler(fn, 10) for n, fn in fns.items()}
        series = {n: [] for n in samplers}
        for _ in range(15):
            for n, s in samplers.items():
                series[n].append(s())
        med = {n: statistics.median(v) for n, v in series.items()}
        ratio = {n: statistics.median(x / y for x, y in zip(series["sdpa"], series[n])) for n in series}
        row = {"layout": layout, "batch": batch, "context": context, "us": med, "sdpa_over": ratio,
               "best": {v: c for v, (_, c) in screen.items()}}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del t, samplers, fns
        torch.cuda.empty_cache()
    with open(os.path.join(out, "decode_structures.json"), "w") as f:
        json.dump({"rows": rows, "failures": failures}, f, indent=1)
    print("failures:", len(failures), list(failures.items())[:3])
    took = time.time() - t0
    print(f"== SDPA time / variant time (> 1: faster than SDPA), best config per variant; {took:.0f}s")
    for r in rows:
        cells = " | ".join(
            f"{v} {r['us'][v]:7.2f}us {r['sdpa_over'][v]:.2f} {tuple(r['best'][v].values())}"
            for v in r["best"]
        )
        where = f"{r['layout']:5s} b{r['batch']:<4d} c{r['context']:<6d}"
        print(f"{where} sdpa {r['us']['sdpa']:7.2f}us | {cells}")


if __name__ == "__main__":
    main(_timing.study_out(__doc__) or "")
