"""Attention over packed sequences of different lengths (prefill), optionally on top of a
prefix held in the paged KV cache (chunked prefill, prefix caching).

Sequence ``b`` has ``Lq = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` query rows in ``q`` and
``Lk = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` new key/value rows in ``k``/``v``; with a
paged prefix it also has ``P = prefix_lens[b]`` earlier tokens in the cache (read through
its block-table row, the layout in ``_attention``). Its keys, in position order, are the
``P`` prefix tokens and then the ``Lk`` new ones: ``T = P + Lk`` keys. Query row ``i`` sits
at position ``T - Lq + i`` (the queries are the last ``Lq`` tokens: bottom-right aligned,
as FlashAttention >= 2.1 and PyTorch's ``causal_lower_right``). Per query head ``h`` and
its KV head ``h // (NQ / NK)``, in fp32::

    s_j  = scale * q_i . key_j                 for the keys j the row may see:
                                               every j < T, or with causal=True j <= T - Lq + i
    out_i = sum_j softmax(s)_j value_j         (0 for a row that sees no key)

The usual cases: a plain prefill is ``P = 0``, ``Lk = Lq``; a chunk of a longer prompt
whose earlier chunks are cached is ``P`` = tokens already cached, ``Lk = Lq`` = the chunk;
a hit in a prefix cache is the same with ``P`` = the cached prefix. A server that has
already written the new tokens into the cache may also pass no new keys at all (``Lk =
0``, ``P`` = everything): every key then comes from the cache.

Kernel (FlashAttention-2's loop): a program takes ``BLOCK_M`` query rows of one sequence
and one query head and walks that sequence's keys in tiles of ``BLOCK_N``: the cached
prefix through the block table, then the new keys. Tiles that every row sees fully skip
the masks; only the tile at the end of a source and, when causal, those on the diagonal
pay for them; tiles past the diagonal are never read. Query tiles are launched longest
first (the last tile of a causal sequence has the most keys to read). The key: the longest
query length bucketed onto token buckets, the longest key count (``P + Lk``) onto context
buckets, heads, head size, causal, whether there is a prefix and the block size exactly,
and the dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _attention as a
from . import _common as c
from ._attention import NO_SCORE, attend_tiles, normalized
from ._gemm_common import SMEM_BYTES, dot_mode

_OP = "varlen_attention"

# fp32 values a thread holds for its share of the accumulator [BLOCK_M, head] and the score
# tile [BLOCK_M, BLOCK_N]. Past ~160, ptxas spills (sm_90, head size 128: 128x64 tiles on 4
# warps hold 192 and spill; on 8 warps 96, and use 204 registers without spilling).
MAX_FP32_PER_THREAD = 160


def _feasible(cfg: dict[str, Any]) -> bool:
    tile = cfg["BLOCK_M"] * cfg["BLOCK_N"]
    if cfg["num_warps"] == 1:
        return tile <= 32 * 32  # one warp only for tiny tiles (short sequences)
    return tile >= 256 * cfg["num_warps"]  # no idle warps


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    block_d = a.dot_floor(args["HEAD_SIZE"])
    if cfg["BLOCK_M"] * (block_d + cfg["BLOCK_N"]) / (32 * cfg["num_warps"]) > MAX_FP32_PER_THREAD:
        return False  # the fp32 accumulator and score tile would spill registers
    if cfg["BLOCK_M"] > a.dot_floor(c.bucket_of(args["max_seqlen_q"])):
        return False  # a query tile longer than every sequence
    keys = a.context_of(args["max_seqlen_k"])
    if cfg["BLOCK_N"] > keys:
        return False
    if cfg["num_stages"] > 1 and keys < 2 * cfg["BLOCK_N"]:
        return False  # a loop of one tile has nothing to pipeline
    elem = 4 if args["q_ptr"].dtype == torch.float32 else 2
    smem = (cfg["BLOCK_M"] + cfg["num_stages"] * 2 * cfg["BLOCK_N"]) * block_d * elem
    return smem <= SMEM_BYTES


SPACE = tunebook.Space(
    BLOCK_M=[16, 32, 64, 128],
    BLOCK_N=[16, 32, 64, 128],
    num_warps=[1, 2, 4, 8],
    num_stages=[1, 2, 3, 4],
    constraints=[_feasible],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """vLLM's prefix-prefill Triton kernel (``context_attention_fwd``) on sm80 and later:
    128x128 tiles, 8 warps, one stage."""
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}


@c.autotune(
    _OP,
    SPACE,
    key=[
        c.token_bucket("max_seqlen_q"),
        a.context_bucket("max_seqlen_k"),
        "NQ",
        "NK",
        "HEAD_SIZE",
        "CAUSAL",
        "HAS_PREFIX",
        "PAGE",
    ],
    hand_picked=hand_picked,
    inputs=lambda description: _inputs(description),
)
@triton.jit(do_not_specialize=["max_seqlen_q", "max_seqlen_k"])
def _varlen_attention_kernel(
    q_ptr,
    q_stride_t,
    q_stride_h,
    k_ptr,
    k_stride_t,
    k_stride_h,
    v_ptr,
    v_stride_t,
    v_stride_h,
    out_ptr,
    out_stride_t,
    out_stride_h,
    cu_q_ptr,
    cu_k_ptr,
    kc_ptr,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    vc_ptr,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    table_ptr,
    table_stride,
    prefix_ptr,
    qk_scale,
    max_seqlen_q,
    max_seqlen_k,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest-running tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        k_start = tl.load(cu_k_ptr + seq)
        k_len = tl.load(cu_k_ptr + seq + 1) - k_start
        if HAS_PREFIX:
            prefix = tl.maximum(tl.load(prefix_ptr + seq), 0)
        else:
            prefix = 0
        kv_head = head // (NQ // NK)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < q_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_SIZE
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * q_stride_t + head * q_stride_h + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        total = prefix + k_len
        q_pos = total - q_len + rows
        first_pos = total - q_len + tile * BLOCK_M  # the tile's first row
        last_pos = total - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_M) - 1  # its last real row
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], NO_SCORE, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_PREFIX:
            # Prefix keys sit at positions 0 .. P-1.
            if CAUSAL:
                seen_by_all = tl.minimum(prefix, first_pos + 1)
                seen = tl.minimum(prefix, last_pos + 1)
            else:
                seen_by_all = prefix
                seen = prefix
            full = tl.maximum(seen_by_all, 0) // BLOCK_N * BLOCK_N
            table_row = table_ptr + seq.to(tl.int64) * table_stride
            kc_base = kc_ptr + kv_head * kc_stride_h
            vc_base = vc_ptr + kv_head * vc_stride_h
            acc, m_i, l_i = attend_tiles(
                acc, m_i, l_i, q, q_pos, 0, full, prefix, 0,
                kc_base, vc_base, kc_stride_s, vc_stride_s, kc_stride_b, vc_stride_b, table_row,
                qk_scale, d, d_mask, BLOCK_M, BLOCK_N, False, CAUSAL, True, PAGE, DOT,
            )  # fmt: skip
            acc, m_i, l_i = attend_tiles(
                acc, m_i, l_i, q, q_pos, full, seen, prefix, 0,
                kc_base, vc_base, kc_stride_s, vc_stride_s, kc_stride_b, vc_stride_b, table_row,
                qk_scale, d, d_mask, BLOCK_M, BLOCK_N, True, CAUSAL, True, PAGE, DOT,
            )  # fmt: skip
        # New keys sit at positions P .. P+Lk-1.
        if CAUSAL:
            seen_by_all = tl.minimum(k_len, first_pos - prefix + 1)
            seen = tl.minimum(k_len, last_pos - prefix + 1)
        else:
            seen_by_all = k_len
            seen = k_len
        full = tl.maximum(seen_by_all, 0) // BLOCK_N * BLOCK_N
        k_base = k_ptr + k_start.to(tl.int64) * k_stride_t + kv_head * k_stride_h
        v_base = v_ptr + k_start.to(tl.int64) * v_stride_t + kv_head * v_stride_h
        acc, m_i, l_i = attend_tiles(
            acc, m_i, l_i, q, q_pos, 0, full, k_len, prefix,
            k_base, v_base, k_stride_t, v_stride_t, 0, 0, table_ptr,
            qk_scale, d, d_mask, BLOCK_M, BLOCK_N, False, CAUSAL, False, PAGE, DOT,
        )  # fmt: skip
        acc, m_i, l_i = attend_tiles(
            acc, m_i, l_i, q, q_pos, full, seen, k_len, prefix,
            k_base, v_base, k_stride_t, v_stride_t, 0, 0, table_ptr,
            qk_scale, d, d_mask, BLOCK_M, BLOCK_N, True, CAUSAL, False, PAGE, DOT,
        )  # fmt: skip
        out_rows = out_ptr + q_rows[:, None] * out_stride_t + head * out_stride_h + d[None, :]
        tl.store(
            out_rows,
            normalized(acc, l_i).to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )


@c.graph_break
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed sequences (see the module docstring for the math).

    ``q``: ``[total_q, NQ, head_size]``; ``k``, ``v``: ``[total_k, NK, head_size]``;
    float16/bfloat16/float32, token and head strides free, last dimension contiguous.
    ``cu_seqlens_q``/``cu_seqlens_k``: ``[batch + 1]`` int32/int64 offsets of each
    sequence's rows (``cu[0] = 0``, non-decreasing). ``scale`` defaults to
    ``head_size ** -0.5``. ``max_seqlen_q`` (the longest query length: it sizes the launch,
    so it must not be smaller than any) and ``max_seqlen_k`` (the longest ``P + Lk``: a
    tuning key, an upper bound is fine) are read from the offsets when omitted, which waits
    for the GPU. The paged prefix: ``k_cache``/``v_cache`` ``[num_blocks, block_size, NK,
    head_size]``, ``block_table`` ``[batch, max_blocks]`` and ``prefix_lens`` ``[batch]``,
    all four or none; a prefix must fit its row of the block table, and the offsets must
    stay within q's and k's rows, and ``max_seqlen_q`` must cover the longest (all checked
    where a ``max_seqlen`` is read from the GPU, not where both are given; on the CPU
    always). ``causal`` must be a bool and ``scale`` finite. Returns ``[total_q, NQ,
    head_size]`` in ``q``'s dtype (or ``out``); rows past ``cu_seqlens_q[-1]`` (a CUDA
    graph's padding) are zero in an output the op allocates, and left as they were in ``out``.

    >>> import torch
    >>> from tunebook.kernels import varlen_attention
    >>> q, k, v = torch.randn(5, 2, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    >>> cu = torch.tensor([0, 3, 5])                                  # sequences of 3 and 2 tokens
    >>> out = varlen_attention(q, k, v, cu, cu)
    >>> q0, k0, v0 = (t[:3].transpose(0, 1) for t in (q, k, v))       # the first, [heads, 3, 16]
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q0, k0, v0, is_causal=True, enable_gqa=True)
    >>> torch.allclose(out[:3], ref.transpose(0, 1), atol=1e-5)
    True
    """
    return _varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale,
        max_seqlen_q, max_seqlen_k, k_cache, v_cache, block_table, prefix_lens, out,
    )  # fmt: skip


