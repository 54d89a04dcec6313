"""The seven operations a decoder layer runs, behind one interface, three ways.

* :class:`TritonOps` (``"triton"``, the engine's default): the pack's public functions,
  each tuned per key and served from the books (``tunebook.kernels``). On Triton's CPU
  interpreter, whose cost is per launched program and per array op, the GEMMs are launched
  with wide tiles (``linear(config=...)``, :func:`interpreter_linear_config`) instead of
  the book's GPU-sized ones: a 49152-wide output in 96 programs instead of 768.
* :class:`FixedOps` (``"fixed"``): the same kernels launched with each op's hand-picked
  config (what ``serve`` mode falls back to for a key no book holds; the kernels' private
  ``_op(config=...)`` launchers, as the pack's benchmarks use them): the untuned engine.
* :class:`TorchOps` (``"torch"``): PyTorch in place of every kernel: ``torch.matmul``
  (cuBLAS), ``scaled_dot_product_attention``, eager RMSNorm, SiLU and RoPE, index copies
  into the cache. The baseline the Triton engine is measured against.

The KV cache layout is the pack's (``[num_blocks, block_size, n_kv_heads, head_size]``);
a cache write with a negative slot writes nothing (padded rows of a CUDA-graph batch).

>>> ops = make_ops("torch")
>>> x = torch.randn(2, 8)
>>> torch.allclose(ops.linear(x, torch.eye(8)), x)
True
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import triton

from ..._compat import interpreting

KINDS = ("triton", "fixed", "torch")


class Ops:
    """What the decoder calls. Shapes: ``x`` ``[tokens, width]``; q/k/v ``[tokens, heads,
    head_size]`` (token and head strides free); caches as in the module docstring."""

    name = "abstract"

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> Any:
        """``y`` for no residual; ``(y, x + residual)`` with one (the sum is what y normalizes)."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T``."""
        raise NotImplementedError

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (neox style: rotate halves) of 2-D ``q``/``k`` ``[tokens, heads * head_size]``."""
        raise NotImplementedError

    def cache_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        """Causal attention of packed whole prompts; ``seq_lens`` on the host."""
        raise NotImplementedError

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> torch.Tensor:
        """One query per sequence over its cached context (``context_lens`` 0: a padded row)."""
        raise NotImplementedError


def interpreter_linear_config(m: int, n: int, k: int) -> dict[str, int]:
    """Wide tiles for the interpreter, whose cost is per program and per array op; past
    512 x 64 its gathers of the weight tile grow slower, not faster (SmolLM2's layers,
    measured on 2 CPU cores: 2-3x faster than 128 x 64 tiles, and no wider tile better).

    >>> config = interpreter_linear_config(30, 49152, 576)
    >>> config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    (32, 512, 64, 1)
    """
    return {
        "BLOCK_M": max(16, min(64, triton.next_power_of_2(m))),
        "BLOCK_N": max(32, min(512, triton.next_power_of_2(n))),
        "BLOCK_K": max(32, min(64, triton.next_power_of_2(k))),
        "GROUP_M": 1,
        "SPLIT_K": 1,
        "num_warps": 4,
        "num_stages": 1,
    }


class TritonOps(Ops):
    """The pack's public functions (module docstring)."""

    name = "triton"

    def __init__(self) -> None:
        import tunebook.kernels as k

        self.k = k
        self._interpreting = interpreting()

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> Any:
        return self.k.rms_norm(x, w, eps, residual)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._interpreting:
            return self.k.linear(x, w, config=interpreter_linear_config(x.shape[0], w.shape[0], w.shape[1]))
        return self.k.linear(x, w)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.k.silu_and_mul(x)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.rotary_embedding(q, k, positions, cos_sin, "neox", head_size=head_size)

    def cache_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        self.k.reshape_and_cache(k, v, k_cache, v_cache, slots)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        longest = max(seq_lens)
        return self.k.varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, causal=True, max_seqlen_q=longest, max_seqlen_k=longest
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> torch.Tensor:
        return self.k.paged_attention_decode(
            q, k_cache, v_cache, block_table, context_lens, max_context_len=max_context_len
        )


