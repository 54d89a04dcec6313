"""Benchmark ``tunebook.kernels.silu_and_mul`` against the same kernel with Liger-Kernel's
config, PyTorch eager and torch.compile.

MLP widths per GPU of Llama-3-8B and Mixtral-8x7B (14336), Llama-3-70B at TP4 (7168) and
TP8 (3584), Qwen2.5-7B (18944) and SmolLM2-135M (1536), over 1..8192 tokens, bf16.
``_driver`` says what is measured.

    python benchmarks/kernels/silu_and_mul.py --out DIR                  # ~5 min on an H200 (tuning included)
    python benchmarks/kernels/silu_and_mul.py --out DIR --dry-run        # CPU, Triton's interpreter
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from _driver import Reference, main


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul.forward_native."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def reference(w: Any) -> Reference:
    return silu_and_mul, (w.tensors["x"],)


if __name__ == "__main__":
    sys.exit(main("silu_and_mul", reference))