def _check(
    q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, paged: tuple[Any, Any, Any, Any], out: Any = None
) -> None:
    """Validate the inputs (the paged prefix's four tensors all given, or none)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        a.check_heads(_OP, name, t)
    if k.shape != v.shape or k.shape[2] != q.shape[2] or k.dtype != q.dtype or v.dtype != q.dtype:
        c.fail(
            _OP,
            f"k and v must be [total_k, NK, {q.shape[2]}] of q's dtype {q.dtype}; found k {tuple(k.shape)} "
            f"{k.dtype}, v {tuple(v.shape)} {v.dtype}",
        )
    a.check_gqa(_OP, q.shape[1], k.shape[1])
    a.check_index(_OP, "cu_seqlens_q", cu_q, 1)
    a.check_index(_OP, "cu_seqlens_k", cu_k, 1)
    if cu_q.shape[0] < 1 or cu_q.shape != cu_k.shape:
        c.fail(
            _OP,
            f"cu_seqlens_q and cu_seqlens_k must both be [batch + 1]; found {tuple(cu_q.shape)} and "
            f"{tuple(cu_k.shape)}",
        )
    k_cache, v_cache, block_table, prefix_lens = paged
    given = [t is not None for t in paged]
    if any(given) and not all(given):
        c.fail(
            _OP, "a paged prefix needs k_cache, v_cache, block_table and prefix_lens together; some are None"
        )
    c.check_same_device(
        _OP, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        k_cache=k_cache, v_cache=v_cache, block_table=block_table, prefix_lens=prefix_lens, out=out,
    )  # fmt: skip
    if not all(given):
        return
    a.check_cache(_OP, k_cache, v_cache, k.shape[1], q.shape[2], q.dtype)
    a.check_index(_OP, "block_table", block_table, 2)
    a.check_index(_OP, "prefix_lens", prefix_lens, 1)
    batch = cu_q.shape[0] - 1
    if block_table.shape[0] != batch or prefix_lens.shape[0] != batch:
        c.fail(
            _OP,
            f"block_table and prefix_lens must have one row per sequence ({batch}); found "
            f"{tuple(block_table.shape)} and {tuple(prefix_lens.shape)}",
        )


def _varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    scale: float | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_table: torch.Tensor | None,
    prefix_lens: torch.Tensor | None,
    out: torch.Tensor | None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """:func:`varlen_attention`, launched with ``config`` (BLOCK_M, BLOCK_N, num_warps,
    num_stages) instead of the tuned one when given: tests and benchmarks use it."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, (k_cache, v_cache, block_table, prefix_lens), out)
    if not isinstance(causal, bool):  # a string or a tensor would read as True
        c.fail(_OP, f"causal must be True or False; found {causal!r}")
    a.check_scale(_OP, scale)
    a.check_length_bound(_OP, "max_seqlen_q", max_seqlen_q)
    a.check_length_bound(_OP, "max_seqlen_k", max_seqlen_k)
    # The offsets are read (one wait for the GPU) where a max_seqlen is missing, and on the CPU.
    read = max_seqlen_q is None or max_seqlen_k is None or q.device.type == "cpu"
    allocated = out is None
    if out is None:
        # Rows past cu_seqlens_q[-1] are written by no program: an output the op allocates has
        # them zeroed, the tail alone where the offsets are read (below), else all of it (a
        # memset on the stream: the tail's start is only known on the device).
        out = (torch.empty if read else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    else:
        c.check_out(_OP, "out", out, q.shape, q.dtype, {"q": q, "k": k, "v": v})
        if q.shape[2] > 1 and out.stride(2) != 1:
            c.fail(_OP, f"out's last dimension must be contiguous; found strides {tuple(out.stride())}")
    batch = cu_seqlens_q.shape[0] - 1
    if batch == 0 or q.shape[0] == 0 or q.shape[2] == 0:
        return out.zero_() if allocated else out  # no sequence: every row is past the last
    # One wait for the GPU reads what is missing, and checks the offsets (on the CPU: always)
    if read:
        c.refuse_read_in_capture(_OP, q.device, "max_seqlen_q" if max_seqlen_q is None else "max_seqlen_k")
        longest_q, longest_k, last_q = _read_offsets(
            q, k, cu_seqlens_q, cu_seqlens_k, k_cache, block_table, prefix_lens
        )
        if allocated and last_q < q.shape[0]:
            out[last_q:].zero_()
        if max_seqlen_q is not None and max_seqlen_q < longest_q:  # too few tiles: rows left unwritten
            c.fail(
                _OP,
                f"max_seqlen_q={max_seqlen_q} is less than the longest query sequence, {longest_q} rows "
                "(leave it out to have it read from cu_seqlens_q)",
            )
        max_seqlen_q = longest_q if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest_k if max_seqlen_k is None else max_seqlen_k
    assert max_seqlen_q is not None and max_seqlen_k is not None  # given, or read just above
    if max_seqlen_q <= 0:
        return out
    paged = None
    if k_cache is not None and v_cache is not None and block_table is not None and prefix_lens is not None:
        paged = (k_cache, v_cache, block_table, prefix_lens)
        a.check_block_table_on_cpu(
            _OP, block_table, prefix_lens, "prefix_lens", k_cache.shape[0], k_cache.shape[1]
        )
    # Offsets computed in 32 bits: a head's (the program's head index x the head stride).
    n_q, n_kv = q.shape[1], k.shape[1]
    heads = [("q", n_q, q), ("out", n_q, out), ("k", n_kv, k), ("v", n_kv, v)]
    products = [(name, "head", n, t.stride(1)) for name, n, t in heads]
    if paged is not None:
        products += [(name, "KV head", n_kv, t.stride(2)) for name, t in zip(("k_cache", "v_cache"), paged)]
    a.check_offsets(_OP, products)
    grid, args = _launch(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, max_seqlen_q, max_seqlen_k, paged, out
    )
    c.launch(_varlen_attention_kernel, grid, args, config)
    return out


def _read_offsets(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    k_cache: torch.Tensor | None,
    block_table: torch.Tensor | None,
    prefix_lens: torch.Tensor | None,
) -> tuple[int, int, int]:
    """The longest query length, the longest ``P + Lk`` and ``cu_q[-1]``, read from the device in one wait,
    with what that read shows for free checked: the offsets stay within q's and k's rows
    (a kernel would read and write past them) and each prefix fits the block table."""
    lens_q, lens_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    prefix = lens_k.new_zeros(()) if prefix_lens is None else prefix_lens.to(lens_k.dtype)
    scalars = (
        lens_q.max(), (lens_k + prefix).max(), prefix.max(),
        cu_q[0], lens_q.min(), cu_q[-1], cu_k[0], lens_k.min(), cu_k[-1],
    )  # fmt: skip
    read = torch.stack([t.to(torch.int64) for t in scalars]).tolist()
    longest_q, longest_k, longest_prefix = read[:3]
    for name, cu, (first, shortest, last), rows, t in (
        ("cu_seqlens_q", cu_q, read[3:6], q.shape[0], "q"),
        ("cu_seqlens_k", cu_k, read[6:9], k.shape[0], "k"),
    ):
        if first != 0 or shortest < 0 or last > rows:
            shown = cu[:16].tolist()
            hint = " (the cumulative sum of the lengths without its leading 0?)" if first > 0 else ""
            c.fail(
                _OP,
                f"{name} must be offsets from 0 that never decrease and end at most at {t}'s {rows} rows; "
                f"found {shown}{' ...' if cu.shape[0] > 16 else ''}{hint}",
            )
    if prefix_lens is not None:
        assert k_cache is not None and block_table is not None  # _check: all four or none
        capacity = block_table.shape[1] * k_cache.shape[1]
        if longest_prefix > capacity:
            blocks, page = block_table.shape[1], k_cache.shape[1]
            c.fail(
                _OP,
                f"a prefix of {longest_prefix} tokens does not fit the block table ({blocks} blocks "
                f"of {page} tokens = {capacity}); give each sequence the blocks of its prefix",
            )
    return int(longest_q), int(longest_k), int(read[5])


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    scale: float | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    paged: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    out: torch.Tensor,
) -> tuple[Any, tuple[Any, ...]]:
    """The kernel's grid and arguments for checked inputs; ``paged``: the caches, block
    table and prefix lengths, or None."""
    n_q, n_kv, head_size = q.shape[1], k.shape[1], q.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    # Read as ptr + i by the kernel: a strided view would be misread (or read out of bounds).
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if paged is not None:
        kc, vc, table, prefix = paged
        table, prefix = a.rows_contiguous(table), prefix.contiguous()
        page = kc.shape[1]
        cache_args = (kc, *kc.stride()[:3], vc, *vc.stride()[:3], table, table.stride(0), prefix)
    else:  # never read: HAS_PREFIX is off
        page = 0
        cache_args = (k, 0, 0, 0, v, 0, 0, 0, cu_seqlens_q, 0, cu_seqlens_q)
    args = (
        *(q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1)),
        *(out, out.stride(0), out.stride(1), cu_seqlens_q, cu_seqlens_k),
        *cache_args,
        a.softmax_scale(scale, head_size) * a.LOG2E,
        int(max_seqlen_q),
        max(int(max_seqlen_k), 1),
        *(n_q, n_kv, head_size, bool(causal), paged is not None, page),
        a.dot_floor(head_size),
        dot_mode(q.dtype),
    )

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (c.cdiv(int(max_seqlen_q), meta["BLOCK_M"]), n_q, batch)

    return grid, args


