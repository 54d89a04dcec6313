"""The shapes the pack is tuned and benchmarked on: the ops of a few common LLMs, per GPU
(after tensor parallelism), over serving token counts.

``plan(...)`` lists every (op, shape, dtype, token count); each builds a :class:`Workload`:
the op's inputs and preallocated outputs on a device, a ``run(config)`` that launches it
(the tuned config when ``config`` is None), and the bytes it must move at the least.

An op takes part through one entry of :data:`OPS`: a function giving its shapes in a
model, and one building a call of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .rms_norm import _rms_norm
from .rotary_embedding import _rotary_embedding, cos_sin_cache
from .silu_and_mul import _silu_and_mul


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int  # per GPU: the MLP width divided by the tensor-parallel degree
    n_q_heads: int  # per GPU
    n_kv_heads: int  # per GPU
    head_size: int
    rope_theta: float


MODELS: tuple[Model, ...] = (
    Model("llama-3-8b", 4096, 14336, 32, 8, 128, 500000.0),
    Model("llama-3-70b-tp4", 8192, 28672 // 4, 64 // 4, 8 // 4, 128, 500000.0),
    Model("llama-3-70b-tp8", 8192, 28672 // 8, 64 // 8, 8 // 8, 128, 500000.0),
    Model("qwen2.5-7b", 3584, 18944, 28, 4, 128, 1000000.0),
    Model("mixtral-8x7b", 4096, 14336, 32, 8, 128, 1000000.0),
    Model("smollm2-135m", 576, 1536, 9, 3, 64, 100000.0),
)
TOKENS: tuple[int, ...] = tuple(2**i for i in range(14))  # 1 .. 8192: one per token bucket
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_POSITION = 8192


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

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


# ------------------------------------------------------------------ the ops
# Per op: its shapes in a model; and for one call its tensors, a launcher, the bytes it
# moves and its kernel's key values.

Run = Callable[[dict[str, int] | None], Any]
Built = tuple[dict[str, torch.Tensor], Run, int, dict[str, Any]]


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


OPS: dict[
    str, tuple[Callable[[Model], list[dict[str, Any]]], Callable[[Maker, dict[str, Any], int], Built]]
] = {
    "rms_norm": (_rms_norm_shapes, _rms_norm_build),
    "silu_and_mul": (_silu_and_mul_shapes, _silu_and_mul_build),
    "rotary_embedding": (_rotary_embedding_shapes, _rotary_embedding_build),
}


def _op(
    op: str,
) -> tuple[Callable[[Model], list[dict[str, Any]]], Callable[[Maker, dict[str, Any], int], Built]]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the pack's ops are {', '.join(OPS)}")
    return OPS[op]


# ------------------------------------------------------------------ plans


def shapes(op: str, models: Sequence[Model] = MODELS) -> dict[tuple[tuple[str, Any], ...], list[str]]:
    """The distinct shapes of ``op`` over ``models`` -> the models that have each."""
    out: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for m in models:
        for shape in _op(op)[0](m):
            out.setdefault(tuple(shape.items()), []).append(m.name)
    return out


def workload(
    op: str, shape: dict[str, Any], tokens: int, dtype: torch.dtype, device: Any, seed: int = 0
) -> Workload:
    """``op`` on fresh inputs of ``shape`` with ``tokens`` tokens (seeded), on ``device``."""
    make = Maker(dtype, device, torch.Generator(device="cpu").manual_seed(seed))
    tensors, run, moved, key = _op(op)[1](make, shape, tokens)
    return Workload(op, dict(shape), tokens, dtype, tensors, run, moved, key)


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
    tokens: Sequence[int] = TOKENS,
    dtypes: Sequence[torch.dtype] = (torch.bfloat16,),
) -> list[Planned]:
    """Every (op, shape, dtype, token count) over ``models``, in that nesting order."""
    return [
        Planned(op, shape, n, dtype, tuple(names))
        for op in ops
        for shape, names in shapes(op, models).items()
        for dtype in dtypes
        for n in tokens
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
