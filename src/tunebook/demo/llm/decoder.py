"""The Llama decoder: a forward pass over a packed prefill or a decode batch.

Per layer, with ``ops`` one of :mod:`.ops` (the Triton kernels by default)::

    x, residual = rms_norm(h, input_norm, residual)     # fused add + norm (layer 0: norm only)
    q, k, v     = split(linear(x, qkv))                  # one GEMM for q, k and v
    q, k        = rotary(q, k, positions)                # neox style (HF layout)
    cache_write(k, v, slots)                             # into the paged KV cache
    a           = attention(q, ...)                      # prefill: varlen causal; decode: paged
    x, residual = rms_norm(linear(a, o), post_norm, residual)
    h           = linear(silu_and_mul(linear(x, gate_up)), down)

then ``logits = linear(rms_norm(h, final_norm, residual), lm_head)`` for the rows that
need them (each sequence's last token). Outside the ops, the forward pass runs three
small PyTorch operations on the GPU: the embedding gather (``embed[ids]``), the gather
of each prefill sequence's last row, and views (no copies). Everything here is
host-side bookkeeping; :class:`~.graphs.DecodeGraphs` captures :meth:`Decoder.decode` in
CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...kernels import cos_sin_cache
from .kv_cache import KVCache
from .loading import Weights
from .ops import Ops


@dataclass
class PrefillBatch:
    """Whole prompts packed back to back."""

    input_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64
    slots: torch.Tensor  # [tokens] int64: where each token's K/V goes
    cu_seqlens: torch.Tensor  # [batch + 1] int32
    seq_lens: list[int]  # on the host
    last_rows: torch.Tensor  # [batch] int64: each sequence's last token


@dataclass
class DecodeBatch:
    """One new token per sequence."""

    input_ids: torch.Tensor  # [batch] int64
    positions: torch.Tensor  # [batch] int64
    slots: torch.Tensor  # [batch] int64 (-1: a padded row)
    block_table: torch.Tensor  # [batch, >= max_context_len / block_size] int32
    context_lens: torch.Tensor  # [batch] int32, the new token included (0: a padded row)
    max_context_len: int  # an upper bound of context_lens: part of the attention key


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Decoder:
    """A Llama-family decoder over a paged KV cache, running on ``ops``."""

    def __init__(self, weights: Weights, cache: KVCache, ops: Ops, max_position: int | None = None) -> None:
        self.w = weights
        self.config = weights.config
        self.cache = cache
        self.ops = ops
        positions = max_position or self.config.max_position
        # fp32 angles: the rotation is computed in fp32 whatever the activations' dtype.
        self.cos_sin = cos_sin_cache(
            self.config.head_size,
            positions,
            self.config.rope_theta,
            dtype=torch.float32,
            device=weights.device,
        )

    def prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of each prompt's last token; writes every token's K/V."""
        return self.head(self.prefill_states(batch, batch.last_rows))

    def prefill_states(self, batch: PrefillBatch, rows: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[len(rows), hidden]`` (after the last norm) of the packed
        tokens ``rows``, whose logits :meth:`head` makes; writes every token's K/V. A scorer
        keeps every row of a prompt (each token's logits predict the next prompt token)."""

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.ops.prefill_attention(q, k, v, batch.cu_seqlens, batch.seq_lens)

        return self._forward(batch.input_ids, batch.positions, batch.slots, attend, rows)

    def head(self, states: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of final hidden states (the LM head)."""
        return self.ops.linear(states, self.w.lm_head)

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of each sequence's new token; writes its K/V first."""

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = self.cache.layer(layer)
            return self.ops.decode_attention(
                q, k_cache, v_cache, batch.block_table, batch.context_lens, batch.max_context_len
            )

        return self.head(self._forward(batch.input_ids, batch.positions, batch.slots, attend, None))

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: Attend,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        c, ops = self.config, self.ops
        tokens, qs, kvs, d = ids.shape[0], c.q_size, c.kv_size, c.head_size
        h = self.w.embed[ids]  # PyTorch: the embedding gather
        residual: torch.Tensor | None = None
        for i, lw in enumerate(self.w.layers):
            if residual is None:
                x, residual = ops.rms_norm(h, lw.input_norm, c.rms_eps), h
            else:
                x, residual = ops.rms_norm(h, lw.input_norm, c.rms_eps, residual)
            qkv = ops.linear(x, lw.qkv)
            q, k = ops.rotary(qkv[:, :qs], qkv[:, qs : qs + kvs], positions, self.cos_sin, d)
            k3 = k.view(tokens, c.n_kv_heads, d)
            v3 = qkv[:, qs + kvs :].view(tokens, c.n_kv_heads, d)
            k_cache, v_cache = self.cache.layer(i)
            ops.cache_write(k3, v3, k_cache, v_cache, slots)
            a = attend(i, q.view(tokens, c.n_q_heads, d), k3, v3)
            x, residual = ops.rms_norm(
                ops.linear(a.reshape(tokens, qs), lw.o), lw.post_norm, c.rms_eps, residual
            )
            h = ops.linear(ops.silu_and_mul(ops.linear(x, lw.gate_up)), lw.down)
        x, _ = ops.rms_norm(h, self.w.final_norm, c.rms_eps, residual)
        return x if rows is None else x[rows]  # PyTorch: each sequence's last row (or a scorer's rows)


def prefill_batch(
    prompts: Sequence[Sequence[int]],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str,
) -> PrefillBatch:
    """Pack whole prompts (each at positions 0..len-1) with their blocks' slots."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lens: list[int] = []
    for prompt, blocks in zip(prompts, block_tables):
        n = len(prompt)
        ids.extend(prompt)
        positions.extend(range(n))
        slots.extend(blocks[t // block_size] * block_size + t % block_size for t in range(n))
        lens.append(n)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)

    def tensor(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return PrefillBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        slots=tensor(slots),
        cu_seqlens=tensor(cu, torch.int32),
        seq_lens=lens,
        last_rows=tensor([e - 1 for e in cu[1:]]),
    )