def _inputs(description: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A call of the key's shape for offline tuning (``tunebook tune``): as many tokens as
    the recorded call had (8192 without one), packed in sequences of mixed lengths up to
    ``max_seqlen_q``, each on a prefix of ``max_seqlen_k - max_seqlen_q`` cached tokens if
    the key has one, as the benchmarks build them (a recorded call's layout alone would give
    all-zero offsets and block tables)."""
    from . import _models

    key, call = description["key"], description.get("call")
    longest = int(key["max_seqlen_q"])
    try:
        tokens = int(call["args"][0]["tensor"]["shape"][0])  # type: ignore[index]
    except (TypeError, KeyError, IndexError, ValueError):
        tokens = max(longest, _models.PREFILL_TOKENS[0])
    shape = {
        "n_q": key["NQ"],
        "n_kv": key["NK"],
        "head_size": key["HEAD_SIZE"],
        "seqlen": longest,
        "prefix": max(int(key["max_seqlen_k"]) - longest, 1) if key["HAS_PREFIX"] else 0,
        "causal": bool(key["CAUSAL"]),
    }
    if key["HAS_PREFIX"]:
        shape["page"] = key["PAGE"]  # the call's own block size: it is part of the key
    dtype = a.recorded_dtype(call, "q_ptr", _varlen_attention_kernel)
    t = _models.workload(_OP, shape, max(tokens, 1), dtype, a.tuning_device()).tensors
    cu = t["cu_seqlens"]
    paged = (t["k_cache"], t["v_cache"], t["block_table"], t["prefix_lens"]) if shape["prefix"] else None
    grid, args = _launch(
        t["q"], t["k"], t["v"], cu, cu, shape["causal"], None, longest, key["max_seqlen_k"], paged, t["out"]
    )
    return grid, args, {}
