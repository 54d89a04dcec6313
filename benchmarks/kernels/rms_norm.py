"""Benchmark ``tunebook.kernels.rms_norm`` (plain and fused with the residual add) against
the same kernel with Liger-Kernel's config, PyTorch eager and torch.compile.

Hidden sizes of Llama-3-8B and Mixtral-8x7B (4096), Llama-3-70B (8192), Qwen2.5-7B (3584)
and SmolLM2-135M (576), over 1..8192 tokens, bf16. ``_driver`` says what is measured.

    python benchmarks/kernels/rms_norm.py --out DIR                      # ~8 min on an H200 (tuning included)
    python benchmarks/kernels/rms_norm.py --out DIR --tokens 1,16,256,4096 --models llama-3-8b
    python benchmarks/kernels/rms_norm.py --out DIR --dry-run            # CPU, Triton's interpreter
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from _driver import Reference, main

EPS = 1e-6  # what the workloads of tunebook.kernels._models pass


def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vLLM's RMSNorm.forward_native: fp32 statistics, output in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return plain(h, weight), h


def reference(w: Any) -> Reference:
    t = w.tensors
    if w.shape["residual"]:
        return fused, (t["x"], t["residual"], t["weight"])
    return plain, (t["x"], t["weight"])


if __name__ == "__main__":
    sys.exit(main("rms_norm", reference))
