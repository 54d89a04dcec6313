"""Benchmark ``tunebook.kernels.rotary_embedding`` (neox style) against the same kernel with
Liger-Kernel's config, PyTorch eager and torch.compile.

Head layouts per GPU (query heads / KV heads x head size): Llama-3-8B and Mixtral-8x7B
32/8 x128, Llama-3-70B at TP4 16/2 and TP8 8/1 x128, Qwen2.5-7B 28/4 x128, SmolLM2-135M
9/3 x64; over 1..8192 tokens, bf16, positions drawn from [0, 8192). ``_driver`` says what
is measured.

    python benchmarks/kernels/rotary_embedding.py --out DIR              # ~5 min on an H200 (tuning included)
    python benchmarks/kernels/rotary_embedding.py --out DIR --dry-run    # CPU, Triton's interpreter
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from _driver import Reference, main


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x.float(), 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, head_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's RotaryEmbedding.forward_native for full rotary, neox style (new tensors)."""
    cos, sin = cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    tokens = positions.shape[0]
    q_rot = _rotate(q.view(tokens, -1, head_size), cos, sin)
    k_rot = _rotate(k.view(tokens, -1, head_size), cos, sin)
    return q_rot.view(q.shape), k_rot.view(k.shape)


def reference(w: Any) -> Reference:
    t = w.tensors
    head_size = w.shape["head_size"]
    if head_size == 64:
        return rope_64, (t["q"], t["k"], t["positions"], t["cos_sin_cache"])
    return rope_128, (t["q"], t["k"], t["positions"], t["cos_sin_cache"])


# One function per head size: torch.compile then sees it as a constant, and its cache is
# per function.
def rope_64(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> Any:
    return rope(q, k, positions, cache, 64)


def rope_128(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> Any:
    return rope(q, k, positions, cache, 128)


if __name__ == "__main__":
    sys.exit(main("rotary_embedding", reference))
