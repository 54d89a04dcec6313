"""What the attention ops (``paged_attention_decode``, ``varlen_attention``,
``reshape_and_cache``) share: the paged KV-cache layout, context-length buckets, the checks
of their inputs, and the jitted tile loop (online softmax) both attention kernels run.

**The paged KV cache.** One tensor for keys and one for values, each
``[num_blocks, block_size, num_kv_heads, head_size]`` (vLLM's layout for FlashAttention
and its Triton backend): block ``b`` holds ``block_size`` consecutive tokens of one
sequence, each token's heads side by side, each head's ``head_size`` values contiguous. A
sequence's block table row lists its blocks in order; its token ``t`` lives at
``cache[table[t // block_size], t % block_size]``. A token's *slot* is
``block * block_size + offset`` (what ``reshape_and_cache`` is given). Only the last
dimension must be contiguous: keys and values may be two views of one allocation (e.g.
``kv[:, 0]`` and ``kv[:, 1]`` of a ``[num_blocks, 2, block_size, heads, size]`` tensor).

**Attention math** (both kernels), per query row ``q`` and its visible keys ``k_j, v_j``,
in fp32: ``s_j = scale * q . k_j``; ``out = sum_j softmax(s)_j v_j``; a row that sees no
key at all is 0. Tiles of ``BLOCK_N`` keys are folded in one after another with the online
softmax (FlashAttention): a running maximum ``m``, a running sum ``l`` of
``exp(s_j - m)``, an accumulator rescaled by ``exp(m_old - m_new)`` whenever ``m`` grows.
Scores are kept in base 2 (``scale * log2(e)`` folded into the scale, ``exp2``), as every
Triton attention kernel does.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _common as c
from ._gemm_common import mma

LOG2E = 1.4426950408889634

# Context lengths (keys per sequence) are bucketed onto powers of two from 16 to 131072;
# longer contexts share the last bucket. Like token buckets, a bucket 2^k covers
# (2^(k-1), 2^k] and every call in it has the same candidates.
CONTEXT_BUCKETS: tuple[int, ...] = tuple(2**i for i in range(4, 18))

# A running maximum that starts finite: a row with no visible key yet keeps m = this value,
# so exp2(m_old - m_new) is exp2(0) = 1 and exp2(-inf - m) = 0, never NaN (-inf - -inf).
NO_SCORE: tl.constexpr = tl.constexpr(-1.0e30)

INDEX_DTYPES = (torch.int32, torch.int64)


def context_bucket(name: str) -> tunebook.Bucket:
    """A key name whose values are bucketed onto :data:`CONTEXT_BUCKETS`."""
    return tunebook.bucket(name, CONTEXT_BUCKETS)


_CONTEXT = context_bucket("n")


def context_of(n: int) -> int:
    """The bucket edge a context length maps to.

    >>> context_of(1), context_of(17), context_of(32768), context_of(10**6)
    (16, 32, 32768, 131072)
    """
    return int(_CONTEXT.apply(n))


def dot_floor(n: int) -> int:
    """``n`` rounded up to a power of two of at least 16: the smallest tile ``tl.dot`` takes.

    >>> dot_floor(1), dot_floor(7), dot_floor(64)
    (16, 16, 64)
    """
    return max(16, c.pow2_at_least(max(int(n), 1)))


# ----------------------------------------------------------------------- input checks


def check_heads(op: str, name: str, t: Any, dims: int = 3) -> None:
    """``t`` is a float tensor of ``dims`` dimensions whose last one is contiguous."""
    c.check_float(op, name, t)
    if t.dim() != dims:
        c.fail(op, f"{name} must have {dims} dimensions; found shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        c.fail(
            op, f"{name}'s last dimension must be contiguous (stride 1); found strides {tuple(t.stride())}"
        )


def check_index(op: str, name: str, t: Any, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.dim() != dims:
        found = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        c.fail(op, f"{name} must be a {dims}-D int32 or int64 tensor; found {found}")


def check_cache(
    op: str, k_cache: Any, v_cache: Any, n_kv: int, head_size: int, dtype: torch.dtype, dtype_of: str = "q"
) -> int:
    """The paged caches match each other, the KV heads and the dtype of tensor ``dtype_of``
    (named in the error); returns block_size."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_heads(op, name, t, dims=4)
        if t.dtype != dtype:
            c.fail(op, f"{name} must have {dtype_of}'s dtype {dtype}; found {t.dtype}")
    if k_cache.shape != v_cache.shape:
        c.fail(
            op,
            f"k_cache and v_cache must have one shape; found {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}",
        )
    if tuple(k_cache.shape[2:]) != (n_kv, head_size):
        c.fail(
            op,
            f"the caches must be [num_blocks, block_size, {n_kv}, {head_size}] (num_kv_heads, head_size); "
            f"found {tuple(k_cache.shape)}",
        )
    if k_cache.shape[1] < 1:
        c.fail(
            op, f"block_size (the caches' second dimension) must be at least 1; found {tuple(k_cache.shape)}"
        )
    return int(k_cache.shape[1])


