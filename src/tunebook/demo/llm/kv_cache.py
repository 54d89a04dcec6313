"""The paged KV cache and its block allocator.

Every layer has a key cache and a value cache of ``[num_blocks, block_size, n_kv_heads,
head_size]`` (the pack's layout: ``tunebook.kernels._attention``), views of one
allocation. A sequence owns a list of blocks; its token ``t`` lives in block
``blocks[t // block_size]`` at offset ``t % block_size`` (its *slot* is ``block *
block_size + offset``, what ``reshape_and_cache`` writes).

:class:`BlockAllocator` hands out block ids. The scheduler asks for all the blocks a
request can ever need when it admits it (prompt plus ``max_tokens``), so a running
sequence never runs out of cache and nothing is ever preempted; the price is capacity
reserved for tokens a request may not generate. Block 0 is never handed out: padded rows
of a CUDA-graph batch point their block tables at it, so they read and write nothing that
belongs to a sequence.

>>> alloc = BlockAllocator(num_blocks=5)
>>> a = alloc.allocate(2); b = alloc.allocate(2)
>>> sorted(a + b), alloc.free_blocks, alloc.allocate(1)
([1, 2, 3, 4], 0, None)
>>> alloc.release(a); alloc.free_blocks
2
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from .config import ModelConfig

RESERVED_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens.

    >>> blocks_for(0, 16), blocks_for(16, 16), blocks_for(17, 16)
    (0, 1, 2)
    """
    return -(-tokens // block_size)


class BlockAllocator:
    """Free block ids, thread-safe. ``allocate`` is all or nothing."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (block 0 is reserved); found {num_blocks}"
            )
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, RESERVED_BLOCK, -1))  # pop() hands out low ids first
        self._lock = threading.Lock()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` block ids, or None (and nothing taken) when fewer are free."""
        with self._lock:
            if n > len(self._free):
                return None
            return [self._free.pop() for _ in range(n)]

    def release(self, blocks: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(reversed(blocks))


class KVCache:
    """Per-layer key and value caches on one device, and their allocator."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: Any
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (config.layers, 2, num_blocks, block_size, config.n_kv_heads, config.head_size)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (key cache, value cache)."""
        return self.data[i, 0], self.data[i, 1]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return config.layers * 2 * block_size * config.kv_size * itemsize

    @classmethod
    def sized(
        cls,
        config: ModelConfig,
        *,
        tokens: int,
        block_size: int,
        dtype: torch.dtype,
        device: Any,
    ) -> KVCache:
        """A cache that holds ``tokens`` tokens in all (plus the reserved block)."""
        return cls(config, blocks_for(tokens, block_size) + 1, block_size, dtype, device)
