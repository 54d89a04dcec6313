"""The kernel benchmarks/ray_sweep.py sweeps: the pack's linear (GEMM) kernel, under its own
Space, with an ``inputs=`` factory so that every worker builds its calls from key values.

A module of its own because the sweep's workers import the kernel by module and name (this
folder is on their PYTHONPATH). The budget and the dtype come from the environment, fixed
when the module is imported: ``RAY_SWEEP_CONFIGS`` configs per key (a seeded random search,
so every phase of the benchmark measures the same configs) and ``RAY_SWEEP_DTYPE``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import triton

import tunebook
from tunebook.kernels._gemm_common import M_EDGES, dot_mode

_linear = importlib.import_module("tunebook.kernels.linear")  # the module (the package exports the op)


def inputs(description: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """One call of the kernel for a key ``{"M", "N", "K"}``, as ``linear()`` would launch it."""
    key = description["key"]
    M, N, K = int(key["M"]), int(key["N"]), int(key["K"])
    dtype = getattr(torch, os.environ.get("RAY_SWEEP_DTYPE", "bfloat16"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device)
    y = torch.empty(M, N, dtype=dtype, device=device)
    split = _linear.max_split_k(M, N, K)
    ws = torch.empty(max(1, split * M * N), dtype=torch.float32, device=device)
    tiles = triton.cdiv(M, _linear.MIN_BLOCK["BLOCK_M"]) * triton.cdiv(N, _linear.MIN_BLOCK["BLOCK_N"])
    locks = torch.zeros(max(1, tiles), dtype=torch.int32, device=device)
    args = (x, w, w, y, ws, locks, M, N, K, K, 1, K, 1, N, 1, False, dot_mode(dtype))

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    return grid, args, {}


sweep_linear = tunebook.autotune(
    configs=_linear.linear_space(),
    key=[tunebook.bucket("M", list(M_EDGES)), "N", "K"],
    name="ray_sweep_linear",
    strategy="random",
    max_configs=int(os.environ.get("RAY_SWEEP_CONFIGS", "100")),
    inputs=inputs,
)(_linear._linear_kernel.fn)