def check_block_table_on_cpu(
    op: str, block_table: torch.Tensor, lens: torch.Tensor, lens_name: str, num_blocks: int, page: int
) -> None:
    """On the CPU (no wait to check there; see ``_common.check_indices_on_cpu``): each
    sequence's ``lens`` fits its block-table row, and every block it reads is in the caches
    (entries past a sequence's blocks are never read and may hold anything)."""
    if block_table.device.type != "cpu":
        return
    width = block_table.shape[1]
    holds = f"a block-table row holds {width} blocks of {page} tokens"
    c.check_indices_on_cpu(op, lens_name, lens, None, width * page + 1, holds, inclusive=True)
    blocks = (lens.clamp(min=0).to(torch.int64) + page - 1) // page
    used = torch.arange(width)[None, :] < blocks[:, None]
    why = f"the caches hold {num_blocks} blocks; an entry a sequence reads"
    c.check_indices_on_cpu(op, "block_table", block_table, 0, num_blocks, why, used)


def check_gqa(op: str, n_q: int, n_kv: int) -> None:
    if n_kv < 1 or n_q < 1 or n_q % n_kv:
        c.fail(op, f"query heads must be a positive multiple of KV heads (GQA); found {n_q} and {n_kv}")


def check_scale(op: str, scale: Any) -> None:
    """``scale`` is None (the default) or a finite real number: NaN or inf would make every
    score NaN, and the output with it, silently."""
    if scale is None:
        return
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        shown = repr(scale) if isinstance(scale, numbers.Real) else f"a {type(scale).__name__}"
        c.fail(op, f"scale must be a finite number (or None: head_size ** -0.5); found {shown}")


def check_length_bound(op: str, name: str, value: Any) -> None:
    """A caller's bound on lengths (``max_context_len``, ``max_seqlen_q``/``_k``) is None (read
    from the lengths) or a whole number of at least 0: a string failed deep in the op's
    checks, and ``int()`` took ``9.7`` or ``-3`` for a bound without a word."""
    if value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        shown = repr(value) if isinstance(value, numbers.Real) else f"a {type(value).__name__}"
        what = f"{name} must be a whole number of at least 0 (or None: read from the lengths); found {shown}"
        c.fail(op, what)


