"""Rotary position embedding (RoPE) of queries and keys, in vLLM's layout.

Inputs: ``q`` ``[tokens, n_q_heads * head_size]`` or ``[tokens, n_q_heads, head_size]``,
``k`` likewise with ``n_kv_heads``, ``positions`` ``[tokens]`` (integers), and
``cos_sin_cache`` ``[max_position, rotary_dim]`` holding ``cos`` in its first half and
``sin`` in its second: for a token at position ``p`` and ``i < rotary_dim / 2``,
``cos_i = cache[p, i]`` and ``sin_i = cache[p, rotary_dim/2 + i]``.

Per head, the first ``rotary_dim`` dimensions (all of them unless partial rotary) form
``rotary_dim / 2`` pairs ``(x1_i, x2_i)`` that are rotated, in fp32::

    out1_i = x1_i * cos_i - x2_i * sin_i
    out2_i = x2_i * cos_i + x1_i * sin_i

    neox style: x1_i = x[i],      x2_i = x[i + rotary_dim/2]   (rotate halves)
    gptj style: x1_i = x[2i],     x2_i = x[2i + 1]             (rotate interleaved pairs)

Dimensions from ``rotary_dim`` to ``head_size`` pass through unchanged. Outputs are new
tensors of the inputs' shapes and dtypes (or the ``out=`` pair), never ``q`` and ``k``
themselves: vLLM rotates in place, but tuning reruns the kernel on the call's own
arguments, which would rotate an in-place ``q`` once per measurement. Positions are not
bounds-checked on a GPU (that would synchronize with it): each must be ``< max_position``
(on the CPU, where checking costs no wait, one that is not is a ValueError).

Kernel: a program takes ``BLOCK_T`` tokens, loads their ``cos``/``sin`` once, and walks
``HEAD_TILES`` tiles of ``BLOCK_H`` heads (query tiles, then key tiles) in a loop
``num_stages`` deep. ``BLOCK_T = 1`` with one tile of all query heads and one of all key
heads is Liger-Kernel's launch. The key is the token count bucketed onto serving batch
sizes; head counts, head size, rotary dim and style exactly; and the dtypes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _common as c

_OP = "rotary_embedding"
STYLES = ("neox", "gptj")


def _tiles(n_heads: int, block_h: int) -> int:
    return -(-n_heads // block_h)


def _feasible(cfg: dict[str, Any]) -> bool:
    # A loop of one or two tiles has nothing to pipeline: the same kernel timed again.
    return cfg["HEAD_TILES"] > 2 or cfg["num_stages"] == 1


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    rot_block = c.pow2_at_least(args["ROTARY_DIM"] // 2)
    if not c.threads_fit(cfg["BLOCK_T"] * cfg["BLOCK_H"] * rot_block, cfg["num_warps"]):
        return False
    if cfg["BLOCK_H"] > c.pow2_at_least(max(args["NQ"], args["NK"])):
        return False  # only masked-off heads
    total = _tiles(args["NQ"], cfg["BLOCK_H"]) + _tiles(args["NK"], cfg["BLOCK_H"])
    smaller = [h for h in HEAD_TILES if h < cfg["HEAD_TILES"]]
    if smaller and max(smaller) >= total:
        return False  # a smaller HEAD_TILES already puts every tile in one program
    return cfg["BLOCK_T"] <= c.bucket_of(args["n_tokens"])


# 64: every tile of a token block in one program, as vLLM's CUDA kernel walks all heads.
HEAD_TILES = [1, 2, 4, 64]

SPACE = tunebook.Space(
    BLOCK_T=[1, 2, 4, 8],
    BLOCK_H=[1, 2, 4, 8, 16, 32],
    HEAD_TILES=HEAD_TILES,
    num_warps=[1, 2, 4, 8],
    num_stages=[1, 2],
    constraints=[_feasible],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """Liger-Kernel's launch: one token per program, all query heads in one tile and all key
    heads in another, Triton's default 4 warps."""
    block_h = c.pow2_at_least(max(key["NQ"], key["NK"]))
    return {"BLOCK_T": 1, "BLOCK_H": block_h, "HEAD_TILES": 2, "num_warps": 4, "num_stages": 1}


