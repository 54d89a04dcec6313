"""Small real Triton kernels for the tests, and a replaying benchmarker.

They run in the CPU interpreter in milliseconds. ``Replay`` is a ``do_bench`` that really
runs each candidate once (so its output is checked) and reports the time recorded for
that config in a table: which config wins is then decided by the table, not by the noise
of a CPU clock.

Not named ``kernels``: transformers 5.25 imports Hugging Face's ``kernels`` package when it
is installed, and a ``tests/kernels.py`` on the path shadowed it (the LLM tests failed).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y"""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scale(x, factor):
    return x * factor


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    """out = x * factor, through a jitted helper"""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _scale(tl.load(x_ptr + offs, mask=mask), factor), mask=mask)


@triton.jit
def accumulate_kernel(x_ptr, acc_ptr, n, BLOCK: tl.constexpr):
    """acc += x (in place): benchmarking it repeatedly corrupts acc unless restored"""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] += sum(x) with atomics: needs out zeroed before every run"""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=mask, other=0.0), axis=0))


@triton.jit
def add_wrong_at_128_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y, except that the BLOCK=128 variant computes x - y (a config-only bug)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    if BLOCK == 128:
        tl.store(out_ptr + offs, x - y, mask=mask)
    else:
        tl.store(out_ptr + offs, x + y, mask=mask)


@triton.jit
def matmul_kernel(
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
):
    """C = A @ B"""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        kk = k + rk
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=(kk[:, None] < K) & (rn[None, :] < N),
            other=0.0,
        )
        acc += tl.dot(a, b)
    tl.store(
        c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
        acc,
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def grid_1d(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def block_configs(*blocks: int, **options: Any) -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, **options) for b in blocks]


class Replay:
    """``do_bench`` replaying a timing table keyed by the BLOCK meta-parameter.

    Pass ``replay.pre_hook`` as the autotuner's ``pre_hook`` so it learns which config runs.
    Blocks missing from the table raise, as a config that fails to run would.
    """

    def __init__(self, table: dict[int, float]) -> None:
        self.table = dict(table)
        self.measured: list[int] = []
        self._current: dict[str, Any] = {}

    def pre_hook(self, nargs: dict[str, Any], reset_only: bool = False) -> None:
        self._current = nargs

    def __call__(self, kernel_call: Any, quantiles: Any = None) -> list[float]:
        kernel_call()
        block = self._current["BLOCK"]
        self.measured.append(block)
        if block not in self.table:
            raise RuntimeError(f"no timing recorded for BLOCK={block}")
        ms = self.table[block]
        return [ms, ms * 0.99, ms * 1.01]


def vectors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g), torch.full((n,), float("nan"))
