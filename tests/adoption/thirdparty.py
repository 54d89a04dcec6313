"""Kernels written the way third-party libraries write them (fla-core, Liger-Kernel, gemlite,
vLLM, FlagGems), for the tests of ``tunebook.patch()``.

Imported before or after the patch, by the tests and by run_ops.py (``thirdparty``). It binds
``autotune`` at import (``from triton import autotune``), and uses every option those
libraries use: ``prune_configs_by`` (an ``early_config_prune`` that builds new Config
objects on every call, a ``perf_model`` with ``top_k``), ``triton.heuristics`` above and
below, a key of seven names, keyword launches, ``reset_to_zero``, ``restore_value``,
configs with a ``pre_hook``, ``use_cuda_graph``, and ``cache_results`` where Triton has it.
It subclasses Triton's Autotuner four ways: ``run`` overridden and calling ``super().run``
(as fla-core's ``CachedAutotuner``, with a cache write before it), ``prune_configs``
overridden, and two that tunebook cannot serve: ``run`` overridden without calling
``Autotuner.run`` and ``_bench`` overridden. Those two time configs with ``do_bench=``
(Triton's own timer needs a GPU), as does ``plain_triton`` in unpatched runs.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import hostclock
import torch
import triton
import triton.language as tl
from triton import autotune
from triton.runtime.autotuner import Autotuner

# fla-core's probe (and its variable): pass cache_results only where triton.autotune takes it
CACHE_KWARGS = (
    {"cache_results": os.environ.get("FLA_CACHE_RESULTS", "1") == "1"}
    if "cache_results" in inspect.signature(autotune).parameters
    else {}
)


timed = [0]  # configs timed by host_clock: by Triton's path, never tunebook's
host_clock = hostclock.host_clock(timed)


@triton.jit
def _scale_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _blocks(*blocks: int, **options: Any) -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, **options) for b in blocks]


def _fresh_configs(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """A pruner that builds new Config objects on every call (gemlite does)."""
    n = named_args["n"]
    return [
        triton.Config(dict(c.kwargs), num_warps=c.num_warps)
        for c in configs
        if c.kwargs["BLOCK"] <= max(n, 32)
    ]


pruned = autotune(
    configs=_blocks(32, 64, 128, 256),
    key=["n"],
    prune_configs_by={"early_config_prune": _fresh_configs},
    **CACHE_KWARGS,
)(_scale_add)

modelled = autotune(
    configs=_blocks(32, 64, 128),
    key=["n"],
    prune_configs_by={"perf_model": lambda n, BLOCK, **kw: abs(BLOCK - 64), "top_k": 2},
    use_cuda_graph=True,  # vLLM's style; tunebook times with the interpreter's clock here
)(_scale_add)


@triton.jit
def _wide_key(
    x_ptr, out_ptr, n, a, b, c, d, e, f, BLOCK: tl.constexpr, SCALE: tl.constexpr, SHIFT: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * SCALE + SHIFT + a + b + c + d + e + f, mask=mask)


# heuristics above (SHIFT) and below (SCALE), a key of seven names, called with keywords
wide = triton.heuristics({"SHIFT": lambda args: 1.0})(
    autotune(configs=_blocks(32, 64, 128), key=["n", "a", "b", "c", "d", "e", "f"])(
        triton.heuristics({"SCALE": lambda args: 2.0})(_wide_key)
    )
)


@triton.jit
def _accumulate(x_ptr, acc_ptr, total_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=mask) + x, mask=mask)
    tl.atomic_add(total_ptr, tl.sum(x, axis=0))


_hooked: list[int] = []


def _note_block(nargs: dict[str, Any]) -> None:
    _hooked.append(nargs["BLOCK"])


# in-place outputs: restored and zeroed between timed runs; configs with their own pre_hook
accumulate = autotune(
    configs=[triton.Config({"BLOCK": b}, pre_hook=_note_block) for b in (32, 64, 128)],
    key=["n"],
    reset_to_zero=["total_ptr"],
    restore_value=["acc_ptr"],
)(_accumulate)

# decorated by name through the module attribute, as most libraries do
plain = triton.autotune(configs=_blocks(32, 64, 128), key=["n"])(_scale_add)


class CachedLike(Autotuner):
    """Overrides run and calls super().run, writing the cache first when asked (fla-core)."""

    preset: dict[Any, Any] = {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        for key, config in self.preset.items():
            self.cache[key] = config
        self.calls = getattr(self, "calls", 0) + 1
        return super().run(*args, **kwargs)


class PrunesItself(Autotuner):
    """Overrides prune_configs (reads self.nargs, as Triton's does)."""

    def prune_configs(self, kwargs: dict[str, Any], configs: Any = None) -> list[Any]:
        n = self.nargs["n"]
        return [c for c in self.configs if c.kwargs["BLOCK"] <= max(n, 64)]


class OwnRun(Autotuner):
    """Overrides run without calling Autotuner.run: tunes with Triton's _bench its own way."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.nargs = dict(zip(self.arg_names, args))
        key = tuple(args[self.arg_names.index(k)] for k in self.keys)
        if key not in self.cache:
            timings = {c: self._bench(*args, config=c, **kwargs) for c in self.configs}
            self.cache[key] = min(timings, key=timings.get)
        self.best_config = self.cache[key]
        return self.fn.run(*args, **kwargs, **self.best_config.all_kwargs())


class OwnBench(Autotuner):
    """Overrides _bench (a library's own timing step)."""

    def _bench(self, *args: Any, config: Any, **meta: Any) -> list[float]:
        self.benched = getattr(self, "benched", 0) + 1
        return super()._bench(*args, config=config, **meta)


def _subclass(cls: type, **options: Any) -> Any:
    return cls(_scale_add, _scale_add.arg_names, _blocks(32, 64, 128), ["n"], None, None, **options)


cached_like = _subclass(CachedLike)
prunes_itself = _subclass(PrunesItself)
own_run = _subclass(OwnRun, do_bench=host_clock)
own_bench = _subclass(OwnBench, do_bench=host_clock)


def ops() -> dict[str, Any]:
    """Each kernel's outputs for one set of arguments (the same in every process)."""
    g = torch.Generator().manual_seed(0)
    n = 200
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def scale_add(kernel: Any) -> torch.Tensor:
        out = torch.empty(n)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n, 0.5)
        return out

    def wide_call() -> torch.Tensor:
        out = torch.empty(n)
        wide[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            x_ptr=x, out_ptr=out, n=n, a=1.0, b=2.0, c=3.0, d=4.0, e=5.0, f=6.0
        )
        return out

    def accumulate_call() -> tuple[torch.Tensor, torch.Tensor]:
        acc, total = torch.ones(n), torch.zeros(1)
        accumulate[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, acc, total, n)
        return acc, total

    return {
        "pruned": scale_add(pruned),
        "modelled": scale_add(modelled),
        "wide": wide_call(),
        "accumulate": accumulate_call(),
        "plain": scale_add(plain),
        "cached_like": scale_add(cached_like),
        "prunes_itself": scale_add(prunes_itself),
        "own_run": scale_add(own_run),
        "own_bench": scale_add(own_bench),
    }


def new_key() -> Any:
    """A key no process has seen, on a kernel decorated by Triton's own decorator."""
    out = torch.empty(300)
    x = torch.randn(300)
    cached_like[lambda meta: (triton.cdiv(300, meta["BLOCK"]),)](x, x, out, 300, 0.5)
    return out
