"""``linear``'s prefill GEMM on GPUs with a tensor memory accelerator (Hopper and newer).

Same math as ``linear``'s pointer kernel, for the calls where tiles of y are plenty (more than
``MIN_M`` rows) and every operand is laid out for TMA::

    y[m, n] = sum_k x[m, k] * weight[n, k]  (+ bias[n]),   fp32 accumulation

Why a second kernel: on an H200 (bf16, Llama-3-8B layers, BENCHMARKS.md section 5a) the
pointer kernel's best configs reach 0.79-0.83 of cuBLAS at M >= 1024 whatever the tile, and
this kernel 0.93-1.02. Two things buy it, measured one at a time:

* **Tensor descriptors.** Tiles are loaded by the TMA unit as whole boxes (out-of-range rows
  and columns read as zero, so no masks and no address arithmetic per element) and y is
  stored the same way; on its own this gave 0.82-0.97.
* **Persistence.** One program per SM walks the output tiles ``NUM_SMS`` apart, in the
  same ``GROUP_M`` order as the pointer kernel (neighbours share weight tiles in L2), and
  the flattened loop (``tl.range(..., flatten=True)``) lets the pipeliner fetch the next
  tile's first K steps while the current tile's epilogue runs.

At M = 256 the two kernels tie (0.70-0.78 of cuBLAS), so decode and short prefills keep the
pointer kernel, its split-K and its books. The descriptors are built on the device, which
needs a launch-time scratch allocator (128 bytes per descriptor per program):
``ensure_allocator`` installs one backed by PyTorch's caching allocator unless the
application set its own.

The tuning key is the pointer kernel's (``[bucket(M), N, K]`` and the dtypes); its book is
its own page, ``tunebook-kernels-linear_tma``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import triton
import triton.language as tl

import tunebook

from .. import _compat
from ._common import cdiv, max_configs, pow2_at_least, shipped_books
from ._gemm_common import (
    M_EDGES,
    MAX_ACC_PER_THREAD,
    NAME_PREFIX,
    SMEM_BYTES,
    acc_per_thread,
    nearest_config,
    smem_estimate,
)

MIN_M = 513  # rows from which a call takes this kernel: M buckets 1024 and up
META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
INTERPRETER_PROGRAMS = 4  # on the CPU: fewer programs than tiles, so persistence is exercised
_ALIGN = 16  # bytes: TMA's alignment of a base address and of every stride but the last


def _fits(c: Mapping[str, Any]) -> bool:
    """Shared memory (the pipelined A/B tiles plus y's staging tile), registers, busy warps."""
    staging = c["BLOCK_M"] * c["BLOCK_N"] * 2
    if smem_estimate(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"]) + staging > SMEM_BYTES:
        return False
    if acc_per_thread(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) > MAX_ACC_PER_THREAD:
        return False
    # A 64x64 tile loads each operand twice per output element as often as 128x64 does; it
    # never won at 1024+ rows, and without it the space stays under tunebook's exhaustive
    # threshold (64 points), so every key is searched whole rather than from its neighbours.
    return c["BLOCK_M"] * c["BLOCK_N"] >= max(256 * c["num_warps"], 64 * 128)


def _fits_call(c: Mapping[str, Any], args: Mapping[str, Any]) -> bool:
    """No tile dimension beyond what the problem fills; no deeper pipeline than K steps."""
    K = args["K"]
    # The smallest tiles always fit: TMA reads rows and columns past the matrix as zero.
    if c["BLOCK_N"] > max(64, pow2_at_least(args["N"])) or c["BLOCK_K"] > max(64, pow2_at_least(K)):
        return False
    return c["num_stages"] <= max(2, -(-K // c["BLOCK_K"]) + 1)


def linear_tma_space() -> tunebook.Space:
    """Hopper-sized tiles only: the measured winners were 128x256x64 (8 warps, 3 stages) and
    128x128x64 (4 warps); small tiles belong to the pointer kernel's decode shapes."""
    return tunebook.Space(
        BLOCK_M=[64, 128, 256],
        BLOCK_N=[64, 128, 256],
        BLOCK_K=[64, 128],
        GROUP_M=[8],
        num_warps=[4, 8],
        num_stages=[2, 3, 4, 5],
        constraints=[_fits],
        arg_constraints=[_fits_call],
    )


def default_linear_tma_config() -> dict[str, int]:
    """What serve mode launches for a key no book holds: the H200's measured best tile."""
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _fallback(key: tuple[Any, ...], configs: list[Any]) -> Any:
    return nearest_config(configs, default_linear_tma_config())


@triton.jit
def _tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number ``tile`` in grouped order: GROUP_M tile-rows side by side."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows_in_group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows_in_group, (tile % per_group) // rows_in_group


@tunebook.autotune(
    configs=linear_tma_space(),
    key=[tunebook.bucket("M", list(M_EDGES)), "N", "K"],
    name=NAME_PREFIX + "linear_tma",
    rep=20,
    use_cuda_graph=True,  # the pack's timer for its other ops: replays without host gaps
    books=shipped_books,
    max_configs=max_configs(),
    fallback=_fallback,
    prefer_nearest=True,  # a tuned neighbouring bucket first
)
@triton.jit
def _linear_tma_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(
        x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K]
    )
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K]
    )
    y_desc = tl.make_tensor_descriptor(
        y_ptr, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, BLOCK_N]
    )
    k_steps = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        tile_m, tile_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, k_steps):
            a = x_desc.load([tile_m * BLOCK_M, step * BLOCK_K])
            b = w_desc.load([tile_n * BLOCK_N, step * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        if HAS_BIAS:
            cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([tile_m * BLOCK_M, tile_n * BLOCK_N], acc.to(y_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=16)
def _has_tma(device_index: int) -> bool:
    """An NVIDIA GPU of the generations this kernel was written and sized for: Hopper (9.x)
    and datacenter Blackwell (10.x), ~228 KB of shared memory a block. ROCm reports its own
    gfx numbers as capabilities (MI300: 9.4); consumer Blackwell (12.x) has ~100 KB."""
    import torch

    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] in (9, 10)


@functools.lru_cache(maxsize=16)
def _programs(device_index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _index(device: Any) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def usable(x: Any, weight: Any, y: Any) -> bool:
    """Whether a call ``y = x @ weight.T`` (2-D views) takes this kernel: enough rows, 16-bit
    floats, rows contiguous, distinct and 16-byte aligned (TMA's rule), and a GPU with TMA; in
    Triton's interpreter, where the tests run it, fp16 only."""
    if x.shape[0] < MIN_M:  # every decode call stops here, at the cost of one comparison
        return False
    import torch

    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if _compat.interpreting():
        if x.dtype != torch.float16:
            return False  # the interpreter (3.4-3.9) misreads bf16 through a tensor descriptor
        stride_align = _ALIGN * x.element_size()  # 3.4's interpreter checks it in elements
    elif x.device.type != "cuda" or not _has_tma(_index(x.device)):
        return False
    else:
        stride_align = _ALIGN
    for t in (x, weight, y):
        if t.stride(1) != 1 or t.stride(0) < t.shape[1]:  # not row-major (or rows repeated)
            return False
        if (t.stride(0) * t.element_size()) % stride_align or t.data_ptr() % _ALIGN:
            return False
    return True


def _allocate(size: int, alignment: int, stream: Any) -> Any:
    """Triton's launch-time scratch from PyTorch's caching allocator, on the current device and
    stream (its blocks are 512-byte aligned, more than any descriptor asks)."""
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


# At import, for processes that launch the kernel without ``linear()``: tunebook's tuning
# workers and sweeps. ``launch`` checks again per call (a new thread starts without one).
_compat.ensure_allocator(_allocate)


def launch(x: Any, weight: Any, bias: Any, y: Any, config: Mapping[str, int] | None) -> None:
    """``y = x @ weight.T (+ bias)`` through this kernel; ``usable`` said yes. ``config``: an
    explicit config (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) instead of the book's."""
    M, K = x.shape
    N = weight.shape[0]
    if _compat.interpreting():
        programs = INTERPRETER_PROGRAMS
    else:
        _compat.ensure_allocator(_allocate)
        programs = _programs(_index(x.device))
    bias_or_any = bias if bias is not None else weight  # never read: keeps the key's dtypes fixed
    strides = (x.stride(0), weight.stride(0), y.stride(0))
    args = (x, weight, bias_or_any, y, M, N, K, *strides, bias is not None, programs)

    def grid(meta: Mapping[str, Any]) -> tuple[int]:
        return (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    if config is None:
        _linear_tma_kernel[grid](*args)
        return
    meta = {k: int(config[k]) for k in META}
    _linear_tma_kernel.fn[grid](
        *args, **meta, num_warps=int(config["num_warps"]), num_stages=int(config["num_stages"])
    )
