"""The shapes the pack is tuned and benchmarked on: the ops of a few common LLMs, per GPU
(after tensor parallelism), over serving token counts.

``plan(...)`` lists every (op, shape, dtype, token count); each builds a :class:`Workload`:
the op's inputs and preallocated outputs on a device, a ``run(config)`` that launches it
(the tuned config when ``config`` is None), and the bytes it must move at the least.

An op takes part through one entry of :data:`OPS` (an :class:`Op`): a function giving its
shapes in a model, one building a call of it, and the token counts it is tuned at by
default. For decode attention the "token count" is the batch (one token per sequence) and
the context length is part of the shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .fused_moe import fused_moe
from .linear import linear
from .paged_attention_decode import _paged_attention_decode
from .reshape_and_cache import _reshape_and_cache
from .rms_norm import _rms_norm
from .rotary_embedding import _rotary_embedding, cos_sin_cache
from .silu_and_mul import _silu_and_mul
from .varlen_attention import _varlen_attention


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int  # per GPU: the MLP width divided by the tensor-parallel degree
    n_q_heads: int  # per GPU
    n_kv_heads: int  # per GPU
    head_size: int
    rope_theta: float
    qkv_bias: bool = False  # Qwen2's q/k/v projections carry a bias
    experts: int = 0  # a mixture of experts: its MLP is fused_moe, not two linear layers
    top_k: int = 0
    expert_tp: tuple[int, ...] = ()  # the tensor-parallel degrees its experts are tuned at


MODELS: tuple[Model, ...] = (
    Model("llama-3-8b", 4096, 14336, 32, 8, 128, 500000.0),
    Model("llama-3-70b-tp4", 8192, 28672 // 4, 64 // 4, 8 // 4, 128, 500000.0),
    Model("llama-3-70b-tp8", 8192, 28672 // 8, 64 // 8, 8 // 8, 128, 500000.0),
    Model("qwen2.5-7b", 3584, 18944, 28, 4, 128, 1000000.0, qkv_bias=True),
    # TP1 for every layer; its experts also at TP2 (fused_moe's intermediate 7168)
    Model("mixtral-8x7b", 4096, 14336, 32, 8, 128, 1000000.0, experts=8, top_k=2, expert_tp=(1, 2)),
    Model("smollm2-135m", 576, 1536, 9, 3, 64, 100000.0),
)
TOKENS: tuple[int, ...] = tuple(2**i for i in range(14))  # 1 .. 8192: one per token bucket
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_POSITION = 8192
PAGE = 16  # KV-cache block size (tokens per block), vLLM's default
# Decode attention: batch sizes and context lengths tuned by default (keys of the book;
# a bucket in between is served by the nearest tuned one), at most DECODE_MAX_TOKENS cached
# tokens per call (8.6 GB of bf16 K/V for 8 KV heads of 128: one layer's cache for 256
# sequences of 8k, or 64 of 32k). 11 keys per head layout.
DECODE_BATCHES: tuple[int, ...] = (1, 16, 64, 256)
DECODE_CONTEXTS: tuple[int, ...] = (512, 8192, 32768)
DECODE_MAX_TOKENS = 1 << 21
# Cache writes: a decode step writes one token per sequence, a prefill thousands.
CACHE_TOKENS: tuple[int, ...] = (1, 16, 256, 4096)
# Prefill: packed tokens per call, and (longest sequence, cached prefix) pairs: whole
# prompts of 512 to 8192 tokens, and chunks of 512 and 2048 on top of a cached prefix.
PREFILL_TOKENS: tuple[int, ...] = (8192,)
PREFILL_SHAPES: tuple[tuple[int, int], ...] = ((512, 0), (2048, 0), (8192, 0), (512, 3584), (2048, 6144))


@dataclass
class Workload:
    """One call of an op: its inputs and outputs, and how to launch it."""

    op: str
    shape: dict[str, Any]
    tokens: int
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    run: Callable[[dict[str, int] | None], Any]
    bytes: int  # read and written, each byte once
    key: dict[str, Any]  # the kernel's key values, by name (what hand_picked() takes)
    models: list[str] = field(default_factory=list)
    flops: int = 0  # floating-point operations of the math (attention), 0 where bytes are the measure

    @property
    def label(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}[{dims}] tokens={self.tokens} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Maker:
    """Makes a workload's tensors: seeded random inputs and empty outputs, on one device."""

    dtype: torch.dtype
    device: Any
    gen: torch.Generator

    def randn(self, *size: int) -> torch.Tensor:
        return torch.randn(size, generator=self.gen).to(dtype=self.dtype, device=self.device)

    def empty(self, *size: int) -> torch.Tensor:
        return torch.empty(size, dtype=self.dtype, device=self.device)

    def randn_on_device(self, *size: int) -> torch.Tensor:
        """Like :meth:`randn`, drawn on the device itself (seeded from ``gen``): a KV cache of
        gigabytes takes milliseconds there and minutes on the host."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        device_gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(size, generator=device_gen, device=self.device, dtype=self.dtype)

    def permutation(self, n: int) -> torch.Tensor:
        """``0 .. n-1`` shuffled, int32, on the device (block ids in no particular order)."""
        return torch.randperm(n, generator=self.gen).to(device=self.device, dtype=torch.int32)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


# ------------------------------------------------------------------ the ops
# Per op: its shapes in a model; and for one call its tensors, a launcher, the bytes it
# moves and its kernel's key values.

Run = Callable[[dict[str, int] | None], Any]
Built = tuple[dict[str, torch.Tensor], Run, int, dict[str, Any]]  # tensors, launcher, bytes, key
BuiltWithFlops = tuple[dict[str, torch.Tensor], Run, int, dict[str, Any], int]  # ... and flops


def _rms_norm_shapes(m: Model) -> list[dict[str, Any]]:
    return [{"hidden": m.hidden, "residual": r} for r in (False, True)]


def _rms_norm_build(make: Maker, shape: dict[str, Any], tokens: int) -> Built:
    n, fused = shape["hidden"], shape["residual"]
    t = {"x": make.randn(tokens, n), "weight": make.randn(n), "out": make.empty(tokens, n)}
    if fused:
        t["residual"], t["residual_out"] = make.randn(tokens, n), make.empty(tokens, n)

    def run(config: dict[str, int] | None) -> Any:
        return _rms_norm(
            t["x"], t["weight"], 1e-6, t.get("residual"), t["out"], t.get("residual_out"), config
        )

    moved = ((4 if fused else 2) * tokens + 1) * n * make.itemsize
    return t, run, moved, {"n_rows": tokens, "N": n, "HAS_RESIDUAL": fused}


def _silu_and_mul_shapes(m: Model) -> list[dict[str, Any]]:
    return [{"d": m.intermediate}]


def _silu_and_mul_build(make: Maker, shape: dict[str, Any], tokens: int) -> Built:
    d = shape["d"]
    t = {"x": make.randn(tokens, 2 * d), "out": make.empty(tokens, d)}

    def run(config: dict[str, int] | None) -> Any:
        return _silu_and_mul(t["x"], t["out"], config)

    return t, run, 3 * tokens * d * make.itemsize, {"n_rows": tokens, "D": d}


def _rotary_embedding_shapes(m: Model) -> list[dict[str, Any]]:
    return [{"n_q": m.n_q_heads, "n_kv": m.n_kv_heads, "head_size": m.head_size}]


def _rotary_embedding_build(make: Maker, shape: dict[str, Any], tokens: int) -> Built:
    n_q, n_kv, hs = shape["n_q"], shape["n_kv"], shape["head_size"]
    t = {
        "q": make.randn(tokens, n_q * hs),
        "k": make.randn(tokens, n_kv * hs),
        "positions": torch.randint(0, MAX_POSITION, (tokens,), generator=make.gen).to(make.device),
        "cos_sin_cache": cos_sin_cache(hs, MAX_POSITION, dtype=make.dtype, device=make.device),
        "q_out": make.empty(tokens, n_q * hs),
        "k_out": make.empty(tokens, n_kv * hs),
    }

    def run(config: dict[str, int] | None) -> Any:
        out = (t["q_out"], t["k_out"])
        return _rotary_embedding(
            t["q"], t["k"], t["positions"], t["cos_sin_cache"], "neox", None, hs, out, config
        )

    # q and k read and written; each token's position and cos/sin row read once
    moved = 2 * tokens * (n_q + n_kv) * hs * make.itemsize + tokens * (8 + hs * make.itemsize)
    key = {"n_tokens": tokens, "NQ": n_q, "NK": n_kv, "HEAD_SIZE": hs, "ROTARY_DIM": hs, "IS_NEOX": True}
    return t, run, moved, key


def _attention_shapes(m: Model) -> dict[str, Any]:
    return {"n_q": m.n_q_heads, "n_kv": m.n_kv_heads, "head_size": m.head_size}


def _paged_attention_decode_shapes(m: Model) -> list[dict[str, Any]]:
    return [{**_attention_shapes(m), "page": PAGE, "context": n} for n in DECODE_CONTEXTS]


def _paged_attention_decode_fits(shape: dict[str, Any], batch: int) -> bool:
    return batch * cached_tokens(shape["context"], shape["page"]) <= DECODE_MAX_TOKENS


def cached_tokens(context: int, block_size: int) -> int:
    """The tokens a sequence of ``context`` tokens holds in the cache: whole blocks."""
    return -(-context // block_size) * block_size


def _paged_attention_decode_build(make: Maker, shape: dict[str, Any], batch: int) -> Built:
    """``batch`` sequences of ``context`` cached tokens each, their blocks shuffled."""
    n_q, n_kv, hs, page, context = (shape[k] for k in ("n_q", "n_kv", "head_size", "page", "context"))
    per_seq = -(-context // page)
    t = {
        "q": make.randn(batch, n_q, hs),
        "k_cache": make.randn_on_device(batch * per_seq, page, n_kv, hs),
        "v_cache": make.randn_on_device(batch * per_seq, page, n_kv, hs),
        "block_table": make.permutation(batch * per_seq).view(batch, per_seq),
        "context_lens": torch.full((batch,), context, dtype=torch.int32, device=make.device),
        "out": make.empty(batch, n_q, hs),
    }

    def run(config: dict[str, int] | None) -> Any:
        return _paged_attention_decode(
            t["q"],
            t["k_cache"],
            t["v_cache"],
            t["block_table"],
            t["context_lens"],
            None,
            context,
            t["out"],
            config,
        )

    kv = 2 * batch * context * n_kv * hs * make.itemsize
    moved = kv + 2 * batch * n_q * hs * make.itemsize + batch * per_seq * 4
    key = {"batch": batch, "max_context_len": context, "NQ": n_q, "NK": n_kv, "HEAD_SIZE": hs, "PAGE": page}
    return t, run, moved, key


def mixed_lengths(longest: int, tokens: int) -> list[int]:
    """Sequence lengths that pack ``tokens`` tokens: ``longest``, a quarter, a half and three
    quarters of it, in turn, the last one cut short.

    >>> mixed_lengths(8, 30), mixed_lengths(512, 100)
    ([8, 2, 4, 6, 8, 2], [100])
    """
    lengths: list[int] = []
    pattern = [longest, longest // 4, longest // 2, 3 * longest // 4]
    while sum(lengths) < tokens:
        lengths.append(min(max(1, pattern[len(lengths) % 4]), tokens - sum(lengths)))
    return lengths


def _varlen_attention_shapes(m: Model) -> list[dict[str, Any]]:
    return [{**_attention_shapes(m), "seqlen": n, "prefix": p} for n, p in PREFILL_SHAPES]


def _varlen_attention_build(make: Maker, shape: dict[str, Any], tokens: int) -> BuiltWithFlops:
    """Prefill of ``tokens`` packed tokens in sequences of mixed lengths (up to ``seqlen``),
    each on top of ``prefix`` tokens in the paged cache (none when 0); causal unless the
    shape says ``"causal": False``."""
    n_q, n_kv, hs, prefix = (shape[k] for k in ("n_q", "n_kv", "head_size", "prefix"))
    causal = shape.get("causal", True)
    lengths = mixed_lengths(shape["seqlen"], tokens)
    batch = len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=make.device)
    t = {
        "q": make.randn_on_device(tokens, n_q, hs),
        "k": make.randn_on_device(tokens, n_kv, hs),
        "v": make.randn_on_device(tokens, n_kv, hs),
        "cu_seqlens": cu,
        "out": make.empty(tokens, n_q, hs),
    }
    page = shape.get("page", PAGE)
    if prefix:
        per_seq = -(-prefix // page)
        t["k_cache"] = make.randn_on_device(batch * per_seq, page, n_kv, hs)
        t["v_cache"] = make.randn_on_device(batch * per_seq, page, n_kv, hs)
        t["block_table"] = make.permutation(batch * per_seq).view(batch, per_seq)
        t["prefix_lens"] = torch.full((batch,), prefix, dtype=torch.int32, device=make.device)
    longest = max(lengths)

    def run(config: dict[str, int] | None) -> Any:
        q, k, v, out = t["q"], t["k"], t["v"], t["out"]
        kc, vc, table, lens = (t.get(n) for n in ("k_cache", "v_cache", "block_table", "prefix_lens"))
        return _varlen_attention(
            q, k, v, cu, cu, causal, None, longest, longest + prefix, kc, vc, table, lens, out, config
        )

    moved = (
        2 * n_q + 2 * n_kv
    ) * tokens * hs * make.itemsize + 2 * batch * prefix * n_kv * hs * make.itemsize
    # Each row sees its prefix and the rows up to itself (all rows without causal): two
    # products of head_size per key.
    pairs = sum((n * (n + 1) // 2 if causal else n * n) + n * prefix for n in lengths)
    key = {
        "max_seqlen_q": longest,
        "max_seqlen_k": longest + prefix,
        "NQ": n_q,
        "NK": n_kv,
        "HEAD_SIZE": hs,
        "CAUSAL": causal,
        "HAS_PREFIX": bool(prefix),
        "PAGE": page if prefix else 0,
    }
    return t, run, moved, key, 4 * pairs * hs * n_q


def _reshape_and_cache_shapes(m: Model) -> list[dict[str, Any]]:
    return [{"n_kv": m.n_kv_heads, "head_size": m.head_size, "page": PAGE}]


def _reshape_and_cache_build(make: Maker, shape: dict[str, Any], tokens: int) -> Built:
    """``tokens`` new tokens written into shuffled blocks of a zeroed cache twice their size."""
    n_kv, hs, page = shape["n_kv"], shape["head_size"], shape["page"]
    blocks = 2 * -(-tokens // page)
    order = make.permutation(blocks).long()
    pos = torch.arange(tokens, device=make.device)
    t = {
        "key": make.randn(tokens, n_kv, hs),
        "value": make.randn(tokens, n_kv, hs),
        "k_cache": torch.zeros(blocks, page, n_kv, hs, dtype=make.dtype, device=make.device),
        "v_cache": torch.zeros(blocks, page, n_kv, hs, dtype=make.dtype, device=make.device),
        "slot_mapping": order[pos // page] * page + pos % page,
    }

    def run(config: dict[str, int] | None) -> Any:
        _reshape_and_cache(t["key"], t["value"], t["k_cache"], t["v_cache"], t["slot_mapping"], config)
        return t["k_cache"], t["v_cache"]

    moved = 4 * tokens * n_kv * hs * make.itemsize + 8 * tokens
    return t, run, moved, {"n_tokens": tokens, "NK": n_kv, "HEAD_SIZE": hs}


def _linear_shapes(m: Model) -> list[dict[str, Any]]:
    """A decoder layer's projections as ``[N, K]`` weights: q/k/v fused, the attention
    output, and (without experts) the MLP's gate/up fused and down."""
    hs = m.head_size
    out = [
        {"layer": "qkv", "N": (m.n_q_heads + 2 * m.n_kv_heads) * hs, "K": m.hidden, "bias": m.qkv_bias},
        {"layer": "o", "N": m.hidden, "K": m.n_q_heads * hs, "bias": False},
    ]
    if not m.experts:
        out.append({"layer": "gate_up", "N": 2 * m.intermediate, "K": m.hidden, "bias": False})
        out.append({"layer": "down", "N": m.hidden, "K": m.intermediate, "bias": False})
    return out


