"""``linear``: y = x @ weight.T (+ bias), as ``torch.nn.functional.linear`` computes it.

Shapes: ``x`` is ``[..., K]`` (leading dims flattened to ``M`` rows), ``weight`` is ``[N, K]``
as ``torch.nn.Linear`` keeps it, ``bias`` is ``[N]``; ``y`` is ``[..., N]`` in x's dtype::

    y[m, n] = sum_k x[m, k] * weight[n, k]  (+ bias[n])

bf16 and fp16 multiply on tensor cores and accumulate in fp32. fp32 inputs are allowed too:
``fp32_precision="ieee"`` (default; exact fp32 products, like torch's default matmul) or
``"tf32"`` (tensor-core tf32 products, ~1e-3 relative error, much faster).

One kernel serves decode and prefill. Each program computes one ``BLOCK_M x BLOCK_N`` tile of
y, walking K in ``BLOCK_K`` steps, programs ordered in groups of ``GROUP_M`` tile-rows so that
neighbours reuse weight tiles from L2. ``tl.dot`` needs tiles of at least 16 rows, so a decode
batch of M=1..15 pads within its tile (masked loads, masked stores). Decode is bound by reading
the weight once; with few tiles of y (M small, N a few thousand) there are too few programs to
keep every SM streaming, so ``SPLIT_K`` programs share one tile's K range:

* each writes its fp32 partial tile to a workspace ``[SPLIT_K, M, N]``,
* then bumps the tile's arrival counter (an acq_rel atomic after a block barrier, so its
  partial is visible first); the program that arrives last sums the ``SPLIT_K`` partials in
  split order (deterministic: the same bits whichever program arrives last), adds the bias,
  stores y and resets the counter to zero for the next launch.

One launch, no zeroing pass, no second reduction kernel: the tuner's timing of a split-K
config is the whole cost of that config. The counters and workspace are per-device buffers
reused across calls (see ``_gemm_common.Scratch``): two split-K launches must not run at the
same time on two streams of one device.

The tuning key is ``[bucket(M, 1, 2, 4, ..., 8192), N, K]`` plus the dtypes: a server sees
every batch size, the book holds one entry per power of two, and N, K name the layer.

>>> import torch
>>> x, w = torch.randn(3, 64), torch.randn(40, 64)
>>> y = linear(x, w)                              # doctest: +SKIP
>>> torch.allclose(y, x @ w.T, atol=1e-4)         # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import triton
import triton.language as tl

import tunebook

from . import _linear_tma
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
    Scratch,
    acc_per_thread,
    bucket_m,
    check_launch_values,
    dot_mode,
    mma,
    nearest_config,
    smem_estimate,
    too_far,
)

__all__ = ["default_linear_config", "linear", "linear_space"]

META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")
# What an explicit config= must name (SPLIT_K defaults to 1).
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
SPLIT_K_MAX_M = 64  # above this many rows there are enough tiles of y to fill the GPU
SPLIT_K_MAX_WS = 1 << 17  # SPLIT_K * N at most: caps the fp32 workspace at 32 MiB (M=64)
MIN_BLOCK = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}

# linear's second kernel, named here too: `tunebook tune --misses tunebook.kernels.linear` and
# open_books() find a module's autotuners among its globals.
_linear_tma_kernel = _linear_tma._linear_tma_kernel

_workspace = Scratch("linear.workspace", zeroed=False)
_counters = Scratch("linear.counters", zeroed=True)  # kept at zero between launches


def max_split_k(M: int, N: int, K: int) -> int:
    """The largest SPLIT_K a call may use (1: no split-K): decode-sized M, K long enough."""
    if M > SPLIT_K_MAX_M:
        return 1
    split = 1
    while split < 16 and 2 * split * MIN_BLOCK["BLOCK_K"] <= K and 2 * split * N <= SPLIT_K_MAX_WS:
        split *= 2
    return split


def _fits(c: Mapping[str, Any]) -> bool:
    """Static limits: shared memory, accumulator registers, enough work per warp."""
    if smem_estimate(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"]) > SMEM_BYTES:
        return False
    if acc_per_thread(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) > MAX_ACC_PER_THREAD:
        return False
    if c["BLOCK_M"] * c["BLOCK_N"] < 256 * c["num_warps"]:  # idle warps
        return False
    return c["SPLIT_K"] == 1 or c["BLOCK_M"] <= SPLIT_K_MAX_M


@functools.lru_cache(maxsize=1024)
def _call_bounds(m: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """(bucketed M, largest BLOCK_M, BLOCK_N, BLOCK_K, largest SPLIT_K) a call of this size
    may use: computed once per shape, not once per candidate (the Space has thousands)."""
    M = bucket_m(m)
    return (
        M,
        max(MIN_BLOCK["BLOCK_M"], pow2_at_least(M)),
        max(MIN_BLOCK["BLOCK_N"], pow2_at_least(N)),
        max(MIN_BLOCK["BLOCK_K"], pow2_at_least(K)),
        max_split_k(M, N, K),
    )


def _fits_call(c: Mapping[str, Any], args: Mapping[str, Any]) -> bool:
    """Per call: no tile dimension beyond what the problem fills, split-K only where allowed."""
    K = args["K"]
    M, max_m, max_n, max_k, max_split = _call_bounds(args["M"], args["N"], K)
    if c["BLOCK_M"] > max_m or c["BLOCK_N"] > max_n or c["BLOCK_K"] > max_k:
        return False
    if c["GROUP_M"] > 1 and M <= c["BLOCK_M"]:  # one row of tiles: a no-op, same as GROUP_M=1
        return False
    split = c["SPLIT_K"]
    if split > 1 and (split > max_split or split * c["BLOCK_K"] > K):
        return False
    # Pipelining deeper than the loop is long only costs shared memory. (Plain integer
    # ceil-division: triton.cdiv is a constexpr function, ~2 us a call on the host, and this
    # runs for each of the Space's thousands of points at every key's first call.)
    k_steps = -(-K // c["BLOCK_K"])
    steps = -(-k_steps // split)
    return c["num_stages"] <= max(2, steps + 1)


def linear_space() -> tunebook.Space:
    """The config space: block sizes, grouping, split-K, warps and pipeline depth."""
    return tunebook.Space(
        BLOCK_M=[16, 32, 64, 128, 256],
        BLOCK_N=[32, 64, 128, 256],
        BLOCK_K=[32, 64, 128, 256],
        GROUP_M=[1, 8],
        SPLIT_K=[1, 2, 4, 8, 16],
        num_warps=[2, 4, 8],
        num_stages=[2, 3, 4, 5],
        constraints=[_fits],
        arg_constraints=[_fits_call],
    )


def default_linear_config(M: int, N: int, K: int) -> dict[str, int]:
    """A hand-written rule: what serve mode launches for a key no book holds.

    Decode tiles are 16 rows high and split K until ~2 programs per SM of an H100-class GPU
    stream the weight; prefill uses the Triton tutorial's 128x128x64 tile.
    """
    if M <= SPLIT_K_MAX_M:
        block_m = max(16, min(64, pow2_at_least(M)))
        block_n = 64
        tiles = cdiv(M, block_m) * cdiv(N, block_n)
        split = 1
        while split < max_split_k(M, N, K) and tiles * split < 264:
            split *= 2
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": 128,
            "GROUP_M": 1,
            "SPLIT_K": split,
            "num_warps": 4,
            "num_stages": 4,
        }
    return {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "SPLIT_K": 1,
        "num_warps": 4,
        "num_stages": 4,
    }


def _fallback(key: tuple[Any, ...], configs: list[Any]) -> Any:
    M, N, K = key[0], key[1], key[2]
    return nearest_config(configs, default_linear_config(M, N, K))


@triton.jit
def _linear_epilogue(acc, b_ptr, y_ptr, rows, cols, M, N, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@tunebook.autotune(
    configs=linear_space(),
    key=[tunebook.bucket("M", list(M_EDGES)), "N", "K"],
    name=NAME_PREFIX + "linear",
    books=shipped_books,
    max_configs=max_configs(),
    fallback=_fallback,
    prefer_nearest=True,  # a tuned neighbouring bucket first
)
@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows_in_group
    tile_n = (pid % per_group) // rows_in_group

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # K steps per split
    k_first = pid_k * steps * BLOCK_K
    # Wrapping rows/cols keeps every load in bounds (small M reads row 0 again); stores mask.
    x_tile = x_ptr + (rows % M)[:, None] * stride_xm + (k_first + ks)[None, :] * stride_xk
    w_tile = w_ptr + (cols % N)[None, :] * stride_wn + (k_first + ks)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        k_left = K - k_first - step * BLOCK_K
        a = tl.load(x_tile, mask=ks[None, :] < k_left, other=0.0)
        b = tl.load(w_tile, mask=ks[:, None] < k_left, other=0.0)
        acc = mma(a, b, acc, DOT)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    if SPLIT_K == 1:
        _linear_epilogue(acc, b_ptr, y_ptr, rows, cols, M, N, stride_ym, stride_yn, HAS_BIAS)
    else:
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        at = rows[:, None] * N + cols[None, :]
        tl.store(ws_ptr + pid_k * M * N + at, acc, mask=inside)
        # Every thread's partial is stored before the (single-thread) release below.
        tl.debug_barrier()
        lock = lock_ptr + tile_m * tiles_n + tile_n
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                # .cg reads L2, where the other programs' partials are, not a stale L1.
                total += tl.load(ws_ptr + s * M * N + at, mask=inside, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock, 0)
            _linear_epilogue(total, b_ptr, y_ptr, rows, cols, M, N, stride_ym, stride_yn, HAS_BIAS)


_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")


def _check(x: Any, weight: Any, bias: Any, out: Any, fp32_precision: str, config: Any = None) -> None:
    import torch

    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        fail(
            "linear",
            f"x and weight must be torch tensors; found {type(x).__name__}, {type(weight).__name__}",
            TypeError,
        )
    if weight.dim() != 2:
        fail("linear", f"weight must be [N, K] (2-D); found shape {tuple(weight.shape)}")
    check_tensors("linear", bias=bias, out=out)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        fail(
            "linear",
            f"x must be [..., K] with K = weight.shape[1] = {weight.shape[1]}; "
            f"found x of shape {tuple(x.shape)}",
        )
    if str(x.dtype) not in _DTYPES:
        fail("linear", f"x must be bfloat16, float16 or float32; found {x.dtype}")
    if weight.dtype != x.dtype:
        fail("linear", f"weight must have x's dtype {x.dtype}; found {weight.dtype}. Cast one.")
    if weight.device != x.device:
        fail("linear", f"x is on {x.device} but weight is on {weight.device}")
    check_device("linear", x.device, "x is")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            fail(
                "linear",
                f"bias must be [N]=[{weight.shape[0]}] of dtype {x.dtype} on "
                f"{x.device}; found shape {tuple(bias.shape)}, dtype {bias.dtype}, device {bias.device}",
            )
    if out is not None:
        want = (*x.shape[:-1], weight.shape[0])
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            fail(
                "linear",
                f"out must be {list(want)} of dtype {x.dtype} on {x.device}; found "
                f"{list(out.shape)}, {out.dtype}, {out.device}",
            )
        # As every op of the pack: no in-place updates (tuning reruns the kernel on the call's
        # own arguments, and tiles of x would be read after others were overwritten).
        check_out("linear", "out", out, want, x.dtype, {"x": x, "weight": weight, "bias": bias})
    if fp32_precision not in ("ieee", "tf32"):
        fail("linear", f"fp32_precision must be 'ieee' or 'tf32'; found {fp32_precision!r}")
    if config is not None:
        _check_config(config)


def _check_config(config: Any) -> None:
    """``config=`` names every field a launch reads (``SPLIT_K`` may be left out: 1)."""
    if not isinstance(config, Mapping):
        fail("linear", f"config must be a dict of {', '.join(CONFIG_FIELDS)}; found {type(config).__name__}")
    missing = [k for k in CONFIG_FIELDS if k not in config]
    if missing:
        fail(
            "linear",
            f"config lacks {', '.join(missing)}: an explicit config names {', '.join(CONFIG_FIELDS)} "
            f"(and SPLIT_K, default 1); found {dict(config)}",
        )
    tiles = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")
    check_launch_values("linear", config, tiles, ("GROUP_M", "SPLIT_K"))


def _in_parts(
    x2: Any, weight: Any, bias: Any, y2: Any, fp32_precision: str, config: Mapping[str, int] | None
) -> None:
    """``y2 = x2 @ weight.T (+ bias)`` in two halves, by rows where x or y reaches too far,
    else by columns, each half split again until its tensors' offsets fit in 32 bits
    (``_gemm_common.OFFSET_LIMIT``)."""
    M, N = y2.shape
    if M > 1 and too_far(x2, y2):
        half = M // 2
        for rows in (slice(0, half), slice(half, None)):
            linear(x2[rows], weight, bias, out=y2[rows], fp32_precision=fp32_precision, config=config)
    elif N > 1 and too_far(weight, y2):
        half = N // 2
        for cols in (slice(0, half), slice(half, None)):
            b = bias[cols] if bias is not None else None
            linear(x2, weight[cols], b, out=y2[:, cols], fp32_precision=fp32_precision, config=config)
    else:
        fail(
            "linear",
            "one row of x or of weight spans more than 2^31 elements "
            f"(K = {x2.shape[1]}, "
            f"x strides {tuple(x2.stride())}, weight strides {tuple(weight.stride())}); make it contiguous",
        )


@graph_break
def linear(
    x: Any,
    weight: Any,
    bias: Any = None,
    *,
    out: Any = None,
    fp32_precision: str = "ieee",
    config: Mapping[str, int] | None = None,
) -> Any:
    """``y = x @ weight.T (+ bias)``; see the module docstring.

    ``x`` may be non-contiguous: a 2-D x is read through its strides, higher ranks are
    flattened with ``reshape`` (a copy only when the leading dims cannot be viewed as one).
    ``weight`` may have any strides (``w.T`` of a ``[K, N]`` tensor works without a copy).
    ``out`` receives the result (any strides whose leading dims can be viewed as one).
    ``config`` launches one explicit config (``BLOCK_M/N/K, GROUP_M, num_warps, num_stages``
    and ``SPLIT_K``, default 1) instead of the book's, for benchmarks and tests, on the kernel
    the call takes (the TMA kernel for large prefills, docs/kernels.md); ``SPLIT_K`` > 1
    always takes the pointer kernel.
    """
    import torch

    _check(x, weight, bias, out, fp32_precision, config)
    N, K = weight.shape
    lead = x.shape[:-1]
    y = out if out is not None else torch.empty((*lead, N), dtype=x.dtype, device=x.device)
    M = math.prod(lead)
    x2 = x.reshape(M, K)
    if M == 0 or N == 0:
        return y
    try:  # the kernel writes y as 2-D rows through their strides: a view, never a copy
        y2: torch.Tensor | None = y.view(M, N)
    except RuntimeError:  # only a given out can be laid out so
        y2 = None
    if y2 is None:
        fail(
            "linear",
            "out's leading dimensions cannot be viewed as one "
            f"(shape {list(y.shape)}, strides "
            f"{list(y.stride())}); pass an out whose leading dimensions are laid out as one, e.g. "
            "contiguous, or none",
        )
    if K == 0:  # an empty sum: nothing to launch
        y2.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y2))
        return y
    if too_far(x2, weight, y2):
        _in_parts(x2, weight, bias, y2, fp32_precision, config)
        return y
    if bias is not None:
        bias = bias.contiguous()  # both kernels read it as contiguous (a no-op when it is)
    explicit_split = int(config.get("SPLIT_K", 1)) if config is not None else 1
    # An explicit split-K config names the pointer kernel (the TMA kernel has no split-K).
    if explicit_split == 1 and _linear_tma.usable(x2, weight, y2):
        _linear_tma.launch(x2, weight, bias, y2, config)
        return y
    split = max_split_k(M, N, K) if config is None else explicit_split
    # Always real fp32/int32 buffers (tiny when unused): the key's dtypes never change.
    ws = _workspace.get(x.device, split * M * N if split > 1 else 1, torch.float32)
    tiles = cdiv(M, MIN_BLOCK["BLOCK_M"]) * cdiv(N, MIN_BLOCK["BLOCK_N"])
    locks = _counters.get(x.device, tiles if split > 1 else 1, torch.int32)
    args = (
        x2,
        weight,
        bias if bias is not None else weight,  # never read: a tensor keeps the key's dtypes fixed
        y2,
        ws,
        locks,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        y2.stride(0),
        y2.stride(1),
        bias is not None,
        dot_mode(x.dtype, fp32_precision),
    )

    def grid(meta: Mapping[str, Any]) -> tuple[int, int]:
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    if config is None:
        _linear_kernel[grid](*args)
    else:
        meta = {k: int(config[k]) for k in META if k != "SPLIT_K"} | {"SPLIT_K": split}
        _linear_kernel.fn[grid](
            *args, **meta, num_warps=int(config["num_warps"]), num_stages=int(config["num_stages"])
        )
    return y
