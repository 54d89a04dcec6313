"""C = A @ B, a tiled GEMM: the kernel the demo tunes and the GPU benchmarks measure.

Each program computes one BLOCK_M x BLOCK_N tile of C, walking K in BLOCK_K steps and
accumulating in float32. Programs are ordered in groups of GROUP_M tile-rows so that
neighbouring programs reuse the same tiles of B from L2.
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows_in_group
    tile_n = (pid % per_group) // rows_in_group

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Wrapping the row/col indices keeps every load in bounds; the store masks them out.
    a_tile = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + ks[:, None] * stride_bk + (cols % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - step * BLOCK_K
        a = tl.load(a_tile, mask=ks[None, :] < k_left, other=0.0)
        b = tl.load(b_tile, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    c = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def gemm_configs(
    block_m=(64, 128), block_n=(64, 128, 256), block_k=(32, 64), stages=(3, 4), warps=(4, 8)
) -> list[triton.Config]:
    """The 48-config GEMM list of the benchmarks (2 x 3 x 2 x 2 x 2)."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in itertools.product(block_m, block_n, block_k, stages, warps)
    ]


def small_configs() -> list[triton.Config]:
    """A few small tiles: quick to run in the CPU interpreter."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=w)
        for m, n, w in ((16, 16, 1), (32, 16, 2), (16, 32, 2), (32, 32, 4))
    ]


def matmul(kernel, a, b, **meta):
    """Launch ``kernel`` (the jitted kernel, or an autotuner over it) for C = A @ B.

    ``meta`` carries a fixed config's meta-parameters when ``kernel`` is the bare jit.
    """
    import torch

    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"matmul: inner dimensions differ: A is {tuple(a.shape)}, B is {tuple(b.shape)}")
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel[grid](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), **meta
    )
    return c
