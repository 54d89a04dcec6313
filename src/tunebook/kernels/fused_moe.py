"""``fused_moe``: a Mixture-of-Experts MLP with SwiGLU experts, as vLLM's fused MoE computes it.

Shapes: ``x`` ``[T, H]`` tokens, ``w13`` ``[E, 2I, H]`` (per expert the gate projection W1 in
rows ``[0, I)`` and the up projection W3 in rows ``[I, 2I)``, stacked as vLLM stores them),
``w2`` ``[E, H, I]``, ``topk_weights`` ``[T, k]`` float, ``topk_ids`` ``[T, k]`` int::

    out[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),
             e = topk_ids[t, j],   silu(g) = g * sigmoid(g)

Steps, each one launch or a few:

1. **Align** (``moe_align``, ``_moe_align.py``; no host sync): the ``T*k`` (token, expert)
   pairs are sorted by expert and each expert's run is padded to a multiple of ``ALIGN`` rows
   with a sentinel id; ``chunk_expert[c]`` names the expert of each aligned chunk,
   ``num_padded`` the rows used. A pair whose expert id is outside ``[0, E)`` gets no row
   (vLLM's expert parallelism marks other ranks' experts -1): it adds nothing to its token's
   sum. One Triton launch (PyTorch ops, about 15 small kernels, past the sizes it serves).
2. **GEMM 1 + SiLU-and-mul** (``_moe_gemm1_kernel``): each program multiplies a block of
   sorted rows by its expert's gate and up tiles (two fp32 accumulators) and writes
   ``silu(gate) * up`` as ``[T*k, I]``: the ``[T*k, 2I]`` intermediate of vLLM never exists.
3. **GEMM 2** (``_moe_gemm2_kernel``): ``[T*k, I] @ W2[e].T``, scaled by the routing weight
   in fp32 before the cast, written as ``[T*k, H]`` (straight into ``out`` when k = 1).
4. **Reduce** over the k experts of each token: ``torch.sum`` (fp32 accumulation).

**The alignment does not depend on the tuned config.** The padding a block of ``BLOCK_SIZE_M``
rows needs is only known once the autotuner has picked the config, which is inside the
launch. So every expert is padded to a fixed ``ALIGN`` chosen before the launch: the largest
``BLOCK_SIZE_M`` the Space allows for this call, ``min(128, max(16, bucket(T)))`` (an expert
never gets more than T rows, so larger blocks than that only compute padding). The Space's
argument constraint ``BLOCK_SIZE_M <= ALIGN`` keeps every candidate consistent with it. A
block smaller than ``ALIGN`` reads the expert of its aligned chunk (``row // ALIGN``) and
returns at once when its first row is padding (an expert's real rows come first in its
chunk). At decode (T=1) ALIGN is 16, the same grid vLLM launches; for a prefill block sizes
up to 128 are tuned. ``config=`` (explicit configs, e.g. vLLM's tables) aligns to that
config's ``BLOCK_SIZE_M``, exactly as vLLM does.

Config names are vLLM's table fields (``BLOCK_SIZE_M/N/K``, ``GROUP_SIZE_M``, ``num_warps``,
``num_stages``), with one convention: GEMM 1's ``BLOCK_SIZE_N`` counts columns of the
``[2I]`` output as vLLM's unfused GEMM 1 does, so a program holds ``BLOCK_SIZE_N/2`` gate and
``BLOCK_SIZE_N/2`` up columns: the same tile footprint a vLLM config gives its GEMM 1.

Tuning keys: ``[bucket(M = T), N, K, E, TOP_K]`` and the dtypes (vLLM keys its tables by M and
takes the nearest M; the bucket does that job). In serve mode without a book, the config
nearest to :func:`vllm_default_config` is launched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import triton
import triton.language as tl

import tunebook

from ._common import (
    cdiv,
    check_device,
    check_out,
    check_tensors,
    fail,
    graph_break,
    max_configs,
    pow2_at_least,
    shipped_books,
)
from ._gemm_common import (
    M_EDGES,
    MAX_ACC_PER_THREAD,
    NAME_PREFIX,
    SMEM_BYTES,
    acc_per_thread,
    bucket_m,
    check_launch_values,
    dot_mode,
    mma,
    nearest_config,
    reaches_past,
    smem_estimate,
    too_far,
)
from ._moe_align import moe_align

__all__ = [
    "VLLM_TABLES",
    "fused_moe",
    "moe_align",
    "moe_align_size",
    "moe_space",
    "vllm_config_to_kernel",
    "vllm_default_config",
]

MOE_META = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")
_MOE_POWERS_OF_TWO = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps")
MAX_ALIGN = 128  # the largest BLOCK_SIZE_M of the Space


def moe_align_size(T: int) -> int:
    """ALIGN for a batch of ``T`` tokens: the largest block height worth tuning for it."""
    return min(MAX_ALIGN, max(16, bucket_m(T)))


def _fits(c: Mapping[str, Any]) -> bool:
    if smem_estimate(c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"], c["num_stages"]) > SMEM_BYTES:
        return False
    return acc_per_thread(c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"], c["num_warps"]) <= MAX_ACC_PER_THREAD


def _fits_call(c: Mapping[str, Any], args: Mapping[str, Any], n_per_col: int) -> bool:
    if c["BLOCK_SIZE_M"] > args["ALIGN"]:
        return False
    if c["BLOCK_SIZE_N"] > max(32, n_per_col * pow2_at_least(args["N"])):
        return False
    return c["BLOCK_SIZE_K"] <= max(32, pow2_at_least(args["K"]))


def moe_space(gemm: int) -> tunebook.Space:
    """The config space of grouped GEMM ``gemm`` (1: w13 + SiLU-and-mul, 2: w2)."""
    # GEMM 1's BLOCK_SIZE_N spans gate and up columns: twice the output columns it fills.
    n_per_col = 2 if gemm == 1 else 1
    return tunebook.Space(
        BLOCK_SIZE_M=[16, 32, 64, 128],
        BLOCK_SIZE_N=[32, 64, 128, 256],
        BLOCK_SIZE_K=[32, 64, 128, 256],
        GROUP_SIZE_M=[1, 8, 16, 32, 64],
        num_warps=[4, 8],
        num_stages=[2, 3, 4, 5],
        constraints=[_fits],
        arg_constraints=[lambda c, args: _fits_call(c, args, n_per_col)],
    )


def vllm_default_config(
    M: int, E: int, N: int, K: int, topk: int, dtype: Any = None, block_shape: Any = None
) -> dict[str, int]:
    """vLLM 0.33's fused-MoE config when no table matches (``get_default_config``), for 16-bit
    weights on CUDA: the rule as read in the vllm 0.33.0 wheel, written here so that the
    benchmarks can compare against it without vLLM installed.

    ``M`` tokens, ``E`` experts, ``N`` the intermediate size (``w2.shape[2]``), ``K`` the hidden
    size, ``topk``. Tiles grow with M: BLOCK_SIZE_M 16 / 32 / 64 / 128 up to 32 / 96 / 512 /
    more tokens; BLOCK_SIZE_N 64 up to 64 tokens, else 128; BLOCK_SIZE_K 128 up to 64 tokens,
    else 64; GROUP_SIZE_M 16 where an expert gets more than 128 tokens on average (M // E),
    else 1; 4 warps up to 128 tokens, else 8; 4 pipeline stages up to 32 tokens, else 3. (N,
    K and topk do not enter the 16-bit rule.)

    >>> sorted(vllm_default_config(1, 8, 14336, 4096, 2).items())  # doctest: +NORMALIZE_WHITESPACE
    [('BLOCK_SIZE_K', 128), ('BLOCK_SIZE_M', 16), ('BLOCK_SIZE_N', 64), ('GROUP_SIZE_M', 1),
     ('num_stages', 4), ('num_warps', 4)]
    """
    if block_shape is not None:
        raise NotImplementedError("vllm_default_config: block-quantized (fp8) configs are not modelled")
    block_m = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    block_n = 64 if M <= 64 else 128
    block_k = 128 if M <= 64 else 64
    group_m = 16 if M // max(E, 1) > 128 else 1
    num_warps = 4 if M <= 128 else 8
    num_stages = 4 if M <= 32 else 3
    return {
        "BLOCK_SIZE_M": block_m,
        "BLOCK_SIZE_N": block_n,
        "BLOCK_SIZE_K": block_k,
        "GROUP_SIZE_M": group_m,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def vllm_config_to_kernel(config: Mapping[str, Any]) -> tuple[dict[str, int], list[str]]:
    """A vLLM table entry as this kernel's config, and the fields it had to drop.

    vLLM's fields map one to one; ``num_warps``/``num_stages`` default to Triton's 4 and 3
    when a table leaves them out; ROCm-only fields (``waves_per_eu``, ``matrix_instr_nonkdim``,
    ``kpack``) and ``SPLIT_K=1`` are dropped; GEMM 1 needs ``BLOCK_SIZE_N >= 32`` (16 columns
    each of gate and up), so a smaller one is raised to 32.
    """
    missing = [k for k in MOE_META if k not in config]
    if missing:
        raise ValueError(
            f"vllm_config_to_kernel: the config lacks {', '.join(missing)} (it names {', '.join(MOE_META)}, "
            f"and num_warps, num_stages or their defaults 4 and 3); found {dict(config)}"
        )
    check_launch_values("fused_moe", config, _MOE_POWERS_OF_TWO, ("GROUP_SIZE_M",))
    out = {k: int(config[k]) for k in MOE_META}
    out["num_warps"] = int(config.get("num_warps", 4))
    out["num_stages"] = int(config.get("num_stages", 3))
    dropped = [k for k in config if k not in out]
    if int(config.get("SPLIT_K", 1)) != 1:
        raise ValueError(f"vllm_config_to_kernel: SPLIT_K={config['SPLIT_K']} is not supported: {config}")
    if out["BLOCK_SIZE_N"] < 32:
        out["BLOCK_SIZE_N"] = 32
        dropped.append("BLOCK_SIZE_N<32")
    return out, dropped


def _fallback_for(gemm: int) -> Any:
    def fallback(key: tuple[Any, ...], configs: list[Any]) -> Any:
        M, N, K, E, top_k = key[:5]
        inter, hidden = (N, K) if gemm == 1 else (K, N)
        return nearest_config(configs, vllm_default_config(M, E, inter, hidden, top_k))

    return fallback


# The kernel name ``tunebook import --format vllm --kernel`` files vLLM's tables under for the pack.
VLLM_TABLES = "vllm.fused_moe"
_SIXTEEN_BIT = ("torch.bfloat16", "torch.float16")


def _vllm_key_for(gemm: int) -> Any:
    def vllm_key(key: tuple[Any, ...]) -> dict[str, Any] | None:
        """This GEMM's key -> vLLM's table key: E, N = the intermediate size, M = the tokens.
        vLLM's tables without a dtype are its 16-bit ones; an fp32 call has none."""
        M, N, K, E, _top_k, x_dtype = key[:6]
        if x_dtype not in _SIXTEEN_BIT:
            return None
        return {"E": E, "N": N if gemm == 1 else K, "M": M}

    return vllm_key


def _vllm_table_config(config: Mapping[str, Any]) -> dict[str, int] | None:
    """An imported vLLM entry as this kernel's config; None for one the kernel cannot run."""
    try:
        return vllm_config_to_kernel(config)[0]
    except (KeyError, TypeError, ValueError):
        return None


@triton.jit
def _moe_rows(
    pid,
    sorted_ids_ptr,
    chunk_expert_ptr,
    num_valid,
    ALIGN,
    CAP,
    n_cols,
    BLOCK_SIZE_M: tl.constexpr,
    COLS: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """Program ``pid``'s block of sorted rows and of columns (grouped for L2 reuse).

    Returns (live, column block, expert, row ids, valid rows). A block is dead when all its
    rows are padding: past the rows in use (``moe_align`` fills them with ``num_valid``), or
    a block smaller than ALIGN past its expert's rows (the real rows come first).
    """
    num_pid_m = CAP // BLOCK_SIZE_M
    per_group = GROUP_SIZE_M * tl.cdiv(n_cols, COLS)
    first_m = (pid // per_group) * GROUP_SIZE_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    first_row = pid_m * BLOCK_SIZE_M
    ids = tl.load(sorted_ids_ptr + first_row + tl.arange(0, BLOCK_SIZE_M))
    expert = tl.load(chunk_expert_ptr + first_row // ALIGN).to(tl.int64)
    valid = ids < num_valid
    return tl.min(ids, axis=0) < num_valid, (pid % per_group) // rows_in_group, expert, ids, valid


def _moe_autotune(gemm: int) -> Any:
    return tunebook.autotune(
        configs=moe_space(gemm),
        key=[tunebook.bucket("M", list(M_EDGES)), "N", "K", "E", "TOP_K"],
        name=f"{NAME_PREFIX}fused_moe.gemm{gemm}",
        books=shipped_books,
        max_configs=max_configs(),
        fallback=_fallback_for(gemm),
        prefer_nearest=True,  # a tuned neighbouring bucket first
        # vLLM's tables, imported (docs/kernels.md): this GPU's serve a key the book lacks
        tables=tunebook.Tables(VLLM_TABLES, key=_vllm_key_for(gemm), config=_vllm_table_config),
    )


@_moe_autotune(1)
@triton.jit
def _moe_gemm1_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    sorted_ids_ptr,
    chunk_expert_ptr,
    M,
    N,
    K,
    E,
    TOP_K: tl.constexpr,
    num_valid,
    ALIGN,
    CAP,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_hn,
    DOT: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """h[r] = silu(x[t] @ W1[e].T) * (x[t] @ W3[e].T) for the sorted rows r = (t, e) of a block."""
    HALF: tl.constexpr = BLOCK_SIZE_N // 2
    live, pid_n, expert, ids, valid = _moe_rows(
        tl.program_id(0), sorted_ids_ptr, chunk_expert_ptr, num_valid, ALIGN, CAP, N, BLOCK_SIZE_M, HALF,
        GROUP_SIZE_M,
    )  # fmt: skip
    if not live:
        return
    tokens = tl.where(valid, ids // TOP_K, 0)  # padding rows read token 0; never stored
    cols = pid_n * HALF + tl.arange(0, HALF)
    ks = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + (cols % N)[None, :] * stride_wn + ks[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_SIZE_M, HALF), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_SIZE_M, HALF), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - step * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        acc_g = mma(a, tl.load(g_ptrs, mask=ks[:, None] < k_left, other=0.0), acc_g, DOT)
        acc_u = mma(a, tl.load(u_ptrs, mask=ks[:, None] < k_left, other=0.0), acc_u, DOT)
        a_ptrs += BLOCK_SIZE_K * stride_xk
        g_ptrs += BLOCK_SIZE_K * stride_wk
        u_ptrs += BLOCK_SIZE_K * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out = h_ptr + ids[:, None] * stride_hm + cols[None, :] * stride_hn
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


@_moe_autotune(2)
@triton.jit
def _moe_gemm2_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    route_w_ptr,
    sorted_ids_ptr,
    chunk_expert_ptr,
    M,
    N,
    K,
    E,
    TOP_K: tl.constexpr,
    num_valid,
    ALIGN,
    CAP,
    stride_hm,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    DOT: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """y[r] = route_w[r] * (h[r] @ W2[e].T) for the sorted rows r = (t, e) of a block."""
    live, pid_n, expert, ids, valid = _moe_rows(
        tl.program_id(0), sorted_ids_ptr, chunk_expert_ptr, num_valid, ALIGN, CAP, N, BLOCK_SIZE_M,
        BLOCK_SIZE_N, GROUP_SIZE_M,
    )  # fmt: skip
    if not live:
        return
    rows = tl.where(valid, ids, 0)
    cols = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    ks = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk
    b_ptrs = w_ptr + expert * stride_we + (cols % N)[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - step * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        acc = mma(a, tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0), acc, DOT)
        a_ptrs += BLOCK_SIZE_K * stride_hk
        b_ptrs += BLOCK_SIZE_K * stride_wk
    acc *= tl.load(route_w_ptr + rows).to(tl.float32)[:, None]
    out = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")


def _check(
    x: Any, w13: Any, w2: Any, topk_weights: Any, topk_ids: Any, out: Any, fp32_precision: str
) -> None:
    import torch

    for name, t in (
        ("x", x),
        ("w13", w13),
        ("w2", w2),
        ("topk_weights", topk_weights),
        ("topk_ids", topk_ids),
    ):
        if not isinstance(t, torch.Tensor):
            fail("fused_moe", f"{name} must be a torch tensor; found {type(t).__name__}", TypeError)
    check_tensors("fused_moe", out=out)
    if x.dim() != 2:
        fail("fused_moe", f"x must be [T, H]; found shape {tuple(x.shape)}")
    T, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        fail("fused_moe", f"w13 must be [E, 2I, H] with H={H}; found shape {tuple(w13.shape)}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, inter):
        fail("fused_moe", f"w2 must be [E, H, I] = [{E}, {H}, {inter}]; found shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        fail(
            "fused_moe",
            f"topk_weights and topk_ids must both be [T, k] with T={T}; found "
            f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}",
        )
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_weights.dtype.is_floating_point:
        fail(
            "fused_moe",
            f"topk_ids must be int32/int64 and topk_weights floating; found "
            f"{topk_ids.dtype} and {topk_weights.dtype}",
        )
    if str(x.dtype) not in _DTYPES or w13.dtype != x.dtype or w2.dtype != x.dtype:
        fail(
            "fused_moe",
            f"x, w13, w2 must share one of bfloat16/float16/float32; found "
            f"{x.dtype}, {w13.dtype}, {w2.dtype}",
        )
    devices = {t.device for t in (x, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        fail("fused_moe", f"all inputs must be on one device; found {sorted(map(str, devices))}")
    check_device("fused_moe", x.device, "x and the others are")
    if out is not None and (tuple(out.shape) != (T, H) or out.dtype != x.dtype or out.device != x.device):
        fail(
            "fused_moe",
            f"out must be [{T}, {H}] of dtype {x.dtype} on {x.device}; found "
            f"{list(out.shape)}, {out.dtype}, {out.device}",
        )
    if out is not None:  # zeroed before GEMM 1 reads x (k = 1): out=x would compute from zeros
        inputs = {"x": x, "w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
        check_out("fused_moe", "out", out, (T, H), x.dtype, inputs)
    if fp32_precision not in ("ieee", "tf32"):
        fail("fused_moe", f"fp32_precision must be 'ieee' or 'tf32'; found {fp32_precision!r}")


def _explicit(config: Any) -> tuple[dict[str, int], dict[str, int]]:
    """``config=``: one vLLM-style dict for both GEMMs (as vLLM uses it), or a pair."""
    pair = (config, config) if isinstance(config, Mapping) else config
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(c, Mapping) for c in pair)):
        fail("fused_moe", f"config= takes one config dict or a (gemm1, gemm2) pair of them; found {config!r}")
    return vllm_config_to_kernel(pair[0])[0], vllm_config_to_kernel(pair[1])[0]


@graph_break
def fused_moe(
    x: Any,
    w13: Any,
    w2: Any,
    topk_weights: Any,
    topk_ids: Any,
    *,
    out: Any = None,
    config: Any = None,
    fp32_precision: str = "ieee",
) -> Any:
    """The MoE MLP of the module docstring; returns ``out`` (``[T, H]``, x's dtype).

    ``x`` may be non-contiguous (read through its strides), weights too. An expert id
    outside ``[0, E)`` drops its (token, expert) pair: it contributes nothing and its
    weight is ignored (vLLM's expert parallelism, whose ``expert_map`` gives -1 to the
    experts of other ranks; a token with every pair dropped gets 0). So ``k`` may exceed
    ``E`` (the local experts of one rank). ``config``
    launches explicit configs (vLLM's table fields) instead of the book's: one dict for
    both GEMMs or a ``(gemm1, gemm2)`` pair.
    """
    _check(x, w13, w2, topk_weights, topk_ids, out, fp32_precision)
    return _fused_moe(x, w13, w2, topk_weights, topk_ids, out, config, fp32_precision, None)


def _fused_moe(
    x: Any,
    w13: Any,
    w2: Any,
    topk_weights: Any,
    topk_ids: Any,
    out: Any,
    config: Any,
    fp32_precision: str,
    align: int | None,
) -> Any:
    """``fused_moe`` after validation; ``align`` overrides ALIGN (tests: blocks below it)."""
    import torch

    T, H = x.shape
    E, inter, top_k = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    out = out if out is not None else torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return out
    if inter == 0 or top_k == 0 or E == 0:  # no expert contributes: a sum of nothing
        return out.zero_()
    # Row offsets are 32-bit in the kernels: a call whose x, out or (T * top_k)-row buffers
    # reach past OFFSET_LIMIT elements runs as halves of its tokens.
    if T > 1 and (too_far(x, out) or reaches_past(T * top_k * max(H, inter))):
        for part in (slice(0, T // 2), slice(T // 2, None)):
            _fused_moe(
                x[part], w13, w2, topk_weights[part], topk_ids[part], out[part], config, fp32_precision, align
            )
        return out
    explicit = _explicit(config) if config is not None else None
    if align is None:
        align = moe_align_size(T)
        if explicit is not None:
            align = max(explicit[0]["BLOCK_SIZE_M"], explicit[1]["BLOCK_SIZE_M"])
    sorted_ids, chunk_expert, _ = moe_align(topk_ids, E, align)
    n, cap = T * top_k, sorted_ids.numel()
    dot = dot_mode(x.dtype, fp32_precision)
    h = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    # GEMM 2 writes the rows of the pairs it computes; a pair left out (an expert id outside
    # [0, E)) must read as 0, so y starts zeroed (a memset; whether any id is out of range
    # is only known on the device).
    y = out.zero_() if top_k == 1 else torch.zeros((n, H), dtype=x.dtype, device=x.device)
    # Read as route_w + row: reshape keeps a column slice's stride (tw[:, :1]), so copy it.
    route_w = topk_weights.reshape(-1).contiguous()
    routing = (sorted_ids, chunk_expert)  # num_padded: the kernels see padding in sorted_ids
    sizes1 = (T, inter, H, E, top_k, n, align, cap)  # M, N, K, E, TOP_K, num_valid, ALIGN, CAP
    sizes2 = (T, H, inter, E, top_k, n, align, cap)
    args1 = (x, w13, h, *routing, *sizes1, *x.stride(), *w13.stride(), *h.stride(), dot)
    args2 = (h, w2, y, route_w, *routing, *sizes2, *h.stride(), *w2.stride(), *y.stride(), dot)

    def grid1(meta: Mapping[str, Any]) -> tuple[int]:
        return (cap // meta["BLOCK_SIZE_M"] * cdiv(inter, meta["BLOCK_SIZE_N"] // 2),)

    def grid2(meta: Mapping[str, Any]) -> tuple[int]:
        return (cap // meta["BLOCK_SIZE_M"] * cdiv(H, meta["BLOCK_SIZE_N"]),)

    if explicit is None:
        _moe_gemm1_kernel[grid1](*args1)
        _moe_gemm2_kernel[grid2](*args2)
    else:
        _moe_gemm1_kernel.fn[grid1](*args1, **explicit[0])
        _moe_gemm2_kernel.fn[grid2](*args2, **explicit[1])
    if top_k > 1:
        torch.sum(y.view(T, top_k, H), dim=1, out=out)
    return out