def check_offsets(op: str, products: list[tuple[str, str, int, int]]) -> None:
    """:func:`_common.check_offsets` with the attention ops' remedy."""
    c.check_offsets(
        op,
        products,
        "pass it token-major (each token's heads side by side: e.g. contiguous, a cache as "
        "[num_blocks, block_size, NK, head_size]; a head-major cache's head stride spans a whole "
        "head's cache), or split the call",
    )


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """An index tensor whose last dimension is contiguous (a copy only if it is not)."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def softmax_scale(scale: float | None, head_size: int) -> float:
    return float(head_size) ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------- offline tuning


def recorded_dtype(call: Any, arg: str, kernel: Any) -> torch.dtype:
    """The dtype of argument ``arg`` in a recorded call description (``tunebook._calls``),
    bfloat16 when there is none (keys declared on the command line). Descriptions come from
    books, which are untrusted: only the pack's float dtypes are accepted.

    >>> from tunebook.kernels.paged_attention_decode import _paged_attention_decode_kernel as kernel
    >>> recorded_dtype({"args": [{"tensor": {"dtype": "torch.float16"}}]}, "q_ptr", kernel)
    torch.float16
    >>> recorded_dtype(None, "q_ptr", kernel), recorded_dtype({"args": [{"value": 3}]}, "q_ptr", kernel)
    (torch.bfloat16, torch.bfloat16)
    """
    names = list(getattr(kernel, "fn", kernel).arg_names)
    try:
        text = call["args"][names.index(arg)]["tensor"]["dtype"]
    except (TypeError, KeyError, IndexError, ValueError):
        return torch.bfloat16
    by_name = {str(d): d for d in c.FLOAT_DTYPES}
    return by_name.get(text, torch.bfloat16)


def tuning_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------- the tile loop


@triton.jit
def _key_offsets(
    j,
    inside,
    table_row,
    row_stride,
    block_stride,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
):
    """Element offsets of keys ``j`` (positions within their source) from the source's base:
    through the block table for the paged cache, by row for packed tensors."""
    if PAGED:
        if MASKED:
            block = tl.load(table_row + j // PAGE, mask=inside, other=0)
        else:
            block = tl.load(table_row + j // PAGE)
        offsets = block.to(tl.int64) * block_stride + (j % PAGE).to(tl.int64) * row_stride
    else:
        offsets = j.to(tl.int64) * row_stride
    return offsets


@triton.jit
def attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    lo,
    hi,
    limit,
    key_pos0,
    k_base,
    v_base,
    k_row_stride,
    v_row_stride,
    k_block_stride,
    v_block_stride,
    table_row,
    qk_scale,
    d,
    d_mask,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE: tl.constexpr,
    DOT: tl.constexpr,
):
    """Fold keys ``[lo, hi)`` of one source (packed rows or the paged cache) into the online
    softmax state ``(acc, m_i, l_i)`` of the query rows ``q`` ``[BLOCK_M, BLOCK_D]``.

    Keys are positions within their source; key ``j`` sits at absolute position
    ``key_pos0 + j``, query row ``i`` at ``q_pos[i]``. ``MASKED`` tiles hide keys at or past
    ``limit`` and, if ``CAUSAL``, keys after the row's own position; unmasked tiles must lie
    wholly inside what every row may see (the caller splits the range so that only the
    last tile or the diagonal ones pay for masks).
    """
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        inside = j < limit
        k_off = _key_offsets(j, inside, table_row, k_row_stride, k_block_stride, MASKED, PAGED, PAGE)
        v_off = _key_offsets(j, inside, table_row, v_row_stride, v_block_stride, MASKED, PAGED, PAGE)
        if MASKED:
            k_t = tl.load(
                k_base + k_off[None, :] + d[:, None], mask=inside[None, :] & d_mask[:, None], other=0.0
            )
            v = tl.load(
                v_base + v_off[:, None] + d[None, :], mask=inside[:, None] & d_mask[None, :], other=0.0
            )
        else:
            k_t = tl.load(k_base + k_off[None, :] + d[:, None], mask=d_mask[:, None], other=0.0)
            v = tl.load(v_base + v_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        s = mma(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT) * qk_scale
        if MASKED:
            visible = inside[None, :]
            if CAUSAL:
                visible = visible & ((key_pos0 + j)[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m_i = m_new
    return acc, m_i, l_i


def table_chunk(page: int) -> tuple[int, int]:
    """(keys, block-number slots) of one chunk of :func:`attend_paged_chunks` for blocks of
    ``page`` tokens: 1,024 keys (a multiple of every ``BLOCK_N``), 256 for pages under 8
    tokens so the register copy of the table stays small; the slots cover a chunk that
    starts mid-block.

    >>> table_chunk(16), table_chunk(5), table_chunk(1)
    ((1024, 128), (256, 64), (256, 512))
    """
    keys = 1024 if page >= 8 else 256
    return keys, c.pow2_at_least(keys // page + 2)


@triton.jit
def _chunk_blocks(c0, table_row, table_width, first_blocks, PAGE: tl.constexpr, TABLE_SLOTS: tl.constexpr):
    """The block numbers of the chunk of keys starting at ``c0`` (and its first block's index in
    the table): ``first_blocks`` for the first chunk, already loaded by the caller."""
    first = c0 // PAGE
    if c0 == 0:
        blocks = first_blocks
    else:
        slot = tl.arange(0, TABLE_SLOTS)
        blocks = tl.load(table_row + first + slot, mask=slot < table_width - first, other=0)
    return first, blocks


@triton.jit
def attend_paged_chunks(
    acc,
    m_i,
    l_i,
    q,
    lo,
    hi,
    k_base,
    v_base,
    k_row_stride,
    v_row_stride,
    k_block_stride,
    v_block_stride,
    table_row,
    table_width,
    first_blocks,
    qk_scale,
    d,
    d_mask,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    CHUNK: tl.constexpr,
    TABLE_SLOTS: tl.constexpr,
    DOT: tl.constexpr,
):
    """:func:`attend_tiles` for whole, unmasked tiles ``[lo, hi)`` of the paged cache
    (``hi - lo`` a multiple of ``BLOCK_N``), its block numbers read ``CHUNK`` keys at a time.

    Why: in :func:`attend_tiles` a tile's key addresses come from a load in the same loop
    (the block table), and Triton's software pipeliner (3.4-3.9) then gives the K and V
    loads a single buffer and waits for each before the tile's math, whatever ``num_stages``
    asks: nothing of the next tile is in flight while this one is computed. Here a chunk's
    block numbers are loaded once into registers (``TABLE_SLOTS`` of them, from
    :func:`table_chunk`) and each tile picks its own with ``tl.gather``; no load feeds an
    address inside the tile loop, so it is pipelined ``num_stages`` deep. The table's first
    chunk, ``first_blocks``, is loaded by the caller before anything waits on the sequence's
    length (entries past the sequence's blocks are read, up to ``table_width``, never used).
    """
    tl.static_assert(CHUNK % BLOCK_N == 0, "a tile must not cross a chunk of block numbers")
    for c0 in range(lo, hi, CHUNK):
        first, blocks = _chunk_blocks(c0, table_row, table_width, first_blocks, PAGE, TABLE_SLOTS)
        for start in range(c0, tl.minimum(hi, c0 + CHUNK), BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            block = tl.gather(blocks, j // PAGE - first, 0).to(tl.int64)
            row = (j % PAGE).to(tl.int64)
            k_off = block * k_block_stride + row * k_row_stride
            v_off = block * v_block_stride + row * v_row_stride
            k_t = tl.load(k_base + k_off[None, :] + d[:, None], mask=d_mask[:, None], other=0.0)
            v = tl.load(v_base + v_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
            # The fold of attend_tiles, unmasked. (Written out, not shared: a change to
            # attend_tiles's source re-keys varlen_attention's tuned page too.)
            s = mma(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fold_slices(acc, m_i, l_i, q, k_t, v, visible, qk_scale, MASKED: tl.constexpr, DOT: tl.constexpr):
    """One step of :func:`attend_warp_slices`: each slice's keys folded into its own state."""
    s = mma(q, k_t, tl.zeros([q.shape[0], q.shape[1], k_t.shape[2]], dtype=tl.float32), DOT) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 2))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, :, None])
    l_i = l_i * alpha + tl.sum(p, 2)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, :, None], DOT)
    return acc, m_new, l_i