@triton.jit
def _rotate_tiles(
    src_ptr,
    src_t_stride,
    src_h_stride,
    dst_ptr,
    dst_t_stride,
    dst_h_stride,
    tok,
    tok_mask,
    cos,
    sin,
    first_tile,
    end_tile,
    n_heads,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    ROT_BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate heads [first_tile * BLOCK_H, end_tile * BLOCK_H) of ``tok``'s tokens."""
    d = tl.arange(0, ROT_BLOCK)[None, None, :]
    if IS_NEOX:
        i1 = d
        i2 = d + HALF
    else:
        i1 = 2 * d
        i2 = 2 * d + 1
    for tile in tl.range(first_tile, end_tile):
        heads = tile * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
        mask = tok_mask[:, None, None] & (heads < n_heads)
        src = src_ptr + tok[:, None, None] * src_t_stride + heads * src_h_stride
        dst = dst_ptr + tok[:, None, None] * dst_t_stride + heads * dst_h_stride
        rot_mask = mask & (d < HALF)
        x1 = tl.load(src + i1, mask=rot_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + i2, mask=rot_mask, other=0.0).to(tl.float32)
        tl.store(dst + i1, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=rot_mask)
        tl.store(dst + i2, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=rot_mask)
        if TAIL_BLOCK > 0:  # partial rotary: copy the dimensions that do not rotate
            e = 2 * HALF + tl.arange(0, TAIL_BLOCK)[None, None, :]
            tail_mask = mask & (e < HEAD_SIZE)
            tl.store(dst + e, tl.load(src + e, mask=tail_mask, other=0.0), mask=tail_mask)


@c.autotune(
    _OP,
    SPACE,
    key=[c.token_bucket("n_tokens"), "NQ", "NK", "HEAD_SIZE", "ROTARY_DIM", "IS_NEOX"],
    hand_picked=hand_picked,
)
@triton.jit
def _rotary_embedding_kernel(
    q_ptr,
    q_t_stride,
    q_h_stride,
    k_ptr,
    k_t_stride,
    k_h_stride,
    qo_ptr,
    qo_t_stride,
    qo_h_stride,
    ko_ptr,
    ko_t_stride,
    ko_h_stride,
    pos_ptr,
    cache_ptr,
    cache_stride,
    n_tokens,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    ROT_BLOCK: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_TILES: tl.constexpr,
):
    HALF: tl.constexpr = ROTARY_DIM // 2
    Q_TILES: tl.constexpr = (NQ + BLOCK_H - 1) // BLOCK_H
    K_TILES: tl.constexpr = (NK + BLOCK_H - 1) // BLOCK_H
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    tok = tok.to(tl.int64)  # token * stride can pass 2^31 at long prefills
    pos = tl.load(pos_ptr + tok, mask=tok_mask, other=0).to(tl.int64)
    d = tl.arange(0, ROT_BLOCK)[None, :]
    cs_mask = tok_mask[:, None] & (d < HALF)
    cs = cache_ptr + pos[:, None] * cache_stride + d
    # Loaded once per program, shared by every head it rotates.
    cos = tl.load(cs, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(cs + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    first = tl.program_id(1) * HEAD_TILES
    last = tl.minimum(first + HEAD_TILES, Q_TILES + K_TILES)
    # Tiles [0, Q_TILES) are the query's, the rest the key's; a program may span both.
    _rotate_tiles(
        q_ptr, q_t_stride, q_h_stride, qo_ptr, qo_t_stride, qo_h_stride, tok, tok_mask, cos, sin,
        first, tl.minimum(last, Q_TILES), NQ,
        HEAD_SIZE, HALF, IS_NEOX, ROT_BLOCK, TAIL_BLOCK, BLOCK_H,
    )  # fmt: skip
    _rotate_tiles(
        k_ptr, k_t_stride, k_h_stride, ko_ptr, ko_t_stride, ko_h_stride, tok, tok_mask, cos, sin,
        tl.maximum(first - Q_TILES, 0), last - Q_TILES, NK,
        HEAD_SIZE, HALF, IS_NEOX, ROT_BLOCK, TAIL_BLOCK, BLOCK_H,
    )  # fmt: skip


@c.graph_break
def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    style: str = "neox",
    rotary_dim: int | None = None,
    *,
    head_size: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by their tokens' positions; returns new ``(q, k)``.

    ``q``/``k``: float16/bfloat16/float32, ``[tokens, heads * head_size]`` (then pass
    ``head_size``) or ``[tokens, heads, head_size]``; token and head strides are free (e.g.
    slices of a fused QKV projection); a strided last dimension is copied first.
    ``positions``: ``[tokens]`` int32/int64, each in ``[0, max_position)`` (not checked
    on a GPU: that would wait for it; checked on the CPU). ``cos_sin_cache``: ``[max_position,
    rotary_dim]``. ``style``: ``"neox"`` (rotate halves) or ``"gptj"`` (interleaved
    pairs). ``rotary_dim``: defaults to the cache's width, and must equal it when given.
    ``out``: a ``(q_out, k_out)`` pair to write instead of new tensors; neither may overlap
    an input.

    >>> import torch
    >>> from tunebook.kernels import rotary_embedding
    >>> cache = torch.cat([torch.ones(16, 2), torch.zeros(16, 2)], dim=1)   # angle 0
    >>> q, k = torch.randn(3, 2, 4), torch.randn(3, 1, 4)
    >>> q2, k2 = rotary_embedding(q, k, torch.tensor([0, 5, 9]), cache)
    >>> torch.equal(q2, q) and torch.equal(k2, k)
    True
    """
    return _rotary_embedding(q, k, positions, cos_sin_cache, style, rotary_dim, head_size, out)


def cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> torch.Tensor:
    """The ``[max_position, rotary_dim]`` cache :func:`rotary_embedding` reads, as vLLM
    builds it: ``cos`` then ``sin`` of ``p * base^(-2i / rotary_dim)`` for ``i < rotary_dim/2``
    (angles computed in float64, then converted to ``dtype``).

    >>> cos_sin_cache(4, 3)[:, :2]  # cos; position 0 is angle 0
    tensor([[ 1.0000,  1.0000],
            [ 0.5403,  0.9999],
            [-0.4161,  0.9998]])
    """
    # An odd width once gave a cache one column wider than asked, with angles for neither
    # width; a negative size, torch's "upper bound and lower bound inconsistent".
    if _as_int(rotary_dim) < 2 or rotary_dim % 2:
        c.fail(_OP, f"cos_sin_cache: rotary_dim must be an even integer >= 2; found {rotary_dim!r}")
    if _as_int(max_position) < 1:
        c.fail(_OP, f"cos_sin_cache: max_position must be an integer >= 1; found {max_position!r}")
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=device)


def _as_int(value: Any) -> int:
    """``value`` as an int (numpy's too); -1, which every check refuses, for anything else."""
    try:
        return -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return -1


def _heads_view(t: torch.Tensor, n_tokens: int, head_size: int) -> torch.Tensor:
    """``t`` as ``[tokens, heads, head_size]`` with a contiguous last dimension (a view when
    the layout allows, e.g. strided tokens; a copy otherwise)."""
    view = t if t.dim() == 3 else t.reshape(n_tokens, t.shape[1] // head_size, head_size)
    return view if view.stride(2) == 1 or head_size == 1 else view.contiguous()


def _out_view(name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An output as ``[tokens, heads, head_size]``, always a view of ``t``."""
    view = None
    if t.dim() == 3:
        view = t
    else:
        try:
            view = t.view(like.shape)
        except RuntimeError:
            pass
    if view is None or (view.shape[2] > 1 and view.stride(2) != 1):
        c.fail(
            _OP,
            f"{name} must have a contiguous last dimension (strides {tuple(t.stride())}); pass a "
            "contiguous tensor",
        )
    return view


def _check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    style: str,
    rotary_dim: int | None,
    head_size: int | None,
) -> tuple[int, int]:
    """Validate the inputs; returns (head_size, rotary_dim)."""
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        c.check_float(_OP, name, t)
    if style not in STYLES:
        c.fail(_OP, f"style must be 'neox' or 'gptj'; found {style!r}")
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dim() != 1
        or positions.dtype
        not in (
            torch.int32,
            torch.int64,
        )
    ):
        found = (
            f"{positions.dtype} of shape {tuple(positions.shape)}"
            if isinstance(positions, torch.Tensor)
            else type(positions).__name__
        )
        c.fail(_OP, f"positions must be a 1-D int32 or int64 tensor [tokens]; found {found}")
    if q.dim() not in (2, 3) or k.dim() != q.dim():
        c.fail(
            _OP,
            "q and k must both be [tokens, heads * head_size] or both [tokens, heads, head_size]; "
            f"found shapes {tuple(q.shape)} and {tuple(k.shape)}",
        )
    n_tokens = positions.shape[0]
    if q.shape[0] != n_tokens or k.shape[0] != n_tokens:
        c.fail(
            _OP,
            f"q, k and positions must have the same number of tokens; found {q.shape[0]}, {k.shape[0]} "
            f"and {n_tokens}",
        )
    if q.dim() == 3:
        if head_size is not None and head_size != q.shape[2]:
            c.fail(_OP, f"head_size={head_size} but q's last dimension is {q.shape[2]}")
        head_size = q.shape[2]
        if k.shape[2] != head_size:
            c.fail(_OP, f"q and k must have the same head size; found {q.shape[2]} and {k.shape[2]}")
    elif head_size is None:
        c.fail(
            _OP,
            "q is 2-D [tokens, heads * head_size]: pass head_size=..., or pass q and k as "
            "[tokens, heads, head_size]",
        )
    else:
        if isinstance(head_size, bool) or not isinstance(head_size, int):
            c.fail(_OP, f"head_size must be an int; found {head_size!r}")
        for name, t in (("q", q), ("k", k)):
            if head_size < 1 or t.shape[1] % head_size:
                c.fail(
                    _OP, f"{name}'s last dimension {t.shape[1]} is not a multiple of head_size={head_size}"
                )
    if cos_sin_cache.dim() != 2:
        c.fail(
            _OP,
            f"cos_sin_cache must be 2-D [max_position, rotary_dim]; found shape {tuple(cos_sin_cache.shape)}",
        )
    width = cos_sin_cache.shape[1]
    if rotary_dim is not None and rotary_dim != width:
        c.fail(
            _OP,
            f"rotary_dim={rotary_dim} but cos_sin_cache has {width} columns (cos and sin, "
            f"rotary_dim/2 each); build the cache with rotary_dim columns",
        )
    if width < 2 or width % 2 or width > head_size:
        c.fail(
            _OP,
            f"rotary_dim (cos_sin_cache's width) must be even and in [2, head_size={head_size}]; "
            f"found {width}",
        )
    if q.shape[1] == 0 or k.shape[1] == 0:
        c.fail(_OP, f"q and k need at least one head; found shapes {tuple(q.shape)} and {tuple(k.shape)}")
    return head_size, width


def _rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    style: str,
    rotary_dim: int | None,
    head_size: int | None,
    out: tuple[torch.Tensor, torch.Tensor] | None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_embedding`, launched with ``config`` (BLOCK_T, BLOCK_H, HEAD_TILES,
    num_warps, num_stages) instead of the tuned one when given: tests and benchmarks use it."""
    head_size, rotary_dim = _check_shapes(q, k, positions, cos_sin_cache, style, rotary_dim, head_size)
    c.check_same_device(_OP, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    inputs = {"q": q, "k": k, "positions": positions, "cos_sin_cache": cos_sin_cache}
    if out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:
        if not isinstance(out, tuple | list) or len(out) != 2:
            c.fail(_OP, f"out must be a (q_out, k_out) pair; found {type(out).__name__}")
        q_out, k_out = out
        c.check_same_device(_OP, q=q, q_out=q_out, k_out=k_out)
        c.check_out(_OP, "out[0]", q_out, q.shape, q.dtype, inputs)
        c.check_out(_OP, "out[1]", k_out, k.shape, k.dtype, {**inputs, "out[0]": q_out})
    n_tokens = positions.shape[0]
    if n_tokens == 0:
        return q_out, k_out
    rows = cos_sin_cache.shape[0]
    c.check_indices_on_cpu(_OP, "positions", positions, 0, rows, f"cos_sin_cache has {rows} rows")
    q3 = _heads_view(q, n_tokens, head_size)
    k3 = _heads_view(k, n_tokens, head_size)
    qo3 = _out_view("out[0]", q_out, q3)
    ko3 = _out_view("out[1]", k_out, k3)
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    positions = positions.contiguous()  # the kernel reads token i's position at positions + i
    n_q, n_k = q3.shape[1], k3.shape[1]
    # A head's offset (head x head stride) is computed in 32 bits (_rotate_tiles).
    heads = (("q", q3, n_q), ("k", k3, n_k), ("out[0]", qo3, n_q), ("out[1]", ko3, n_k))
    c.check_offsets(
        _OP,
        [(name, "head", n, t.stride(1)) for name, t, n in heads],
        "pass it with each token's heads side by side (token-major, e.g. contiguous)",
    )
    half = rotary_dim // 2
    tail = head_size - rotary_dim
    args = (
        *(q3, q3.stride(0), q3.stride(1), k3, k3.stride(0), k3.stride(1)),
        *(qo3, qo3.stride(0), qo3.stride(1), ko3, ko3.stride(0), ko3.stride(1)),
        *(positions, cache, cache.stride(0), n_tokens),
        *(n_q, n_k, head_size, rotary_dim, style == "neox"),
        c.pow2_at_least(half),
        c.pow2_at_least(tail) if tail else 0,
    )

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        tiles = _tiles(n_q, meta["BLOCK_H"]) + _tiles(n_k, meta["BLOCK_H"])
        return (c.cdiv(n_tokens, meta["BLOCK_T"]), c.cdiv(tiles, meta["HEAD_TILES"]))

    c.launch(_rotary_embedding_kernel, grid, args, config)
    return q_out, k_out
