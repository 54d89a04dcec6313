"""The shapes the pack is tuned and benchmarked on: the ops of a few common LLMs, per GPU
(after tensor parallelism), over serving token counts.

``plan(...)`` lists every (op, shape, dtype, token count); each builds a :class:`Workload`:
the op's inputs and preallocated outputs on a device, a ``run(config)`` that launches it
(the tuned config when ``config`` is None), and the bytes it must move at the least.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .rms_norm import _rms_norm
from .rotary_embedding import _rotary_embedding, cos_sin_cache
from .silu_and_mul import _silu_and_mul

OPS = ("rms_norm", "silu_and_mul", "rotary_embedding")


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


def shapes(op: str, models: Sequence[Model] = MODELS) -> dict[tuple[tuple[str, Any], ...], list[str]]:
    """The distinct shapes of ``op`` over ``models`` -> the models that have each."""
    out: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for m in models:
        if op == "rms_norm":
            found = [(("hidden", m.hidden), ("residual", r)) for r in (False, True)]
        elif op == "silu_and_mul":
            found = [(("d", m.intermediate),)]
        elif op == "rotary_embedding":
            found = [(("n_q", m.n_q_heads), ("n_kv", m.n_kv_heads), ("head_size", m.head_size))]
        else:
            raise ValueError(f"unknown op {op!r}; the pack's ops are {', '.join(OPS)}")
        for shape in found:
            out.setdefault(shape, []).append(m.name)
    return out


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


def workload(
    op: str, shape: dict[str, Any], tokens: int, dtype: torch.dtype, device: Any, seed: int = 0
) -> Workload:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(dtype=dt, device=device)

    e = torch.empty((), dtype=dtype).element_size()
    if op == "rms_norm":
        n, fused = shape["hidden"], shape["residual"]
        t = {
            "x": randn(tokens, n),
            "weight": randn(n),
            "out": torch.empty(tokens, n, dtype=dtype, device=device),
        }
        if fused:
            t["residual"], t["residual_out"] = randn(tokens, n), torch.empty_like(t["out"])

        def run(config: dict[str, int] | None) -> Any:
            return _rms_norm(
                t["x"], t["weight"], 1e-6, t.get("residual"), t["out"], t.get("residual_out"), config
            )

        moved = (4 if fused else 2) * tokens * n * e + n * e
        key = {"n_rows": tokens, "N": n, "HAS_RESIDUAL": fused}
    elif op == "silu_and_mul":
        d = shape["d"]
        t = {"x": randn(tokens, 2 * d), "out": torch.empty(tokens, d, dtype=dtype, device=device)}

        def run(config: dict[str, int] | None) -> Any:
            return _silu_and_mul(t["x"], t["out"], config)

        moved = 3 * tokens * d * e
        key = {"n_rows": tokens, "D": d}
    elif op == "rotary_embedding":
        n_q, n_kv, hs = shape["n_q"], shape["n_kv"], shape["head_size"]
        t = {
            "q": randn(tokens, n_q * hs),
            "k": randn(tokens, n_kv * hs),
            "positions": torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device),
            "cos_sin_cache": cos_sin_cache(hs, MAX_POSITION, dtype=dtype, device=device),
            "q_out": torch.empty(tokens, n_q * hs, dtype=dtype, device=device),
            "k_out": torch.empty(tokens, n_kv * hs, dtype=dtype, device=device),
        }

        def run(config: dict[str, int] | None) -> Any:
            out = (t["q_out"], t["k_out"])
            return _rotary_embedding(
                t["q"], t["k"], t["positions"], t["cos_sin_cache"], "neox", None, hs, out, config
            )

        # q and k read and written, each token's position and cos/sin row read once
        moved = 2 * tokens * (n_q + n_kv) * hs * e + tokens * (8 + hs * e)
        key = {"n_tokens": tokens, "NQ": n_q, "NK": n_kv, "HEAD_SIZE": hs, "ROTARY_DIM": hs, "IS_NEOX": True}
    else:
        raise ValueError(f"unknown op {op!r}; the pack's ops are {', '.join(OPS)}")
    return Workload(op, dict(shape), tokens, dtype, t, run, moved, key)


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
    ops: Sequence[str] = OPS,
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