@triton.jit
def _slice_offsets(block, j, row_stride, block_stride, PAGE: tl.constexpr):
    return block.to(tl.int64) * block_stride + (j % PAGE).to(tl.int64) * row_stride


@triton.jit
def attend_warp_slices(
    q,
    lo,
    full,
    hi,
    k_base,
    v_base,
    k_row_stride,
    v_row_stride,
    k_block_stride,
    v_block_stride,
    table_row,
    table_width,
    first_blocks,
    qk_scale,
    d,
    d_mask,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLICES: tl.constexpr,
    PAGE: tl.constexpr,
    CHUNK: tl.constexpr,
    TABLE_SLOTS: tl.constexpr,
    DOT: tl.constexpr,
):
    """Keys ``[lo, hi)`` of the paged cache, ``SLICES * BLOCK_N`` a step, each step's keys
    dealt to ``SLICES`` independent online-softmax states (``BLOCK_N`` keys each), merged
    once at the end into the ``(acc, m_i, l_i)`` that :func:`attend_tiles` returns. Steps up
    to ``full`` are whole (``full - lo`` a multiple of the step); the rest is one masked step.

    Why: in :func:`attend_tiles` a ``[BLOCK_M, BLOCK_N]`` score tile is spread over the warps
    by key, so every tile's row maximum and sum, and P on its way to the P @ V product, cross
    warps through shared memory and a barrier. Here the slices are a leading tile dimension
    (a batched ``tl.dot``) that Triton lays one to a warp when ``SLICES == num_warps``: the
    softmax stays in the warp, as in cuDNN's decode kernel. Block numbers come from a
    register copy of the table, as in :func:`attend_paged_chunks`, so the loop pipelines.
    """
    STEP: tl.constexpr = SLICES * BLOCK_N
    tl.static_assert(CHUNK % STEP == 0, "a step must not cross a chunk of block numbers")
    lane = tl.arange(0, SLICES)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    qs = tl.broadcast_to(q[None, :, :], [SLICES, BLOCK_M, BLOCK_D])
    acc = tl.zeros([SLICES, BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([SLICES, BLOCK_M], NO_SCORE, dtype=tl.float32)
    l_i = tl.zeros([SLICES, BLOCK_M], dtype=tl.float32)
    k_mask = d_mask[None, :, None]
    v_mask = d_mask[None, None, :]
    for c0 in range(lo, full, CHUNK):
        first, blocks = _chunk_blocks(c0, table_row, table_width, first_blocks, PAGE, TABLE_SLOTS)
        for start in range(c0, tl.minimum(full, c0 + CHUNK), STEP):
            j = start + lane
            block = tl.reshape(tl.gather(blocks, tl.reshape(j // PAGE - first, [STEP]), 0), [SLICES, BLOCK_N])
            k_off = _slice_offsets(block, j, k_row_stride, k_block_stride, PAGE)
            v_off = _slice_offsets(block, j, v_row_stride, v_block_stride, PAGE)
            k_t = tl.load(k_base + k_off[:, None, :] + d[None, :, None], mask=k_mask, other=0.0)
            v = tl.load(v_base + v_off[:, :, None] + d[None, None, :], mask=v_mask, other=0.0)
            acc, m_i, l_i = _fold_slices(acc, m_i, l_i, qs, k_t, v, None, qk_scale, False, DOT)
    if full < hi:
        j = full + lane
        inside = j < hi
        block = tl.load(table_row + j // PAGE, mask=inside, other=0)
        k_off = _slice_offsets(block, j, k_row_stride, k_block_stride, PAGE)
        v_off = _slice_offsets(block, j, v_row_stride, v_block_stride, PAGE)
        k_t = tl.load(
            k_base + k_off[:, None, :] + d[None, :, None], mask=inside[:, None, :] & k_mask, other=0.0
        )
        v = tl.load(
            v_base + v_off[:, :, None] + d[None, None, :], mask=inside[:, :, None] & v_mask, other=0.0
        )
        acc, m_i, l_i = _fold_slices(acc, m_i, l_i, qs, k_t, v, inside[:, None, :], qk_scale, True, DOT)
    # A slice that saw no key keeps m = NO_SCORE and l = 0: its weight is 0 beside any slice
    # that did, and when none did, l sums to 0 and the row's output is 0 (normalized).
    top = tl.max(m_i, 0)
    weight = tl.exp2(m_i - top[None, :])
    return tl.sum(acc * weight[:, :, None], 0), top, tl.sum(l_i * weight, 0)


@triton.jit
def normalized(acc, l_i):
    """The attention output of each row: acc / l, and 0 for a row that saw no key."""
    return acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
