"""Reading ``paged_attention_decode``'s caches through the TMA unit (``TMA=1`` configs), on
NVIDIA GPUs of compute capability 9 or later: the host side (whether a call's caches can be
read so, their tensor descriptors, remembered per cache pair, and whether the merge kernel
is launched with programmatic dependent launch) and the split kernel's key loop over whole
cache blocks loaded as ``[PAGE, HEAD_SIZE]`` boxes (``_attend_pages_tma``), which computes
the same online softmax as ``_attention``'s loops::

    m' = max(m, max_t s_t),  l' = l 2^(m - m') + sum_t 2^(s_t - m'),
    acc' = acc 2^(m - m') + sum_t 2^(s_t - m') V_t,     s_t = qk_scale * q . K_t

The jitted helpers are part of the split kernel's page hash: editing them starts a new page.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import triton
import triton.language as tl

from .. import _compat
from . import _attention as a
from ._attention import NO_SCORE
from ._gemm_common import mma


def tma_usable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether a call's caches can be read through tensor descriptors (``TMA=1``): each a
    ``[blocks * PAGE, NK * HEAD_SIZE]`` matrix of rows 16-byte aligned, heads a power of two
    (a box is the whole head), blocks of 16-256 tokens (tl.dot's least), fewer than 2^31
    rows (coordinates are 32-bit), on a GPU with TMA
    (compute capability 9 or later, not ROCm); in Triton's interpreter, where the tests run
    it, fp16 and fp32 only (it misreads bf16 through a descriptor, 3.4-3.9)."""
    blocks, page, n_kv, head = k_cache.shape
    if a.dot_floor(head) != head or not 16 <= page <= 256 or page & (page - 1):
        return False
    if blocks * page > 2**31 - 1:
        return False  # a box's first row (block x PAGE) is a 32-bit coordinate
    if _compat.interpreting():
        if k_cache.dtype == torch.bfloat16:
            return False
        align = TMA_ALIGN * k_cache.element_size()  # 3.4's interpreter checks strides in elements
    elif k_cache.device.type != "cuda" or not _tma_device(k_cache.device):
        return False
    else:
        align = TMA_ALIGN
    for cache in (k_cache, v_cache):
        blocks, row, heads, _ = cache.stride()
        if heads != head or blocks != page * row or row < n_kv * head:
            return False
        if (row * cache.element_size()) % align or cache.data_ptr() % TMA_ALIGN:
            return False
    return True


def _descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[Any, Any]:
    """The caches' tensor descriptors for ``TMA=1`` configs, or (None, None) where they
    cannot be read so (the Space then offers no TMA config).

    Remembered per pair of cache tensors, since a server passes the same ones (one pair a
    layer) at every step: found again in about 0.4 us, where building two descriptors takes
    6 us on a host CPU. An entry is dropped when either tensor object is freed, so the
    descriptors (which hold the caches' storage, ``_rows``) never keep a cache's memory
    alive after the caller lets it go."""
    ids = (id(k_cache), id(v_cache))
    seen = _DESCRIPTORS.get(ids)
    if (
        seen is not None
        and seen[0]() is k_cache
        and seen[1]() is v_cache
        and seen[2] == (k_cache.data_ptr(), v_cache.data_ptr())
    ):
        return seen[3]
    found: tuple[Any, Any] = (None, None)
    if tma_usable(k_cache, v_cache):
        from triton.tools.tensor_descriptor import TensorDescriptor

        found = (
            # boxes of [PAGE, HEAD_SIZE]: shape[1::2]
            TensorDescriptor.from_tensor(_rows(k_cache), list(k_cache.shape[1::2])),
            TensorDescriptor.from_tensor(_rows(v_cache), list(v_cache.shape[1::2])),
        )
    if len(_DESCRIPTORS) >= MAX_REMEMBERED_CACHES:
        _DESCRIPTORS.clear()  # more live caches than any model has layers: start over
    pointers = (k_cache.data_ptr(), v_cache.data_ptr())
    _DESCRIPTORS[ids] = (weakref.ref(k_cache), weakref.ref(v_cache), pointers, found)
    for cache in (k_cache, v_cache):
        weakref.finalize(cache, _DESCRIPTORS.pop, ids, None)
    return found


