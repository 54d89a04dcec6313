"""Benchmark ``tunebook.kernels.reshape_and_cache`` (writing new tokens' K/V into the paged
cache) against the same kernel with vLLM's launch (one program per token, all its heads),
PyTorch eager (``index_copy_`` into the cache viewed as slots) and torch.compile of it.

KV-head layouts of Llama-3-8B and Mixtral-8x7B (8 x 128), Llama-3-70B TP4/TP8 (2 and 1 x
128), Qwen2.5-7B (4 x 128) and SmolLM2-135M (3 x 64), over 1..8192 tokens written into
shuffled 16-token blocks, bf16. ``_driver`` says what is measured.

    python benchmarks/kernels/reshape_and_cache.py --out DIR
    python benchmarks/kernels/reshape_and_cache.py --out DIR --tokens 1,64,4096 --models llama-3-8b
    python benchmarks/kernels/reshape_and_cache.py --out DIR --dry-run        # CPU, Triton's interpreter
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from _driver import Reference, main


def scatter(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's ``reshape_and_cache_flash`` does, in PyTorch (every slot valid here)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)
    return k_cache, v_cache


def reference(w: Any) -> Reference:
    # Fresh zeroed caches, as the workload's were before the kernel wrote them: the check
    # compares every slot, written or not.
    t = w.tensors
    caches = (torch.zeros_like(t["k_cache"]), torch.zeros_like(t["v_cache"]))
    return scatter, (t["key"], t["value"], *caches, t["slot_mapping"].long())


if __name__ == "__main__":
    sys.exit(main("reshape_and_cache", reference))
