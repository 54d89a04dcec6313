"""How a candidate config is timed.

Every timer has Triton's benchmarker signature, ``timer(kernel_call, quantiles) ->
[median, p20, p80]`` in milliseconds, and an id that becomes part of the platform
fingerprint: timings taken by different methods are not compared with each other.

* ``events``      — the backend's ``do_bench`` (GPU events, L2 flushed between runs).
* ``cuda-graph``  — ``do_bench_cudagraph``: launch overhead removed.
* ``wallclock``   — the CPU interpreter, where no GPU timer exists.
* ``custom:<name>`` — a user ``do_bench=`` callable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import _compat

QUANTILES = (0.5, 0.2, 0.8)

Timer = Callable[..., Any]


def wallclock_bench(
    kernel_call: Callable[[], Any],
    quantiles: Sequence[float] | None = QUANTILES,
    *,
    min_reps: int = 3,
    max_reps: int = 10,
    budget_s: float = 0.2,
) -> list[float]:
    """Time ``kernel_call`` on the host clock: one warm-up, then at least ``min_reps`` runs."""
    kernel_call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times, quantiles or QUANTILES)


def _quantiles(times: list[float], quantiles: Sequence[float]) -> list[float]:
    ordered = sorted(times)
    if len(ordered) == 1:
        return [ordered[0]] * len(quantiles)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    out = []
    for q in quantiles:
        idx = min(max(round(q * 100) - 1, 0), len(cuts) - 1)
        out.append(statistics.median(ordered) if q == 0.5 else cuts[idx])
    return out


def as_triple(value: Any) -> tuple[float, float, float]:
    """A benchmarker's answer (a float or a list of quantiles) as (median, p20, p80)."""
    if isinstance(value, int | float):
        v = float(value)
        return (v, v, v)
    values = [float(v) for v in value]
    if len(values) >= 3:
        return (values[0], values[1], values[2])
    return (values[0], values[0], values[0])


def choose_timer(
    do_bench: Timer | None, warmup: int | None, rep: int | None, use_cuda_graph: bool
) -> tuple[Callable[[], Timer], str]:
    """(a factory for the timer, the timer's id). The factory defers touching the GPU driver."""
    if do_bench is not None:
        name = getattr(do_bench, "__qualname__", type(do_bench).__name__)
        return (lambda: do_bench), f"custom:{name}"
    if _compat.interpreting():
        return (lambda: wallclock_bench), "wallclock"
    if use_cuda_graph:
        return (lambda: _compat.cudagraph_benchmarker(rep)), "cuda-graph"
    if warmup is not None or rep is not None:
        return (lambda: _compat.timed_benchmarker(warmup, rep)), "events"
    return _compat.default_benchmarker, "events"