def _rows(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` as the ``[blocks * PAGE, NK * HEAD_SIZE]`` matrix a descriptor reads: a
    tensor on its storage, not a view of it (a view keeps the cache tensor object alive, and
    with it the remembered entry that would free it)."""
    blocks, page, n_kv, head = cache.shape
    rows = torch.empty(0, dtype=cache.dtype, device=cache.device)
    shape, strides = (blocks * page, n_kv * head), (cache.stride(1), 1)
    return rows.set_(cache.untyped_storage(), cache.storage_offset(), shape, strides)


# (id(k_cache), id(v_cache)) -> (weak k, weak v, their addresses, descriptors)
_DESCRIPTORS: dict[tuple[int, int], tuple[Any, Any, tuple[int, int], tuple[Any, Any]]] = {}
MAX_REMEMBERED_CACHES = 4096
TMA_ALIGN = 16  # bytes: a descriptor's base address and row stride


def _tma_device(device: Any) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _has_tma(index)


@functools.cache
def _has_tma(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def programmatic_launch(device: Any) -> bool:
    """Whether the merge kernel is launched with programmatic dependent launch (PDL) after
    the split kernel: NVIDIA GPUs of compute capability 9 or later, compiled (not in Triton's
    interpreter), with a Triton whose grid dependency control compiles (not 3.4). The split
    programs let it be scheduled as soon as they have all started, and it waits in hardware
    for their end: on an H200 that took 0.1-1.0 us off 29 of 31
    merge-kernel calls of the grid at fixed configs (geomean 1.026, up to 1.13x; one cell
    1.3 us slower), and the page re-tuned with it served 1.024x faster (BENCHMARKS.md 5b,
    twenty-eighth session). The PDL launch alone, without the split kernel's signal, made
    calls 0.06-0.6 us slower."""
    compiled = device.type == "cuda" and not _compat.interpreting()
    return compiled and _tma_device(device) and _compat.grid_dependency_control()


@triton.jit
def _attend_pages_tma(
    q,
    lo,
    hi,
    k_desc,
    v_desc,
    column,
    table_row,
    qk_scale,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    DOT: tl.constexpr,
):
    """The keys ``[lo, hi)`` (``lo`` a multiple of ``PAGE``), one cache block a step, its K
    and V rows of this KV head (from ``column``) loaded by the TMA unit as ``[PAGE,
    HEAD_SIZE]`` boxes through the host-built descriptors of the caches seen as ``[blocks *
    PAGE, NK * HEAD_SIZE]`` (``_descriptors``).

    Why: on an H200 a plain read of the shuffled paged cache that loads each block this way,
    one warp a program, ran at 0.96-0.99 of SDPA's time where the same read through pointers
    reached 0.87-0.95 (batch >= 8, 512-8k tokens; BENCHMARKS.md 5b, twenty-seventh session):
    a box needs no per-element addresses and keeps more bytes in flight. Descriptors built
    on the device instead cost more than that in such short programs (same session). A box
    has no mask, so the rows of the last block past ``hi`` (which may hold anything, NaN
    included) are zeroed in V and scored ``NO_SCORE`` in K, in that block's step only.
    """
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NO_SCORE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    # Whole blocks unmasked, then the partial last one masked alone: a tl.where on V in every
    # step cost 3-12% (the box went through registers before the second tl.dot).
    whole = tl.maximum(lo // PAGE, hi // PAGE)
    for p in range(lo // PAGE, whole):
        acc, m_i, l_i = _attend_box(
            acc, m_i, l_i, q, p, hi, k_desc, v_desc, column, table_row, qk_scale, BLOCK_G, PAGE, DOT, False
        )  # fmt: skip
    for p in range(whole, tl.cdiv(hi, PAGE)):
        acc, m_i, l_i = _attend_box(
            acc, m_i, l_i, q, p, hi, k_desc, v_desc, column, table_row, qk_scale, BLOCK_G, PAGE, DOT, True
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _attend_box(
    acc,
    m_i,
    l_i,
    q,
    p,
    hi,
    k_desc,
    v_desc,
    column,
    table_row,
    qk_scale,
    BLOCK_G: tl.constexpr,
    PAGE: tl.constexpr,
    DOT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One cache block ``p`` of :func:`_attend_pages_tma`'s online softmax; ``MASKED``: its
    rows from ``hi`` on are left out (V zeroed, K scored ``NO_SCORE``)."""
    first_row = (tl.load(table_row + p) * PAGE).to(tl.int32)
    k = k_desc.load([first_row, column])
    v = v_desc.load([first_row, column])
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_G, PAGE], dtype=tl.float32), DOT) * qk_scale
    if MASKED:
        live = p * PAGE + tl.arange(0, PAGE) < hi
        v = tl.where(live[:, None], v, 0.0)
        s = tl.where(live[None, :], s, NO_SCORE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    prob = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(prob, 1)
    acc = mma(prob.to(v.dtype), v, acc * alpha[:, None], DOT)
    return acc, m_new, l_i
