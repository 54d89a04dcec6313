"""What the attention tests share: a paged KV cache with its blocks out of order, and a
float64 reference built on ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packutil import randn


@dataclass
class PagedCache:
    k_cache: torch.Tensor  # [num_blocks, page, n_kv, head_size]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [batch, max_blocks] int32; -1 past a sequence's blocks
    lens: list[int]

    @property
    def page(self) -> int:
        return int(self.k_cache.shape[1])

    def keys(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``b``'s cached keys and values, ``[len, n_kv, head_size]`` each."""
        t = torch.arange(self.lens[b])
        blocks = self.block_table[b, t // self.page].long()
        return self.k_cache[blocks, t % self.page], self.v_cache[blocks, t % self.page]


def paged_cache(
    gen: torch.Generator,
    lens: Sequence[int],
    page: int,
    n_kv: int,
    head_size: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
) -> PagedCache:
    """Random keys and values for sequences of ``lens`` tokens, in blocks dealt in a shuffled
    order (plus a few spare ones no sequence owns); table entries past a sequence's blocks,
    and every entry of an empty sequence, are -1: reading them would fail loudly."""
    need = [-(-max(n, 0) // page) for n in lens]
    total = sum(need) + spare_blocks
    order = torch.randperm(total, generator=gen)
    table = torch.full((len(lens), max(max(need), 1) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = order[used : used + n].to(torch.int32)
        used += n
    k = randn(gen, total, page, n_kv, head_size, dtype=dtype)
    v = randn(gen, total, page, n_kv, head_size, dtype=dtype)
    return PagedCache(k, v, table, [max(n, 0) for n in lens])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """``q`` ``[Lq, NQ, D]`` over ``k``/``v`` ``[Lk, NK, D]`` in float64 through SDPA, the
    queries bottom-right aligned (query i at position Lk - Lq + i); a query that sees no
    key gets 0."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if lk == 0:
        return torch.zeros(q.shape, dtype=torch.float64)
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        visible = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().repeat_interleave(group, 1).transpose(0, 1),
        v.double().repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=visible,
    ).transpose(0, 1)
    out[~visible.any(1)] = 0.0  # SDPA gives NaN for a row with no key
    return out