def _linear_build(make: Maker, shape: dict[str, Any], tokens: int) -> BuiltWithFlops:
    n, k = shape["N"], shape["K"]
    t = {"x": make.randn(tokens, k), "weight": make.randn(n, k) * k**-0.5, "out": make.empty(tokens, n)}
    if shape["bias"]:
        t["bias"] = make.randn(n)

    def run(config: dict[str, int] | None) -> Any:
        return linear(t["x"], t["weight"], t.get("bias"), out=t["out"], config=config)

    moved = (tokens * k + n * k + tokens * n + (n if shape["bias"] else 0)) * make.itemsize
    return t, run, int(moved), {"M": tokens, "N": n, "K": k}, 2 * tokens * n * k


def _fused_moe_shapes(m: Model) -> list[dict[str, Any]]:
    return [
        {"experts": m.experts, "hidden": m.hidden, "intermediate": m.intermediate // tp, "top_k": m.top_k}
        for tp in m.expert_tp
    ]


def _fused_moe_build(make: Maker, shape: dict[str, Any], tokens: int) -> BuiltWithFlops:
    """``tokens`` tokens routed by a seeded random softmax, each to its top-k experts."""
    e, h, inter, top_k = shape["experts"], shape["hidden"], shape["intermediate"], shape["top_k"]
    weights, ids = torch.topk(torch.randn(tokens, e, generator=make.gen).softmax(-1), top_k)
    t = {
        "x": make.randn(tokens, h),
        "w13": make.randn(e, 2 * inter, h) * h**-0.5,
        "w2": make.randn(e, h, inter) * inter**-0.5,
        "topk_weights": weights.to(device=make.device),
        "topk_ids": ids.to(device=make.device, dtype=torch.int32),
        "out": make.empty(tokens, h),
    }

    def run(config: dict[str, int] | None) -> Any:
        return fused_moe(
            t["x"], t["w13"], t["w2"], t["topk_weights"], t["topk_ids"], out=t["out"], config=config
        )

    used = int(ids.unique().numel())  # only the experts some token is routed to are read
    moved = int((used * 3 * inter * h + 2 * tokens * h) * make.itemsize)
    flops = 2 * tokens * top_k * 3 * inter * h
    key = {"M": tokens, "E": e, "H": h, "N": 2 * inter, "top_k": top_k}
    return t, run, moved, key, flops


Shapes = Callable[[Model], list[dict[str, Any]]]
Build = Callable[[Maker, dict[str, Any], int], Built | BuiltWithFlops]


@dataclass(frozen=True)
class Op:
    """How an op takes part: its shapes in a model, how one call is built, the token counts
    it is tuned at unless told otherwise, and which (shape, token count) pairs are worth a
    call at all."""

    shapes: Shapes
    build: Build
    tokens: tuple[int, ...] = TOKENS
    fits: Callable[[dict[str, Any], int], bool] = lambda shape, tokens: True


OPS: dict[str, Op] = {
    "rms_norm": Op(_rms_norm_shapes, _rms_norm_build),
    "silu_and_mul": Op(_silu_and_mul_shapes, _silu_and_mul_build),
    "rotary_embedding": Op(_rotary_embedding_shapes, _rotary_embedding_build),
    "reshape_and_cache": Op(_reshape_and_cache_shapes, _reshape_and_cache_build, CACHE_TOKENS),
    "paged_attention_decode": Op(
        _paged_attention_decode_shapes,
        _paged_attention_decode_build,
        DECODE_BATCHES,
        _paged_attention_decode_fits,
    ),
    "varlen_attention": Op(_varlen_attention_shapes, _varlen_attention_build, PREFILL_TOKENS),
    "linear": Op(_linear_shapes, _linear_build),
    "fused_moe": Op(_fused_moe_shapes, _fused_moe_build),
}


def _op(op: str) -> Op:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the pack's ops are {', '.join(OPS)}")
    return OPS[op]


# ------------------------------------------------------------------ plans


def shapes(
    op: str,
    models: Sequence[Model] = MODELS,
    *,
    block_size: int = PAGE,
    contexts: Sequence[int] | None = None,
) -> dict[tuple[tuple[str, Any], ...], list[str]]:
    """The distinct shapes of ``op`` over ``models`` -> the models that have each; with a
    server's KV-cache ``block_size`` and decode ``contexts`` in place of the defaults."""
    out: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for m in models:
        for shape in _op(op).shapes(m):
            for laid_out in _laid_out(shape, block_size, contexts):
                names = out.setdefault(tuple(laid_out.items()), [])
                if m.name not in names:
                    names.append(m.name)
    return out


def _laid_out(shape: dict[str, Any], block_size: int, contexts: Sequence[int] | None) -> list[dict[str, Any]]:
    """``shape`` with another block size for the ops that read or write the paged cache
    (decode, the cache write, prefill over a cached prefix), and, for decode, other context
    lengths. The default block size leaves a shape as it is, so its benchmark labels stay."""
    if block_size != PAGE and ("page" in shape or shape.get("prefix")):
        shape = {**shape, "page": block_size}
    if contexts is not None and "context" in shape:
        return [{**shape, "context": n} for n in contexts]
    return [shape]


def workload(
    op: str, shape: dict[str, Any], tokens: int, dtype: torch.dtype, device: Any, seed: int = 0
) -> Workload:
    """``op`` on fresh inputs of ``shape`` with ``tokens`` tokens (seeded), on ``device``."""
    make = Maker(dtype, device, torch.Generator(device="cpu").manual_seed(seed))
    tensors, run, moved, key, *flops = _op(op).build(make, shape, tokens)
    return Workload(op, dict(shape), tokens, dtype, tensors, run, moved, key, flops=sum(flops))


@dataclass(frozen=True)
class Planned:
    """A workload to build: cheap to list, tensors made only by :meth:`build`."""

    op: str
    shape: tuple[tuple[str, Any], ...]
    tokens: int
    dtype: torch.dtype
    models: tuple[str, ...]

    def build(self, device: Any) -> Workload:
        w = workload(self.op, dict(self.shape), self.tokens, self.dtype, device)
        w.models = list(self.models)
        return w


def plan(
    ops: Sequence[str] = tuple(OPS),
    models: Sequence[Model] = MODELS,
    tokens: Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
    *,
    block_size: int = PAGE,
    contexts: Sequence[int] | None = None,
) -> list[Planned]:
    """Every (op, shape, dtype, token count) over ``models``, in that nesting order; token
    counts are each op's own (:attr:`Op.tokens`) unless given, and pairs an op does not
    call (:attr:`Op.fits`) are left out. ``block_size`` and ``contexts``: as :func:`shapes`."""
    return [
        Planned(op, shape, n, dtype, tuple(names))
        for op in ops
        for shape, names in shapes(op, models, block_size=block_size, contexts=contexts).items()
        for dtype in dtypes
        for n in (_op(op).tokens if tokens is None else tokens)
        if _op(op).fits(dict(shape), n)
    ]


def select_models(names: str | None) -> tuple[Model, ...]:
    """``"llama-3-8b,smollm2-135m"`` -> those models (None: all), with an error listing them."""
    if not names:
        return MODELS
    by_name = {m.name: m for m in MODELS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return tuple(by_name[n] for n in names.split(","))