class FixedOps(TritonOps):
    """The pack's kernels at each op's hand-picked config: no book, no tuning."""

    name = "fixed"

    def __init__(self) -> None:
        super().__init__()
        # The op modules themselves: the package's attributes of the same names are the
        # public functions.
        self.mod = {name: importlib.import_module(f"tunebook.kernels.{name}") for name in _PRIVATE}

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> Any:
        m = self.mod["rms_norm"]
        return m._rms_norm(x, w, eps, residual, None, None, m.hand_picked({"N": x.shape[-1]}))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._interpreting:
            return super().linear(x, w)
        m = self.mod["linear"]
        return self.k.linear(x, w, config=m.default_linear_config(x.shape[0], w.shape[0], w.shape[1]))

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mod["silu_and_mul"]
        return m._silu_and_mul(x, None, m.hand_picked({"D": x.shape[-1] // 2}))

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.mod["rotary_embedding"]
        key = {"NQ": q.shape[-1] // head_size, "NK": k.shape[-1] // head_size}
        return m._rotary_embedding(
            q, k, positions, cos_sin, "neox", None, head_size, None, m.hand_picked(key)
        )

    def cache_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        m = self.mod["reshape_and_cache"]
        m._reshape_and_cache(k, v, k_cache, v_cache, slots, m.hand_picked({"NK": k.shape[1]}))

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        m = self.mod["varlen_attention"]
        longest = max(seq_lens)
        return m._varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, True, None, longest, longest,
            None, None, None, None, None, m.hand_picked({}),
        )  # fmt: skip

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> torch.Tensor:
        m = self.mod["paged_attention_decode"]
        config = m.hand_picked({"batch": q.shape[0], "NK": k_cache.shape[2]})
        return m._paged_attention_decode(
            q, k_cache, v_cache, block_table, context_lens, None, max_context_len, None, config
        )


_PRIVATE = (
    "linear",
    "paged_attention_decode",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "varlen_attention",
)


class TorchOps(Ops):
    """PyTorch in place of every kernel (module docstring)."""

    name = "torch"

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> Any:
        h = x if residual is None else x + residual
        hf = h.float()
        y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
        return y if residual is None else (y, h)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, w.t())

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = cos_sin.shape[1] // 2
        table = cos_sin[positions]
        cos, sin = table[:, None, :half], table[:, None, half:]

        def rotate(t: torch.Tensor) -> torch.Tensor:
            x = t.reshape(t.shape[0], -1, head_size).float()
            x1, x2 = x[..., :half], x[..., half:]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            return out.to(t.dtype).reshape(t.shape)

        return rotate(q), rotate(k)

    def cache_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        # Padded rows (slot -1) write into slot 0 of the reserved block 0 instead: no
        # data-dependent shapes, so the step can be captured in a CUDA graph.
        index = slots.clamp(min=0).long()
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, index, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, index, v)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for n in seq_lens:
            qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            out[start : start + n] = o.transpose(0, 1)
            start += n
        return out

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> torch.Tensor:
        batch, page = q.shape[0], k_cache.shape[1]
        width = -(-max_context_len // page)
        table = block_table[:, :width].long()
        # Gather each sequence's blocks into [batch, heads, tokens, head_size] for SDPA.
        k = k_cache[table].flatten(1, 2).transpose(1, 2)
        v = v_cache[table].flatten(1, 2).transpose(1, 2)
        visible = torch.arange(width * page, device=q.device)[None, :] < context_lens.clamp(min=1)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], k, v, attn_mask=visible[:, None, None, :], enable_gqa=True
        )
        return out[:, :, 0, :].reshape(batch, q.shape[1], q.shape[2])


def make_ops(kind: str) -> Ops:
    """``"triton"``, ``"fixed"`` or ``"torch"`` (module docstring)."""
    if kind == "triton":
        return TritonOps()
    if kind == "fixed":
        return FixedOps()
    if kind == "torch":
        return TorchOps()
    raise ValueError(f"ops={kind!r}: expected one of {', '.join(KINDS)}")
