"""The seven operations a decoder layer runs, behind one interface, four ways.

* :class:`TritonOps` (``"triton"``, the engine's default): the pack's public functions,
  each tuned per key and served from the books (``tunebook.kernels``). On Triton's CPU
  interpreter, whose cost is per launched program and per array op, the GEMMs are launched
  with wide tiles (``linear(config=...)``, :func:`interpreter_linear_config`) instead of
  the book's GPU-sized ones: a 49152-wide output in 96 programs instead of 768.
* :class:`FixedOps` (``"fixed"``): the same kernels launched with each op's hand-picked
  config (what ``serve`` mode falls back to for a key no book holds; the kernels' private
  ``_op(config=...)`` launchers, as the pack's benchmarks use them): the engine without
  books, with a conventional config per op.
* :class:`FirstOps` (``"first"``): the same launchers at each kernel's first config, the
  first candidate its Space allows for the call: the engine with no tuning and no
  hand-picked rule (what a kernel runs untuned; the issue's "untuned" baseline).
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

KINDS = ("triton", "fixed", "first", "torch")


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
    uses_books = True  # FixedOps launches its configs directly

    def __init__(self) -> None:
        import tunebook.kernels as k

        self.k = k
        self._interpreting = interpreting()
        if self.uses_books:
            k.open_books()  # at the engine's start, not in its first request

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
        # Our own output: the sequences fill every row (no padding), so the op need not zero
        # the rows past the last sequence, a memset of the whole output on a GPU.
        return self.k.varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            causal=True,
            max_seqlen_q=longest,
            max_seqlen_k=longest,
            out=torch.empty_like(q),
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
    """The pack's kernels at each op's hand-picked config: no book, no tuning.

    Every op asks :meth:`config` for the config of its call, given the call's arguments
    under the names the op's kernel gives them (``N``, ``n_rows``, ``max_context_len``,
    ...: the names its key, hand-picked rule and Space's arg constraints read), and
    launches it through the op's private ``_op(config=...)`` launcher.
    """

    name = "fixed"
    uses_books = False
    # On the interpreter the GEMMs keep TritonOps' wide tiles: the hand-picked ones are
    # GPU-sized, and the interpreter pays per program (module docstring).
    wide_interpreter_tiles = True

    def __init__(self) -> None:
        super().__init__()
        # The op modules themselves: the package's attributes of the same names are the
        # public functions.
        self.mod = {name: importlib.import_module(f"tunebook.kernels.{name}") for name in _PRIVATE}

    def config(self, op: str, args: dict[str, Any]) -> dict[str, int]:
        """The config ``op``'s kernel launches with for a call with ``args``: the op's
        hand-picked one (what ``serve`` mode runs for a key with nothing comparable in the
        books)."""
        m = self.mod[op]
        if op == "linear":
            return dict(m.default_linear_config(args["M"], args["N"], args["K"]))
        return dict(m.hand_picked(args))

    def rms_norm(
        self, x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> Any:
        config = self.config("rms_norm", {"N": x.shape[-1], "n_rows": _rows(x)})
        return self.mod["rms_norm"]._rms_norm(x, w, eps, residual, None, None, config)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._interpreting and self.wide_interpreter_tiles:
            return super().linear(x, w)
        return self.k.linear(
            x, w, config=self.config("linear", {"M": _rows(x), "N": w.shape[0], "K": w.shape[1]})
        )

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config("silu_and_mul", {"D": x.shape[-1] // 2, "n_rows": _rows(x)})
        return self.mod["silu_and_mul"]._silu_and_mul(x, None, config)

    def rotary(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = {"NQ": q.shape[-1] // head_size, "NK": k.shape[-1] // head_size,
                "ROTARY_DIM": cos_sin.shape[1], "n_tokens": positions.shape[0]}  # fmt: skip
        config = self.config("rotary_embedding", args)
        return self.mod["rotary_embedding"]._rotary_embedding(
            q, k, positions, cos_sin, "neox", None, head_size, None, config
        )

    def cache_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        args = {"NK": k.shape[1], "HEAD_SIZE": k.shape[2], "n_tokens": k.shape[0]}
        config = self.config("reshape_and_cache", args)
        self.mod["reshape_and_cache"]._reshape_and_cache(k, v, k_cache, v_cache, slots, config)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        longest = max(seq_lens)
        args = {"HEAD_SIZE": q.shape[-1], "max_seqlen_q": longest, "max_seqlen_k": longest, "q_ptr": q}
        config = self.config("varlen_attention", args)
        return self.mod["varlen_attention"]._varlen_attention(
            q, k, v, cu_seqlens, cu_seqlens, True, None, longest, longest,
            None, None, None, None, None, config,
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
        args = {"batch": q.shape[0], "NK": k_cache.shape[2], "HEAD_SIZE": q.shape[-1],
                "PAGE": k_cache.shape[1], "max_context_len": max_context_len,
                "k_cache_ptr": k_cache}  # fmt: skip
        config = self.config("paged_attention_decode", args)
        return self.mod["paged_attention_decode"]._paged_attention_decode(
            q, k_cache, v_cache, block_table, context_lens, None, max_context_len, None, config
        )


class FirstOps(FixedOps):
    """The pack's kernels at each kernel's first config: the first of its Space's configs
    (declaration order) that the Space's constraints and arg constraints allow for the
    call, i.e. the first of the candidates its autotuner would measure. What a kernel runs
    with no tuning at all, and no hand-picked rule either: the "untuned" end of the gain
    of tuning. On the interpreter too (its GEMM tiles are small: slow on a large model)."""

    name = "first"
    wide_interpreter_tiles = False

    def __init__(self) -> None:
        super().__init__()
        # Each kernel's own Space, as its autotuner holds it.
        self.spaces: dict[str, Any] = {op: getattr(m, f"_{op}_kernel").space for op, m in self.mod.items()}
        # (op, the call's arguments) -> its first config: a Space's candidates are a walk
        # over all of its configs, and the calls of a step meet a few keys over and over.
        self._first: dict[tuple[Any, ...], dict[str, int]] = {}

    def config(self, op: str, args: dict[str, Any]) -> dict[str, int]:
        """The first candidate of ``op``'s Space for a call with ``args`` (class docstring)."""
        memo = (op, *sorted((k, v.dtype if isinstance(v, torch.Tensor) else v) for k, v in args.items()))
        found = self._first.get(memo)
        if found is None:
            candidates = self.spaces[op].candidates(args=args)
            if not candidates:
                shown = {k: v for k, v in args.items() if not isinstance(v, torch.Tensor)}
                raise ValueError(f"ops='first': tunebook.kernels.{op}'s Space allows no config for {shown}")
            found = self._first[memo] = dict(candidates[0])
        return found


def _rows(x: torch.Tensor) -> int:
    """Rows of ``x`` viewed as ``[rows, last dimension]``."""
    return x.numel() // max(x.shape[-1], 1)


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
    """``"triton"``, ``"fixed"``, ``"first"`` or ``"torch"`` (module docstring)."""
    if kind == "triton":
        return TritonOps()
    if kind == "fixed":
        return FixedOps()
    if kind == "first":
        return FirstOps()
    if kind == "torch":
        return TorchOps()
    raise ValueError(f"ops={kind!r}: expected one of {', '.join(KINDS)}")
