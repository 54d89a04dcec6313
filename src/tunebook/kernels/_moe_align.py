"""``moe_align``: fused MoE's first step, the (token, expert) pairs sorted by expert.

Given the ``n = T*k`` expert ids of ``topk_ids`` (flattened) and ``E`` experts, bin
``b(i) = ids[i]`` when it is in ``[0, E)``, else ``E`` (vLLM's expert parallelism marks other
ranks' experts -1: such a pair gets no row)::

    counts[e] = #{i : b(i) = e}             padded[e] = ceil(counts[e] / ALIGN) * ALIGN
    ends[e]   = padded[0] + ... + padded[e] start[e]  = ends[e] - padded[e]
    sorted_ids[start[e] + #{j < i : b(j) = e}] = i          (stable: token order kept)
    chunk_expert[c] = min(#{e : ends[e] <= c * ALIGN}, E - 1)
    num_padded = ends[E - 1]

and every other row of ``sorted_ids`` holds the sentinel ``n``. Its length, ``cap``, is a
bound known without reading the ids (``ceil((n + min(E, n) * (ALIGN - 1)) / ALIGN) * ALIGN``),
so nothing waits for the device.

Two implementations give the same three tensors:

- ``_moe_align_kernel``: one launch of at most ``_ALIGN_PROGRAMS`` programs. Each counts
  every id (the column sums of a one-hot ``[BLOCK, E_PAD]`` tile a step) so no program waits
  for another, then places its own share of the pairs (a pair's rank among the earlier pairs
  of its bin is the one-hot's cumulative sum down the tile) and fills its share of the
  chunks.
- ``_moe_align_torch``: PyTorch ops (a scatter-add histogram, cumsums, a stable sort, a
  scatter, a searchsorted: about 15 small kernels). The tests' reference, and the path past
  the sizes where each program's full count loop (``n * E_PAD`` compares) stops being small,
  or on a device Triton does not launch on.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from .._compat import interpreting
from ._common import cdiv, pow2_at_least

# A program's one-hot tiles hold _ALIGN_TILE elements ([BLOCK, E_PAD] pairs x bins,
# [CHUNK_BLOCK, E_PAD] chunks x bins): 8,192 int32 are 64 a thread at 4 warps, so a step
# takes 8192 // E_PAD pairs (512 at E=8, 16 at E=256).
_ALIGN_TILE = 8192
_ALIGN_PROGRAMS = 32  # at most: each counts every id, then places its share
# Every program compares each of the n ids with E_PAD bins; past this much work the
# PyTorch version is used.
_ALIGN_MAX_WORK = 1 << 20
_ALIGN_MAX_E = 1023  # E_PAD <= 1024: a step still takes 8 pairs


def moe_align(topk_ids: Any, E: int, align: int) -> tuple[Any, Any, Any]:
    """Sort the (token, expert) pairs by expert, each expert padded to ``align`` rows.

    Returns ``sorted_ids`` (int32, ``[cap]``: indices into ``topk_ids.flatten()``, padding
    = ``topk_ids.numel()``), ``chunk_expert`` (int32, ``[cap // align]``) and ``num_padded``
    (int32, ``[1]``: rows in use). ``cap`` is a bound known without reading the ids, so
    nothing waits for the device. Pairs of one expert keep their token order. A pair whose
    id is outside ``[0, E)`` is left out: no row holds it. (The math: the module docstring.)
    """
    import torch

    n = topk_ids.numel()
    e_pad = pow2_at_least(E + 1)
    launchable = topk_ids.device.type == "cuda" or interpreting()
    if not launchable or not 1 <= E <= _ALIGN_MAX_E or n == 0 or n * e_pad > _ALIGN_MAX_WORK:
        return _moe_align_torch(topk_ids, E, align)
    device = topk_ids.device
    cap = _capacity(n, E, align)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=device)
    chunk_expert = torch.empty(cap // align, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    # Read as ptr + i: a strided view (a column slice, ids[:, :1]) would be misread.
    launch_align(topk_ids.reshape(-1).contiguous(), E, align, sorted_ids, chunk_expert, num_padded)
    return sorted_ids, chunk_expert, num_padded


def _capacity(n: int, E: int, align: int) -> int:
    """Rows ``sorted_ids`` needs at most: every pair, plus a partly filled chunk per expert."""
    return cdiv(n + min(E, n) * (align - 1), align) * align


def launch_align(
    flat: Any,
    E: int,
    align: int,
    sorted_ids: Any,
    chunk_expert: Any,
    num_padded: Any,
    block: int | None = None,
) -> None:
    """One launch of ``_moe_align_kernel`` into the given outputs (``block``: pairs a step,
    a power of two, by default ``align_meta``'s; the tests make it small to run many
    programs and steps)."""
    meta = align_meta(E, align, block)  # once a call: fused_moe's every call comes here
    block = meta["BLOCK"]
    n, chunks = flat.numel(), chunk_expert.numel()
    programs = min(cdiv(n, block), _ALIGN_PROGRAMS)
    steps = cdiv(cdiv(n, block), programs)  # steps of each program's share
    _moe_align_kernel[(programs,)](
        flat, sorted_ids, chunk_expert, num_padded, n, E, chunks, steps * block,
        cdiv(chunks, programs), **meta,
    )  # fmt: skip


def align_meta(E: int, align: int, block: int | None = None) -> dict[str, int]:
    """``_moe_align_kernel``'s constexprs for ``E`` experts and ``align`` (``block``: pairs
    a step, by default as many as a tile holds)."""
    e_pad, align_pad = pow2_at_least(E + 1), pow2_at_least(align)
    chunk_block = max(1, min(_ALIGN_TILE // e_pad, _ALIGN_TILE // align_pad))
    block = _ALIGN_TILE // e_pad if block is None else block
    return {
        "ALIGN": align,
        "ALIGN_PAD": align_pad,
        "E_PAD": e_pad,
        "BLOCK": block,
        "CHUNK_BLOCK": chunk_block,
    }


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    chunk_expert_ptr,
    num_padded_ptr,
    n,
    E,
    num_chunks,
    pairs_per_program,
    chunks_per_program,
    ALIGN: tl.constexpr,
    ALIGN_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCK: tl.constexpr,
):
    """``moe_align`` in one launch; every output element is written exactly once.

    Program ``p`` owns pairs ``[p * pairs_per_program, ...)`` and as many chunks:

    1. it counts every pair: ``counts[e]``, and ``before[e]``, the pairs of bin e ahead of
       its share (``pairs_per_program`` is a multiple of BLOCK: a step is all before or not);
    2. a pair of its share goes to row ``start[e] + before[e] + rank - 1``, ``rank`` the
       pair's place among the step's pairs of bin e (the one-hot's inclusive cumsum down the
       step) plus the pairs of bin e in its earlier steps;
    3. each of its chunks gets its expert (``#{e < E : ends[e] <= first row}``, clamped to
       E - 1) and the sentinel ``n`` in every row at or past its expert's real rows (for a
       chunk past the rows in use the count is E, whose real rows end at 0: all rows).
    """
    pid = tl.program_id(0)
    bins = tl.arange(0, E_PAD)
    lo = pid * pairs_per_program
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        e = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
        step = tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0)
        counts += step
        before += tl.where(start < lo, step, 0)
    padded = tl.where(bins < E, (counts + (ALIGN - 1)) // ALIGN * ALIGN, 0)
    ends = tl.cumsum(padded, axis=0)
    running = ends - padded + before
    hi = tl.minimum(lo + pairs_per_program, n)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < hi, other=-1)
        e = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
        hot = (e[:, None] == bins[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, axis=0)
        row = tl.sum(tl.where(hot != 0, running[None, :] + rank, 0), axis=1) - 1
        tl.store(sorted_ids_ptr + row, offs, mask=(offs < hi) & (e < E))
        running += tl.sum(hot, axis=0)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0), mask=pid == 0)
    real_end = tl.where(bins < E, ends - padded + counts, 0)
    c_lo = pid * chunks_per_program
    c_hi = tl.minimum(c_lo + chunks_per_program, num_chunks)
    cols = tl.arange(0, ALIGN_PAD)
    for c0 in range(c_lo, c_hi, CHUNK_BLOCK):
        chunk = c0 + tl.arange(0, CHUNK_BLOCK)
        first = chunk * ALIGN
        passed = (ends[None, :] <= first[:, None]) & (bins[None, :] < E)
        expert = tl.sum(passed.to(tl.int32), axis=1)
        tl.store(chunk_expert_ptr + chunk, tl.minimum(expert, E - 1), mask=chunk < c_hi)
        filled = tl.sum(tl.where(bins[None, :] == expert[:, None], real_end[None, :], 0), axis=1)
        rows = first[:, None] + cols[None, :]
        pad = (chunk[:, None] < c_hi) & (cols[None, :] < ALIGN) & (rows >= filled[:, None])
        tl.store(sorted_ids_ptr + rows, n, mask=pad)


def _moe_align_torch(topk_ids: Any, E: int, align: int) -> tuple[Any, Any, Any]:
    """``moe_align`` in PyTorch ops (about 15 small kernels, none waits for the device)."""
    import torch

    flat = topk_ids.reshape(-1).to(torch.int64)
    n, device = flat.numel(), flat.device
    # Ids outside [0, E) go to an extra bin E: it sorts after every expert and gets no rows.
    # (clamp to [-1, E], then -1 -> E modulo E + 1: two small kernels, not four)
    flat = flat.clamp(-1, E).remainder_(E + 1)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:E] + (align - 1)) // align * align
    ends = padded.cumsum(0)
    experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[experts]
    cap = _capacity(n, E, align)
    # Row `cap`, one past the end, takes every left-out pair (each lands at cap or beyond).
    starts = torch.cat([ends - padded, ends.new_full((1,), cap)])
    sorted_ids = torch.full((cap + 1,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (starts[experts] + rank).clamp_(max=cap), order.to(torch.int32))
    chunks = torch.arange(0, cap, align, device=device)
    chunk_expert = torch.searchsorted(ends, chunks, right=True).clamp_(max=E - 1).to(torch.int32)
    return sorted_ids[:cap], chunk_expert, ends[-1:].to(torch.int32)
