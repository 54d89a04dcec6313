"""How a candidate config is timed.

Every timer has Triton's benchmarker signature, ``timer(kernel_call, quantiles) ->
[median, p20, p80]`` in milliseconds, and an id that becomes part of the platform
fingerprint: timings taken by different methods are not compared with each other.

* ``events``      — the backend's ``do_bench`` (GPU events, L2 flushed between runs).
* ``cuda-graph``  — ``do_bench_cudagraph``: launch overhead removed.
* ``wallclock``   — the CPU interpreter, where no GPU timer exists.
* ``custom:<name>`` — a user ``do_bench=`` callable (never adaptive: it decides alone), named
  by what it is (:func:`custom_name`): two different timers never share a page.
* ``<timer>-interleaved`` — with ``TUNEBOOK_TIMER=short``, the contenders of short kernels
  are measured by the short-kernel policy (``_short.py``); the others as by ``<timer>``.

Triton's default ``do_bench`` flushes the L2 cache between runs; so do the quick timers.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import _compat, _settings
from ._short import ShortPolicy, policy_from_settings

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


# Adaptive benchmarking: every candidate gets a short screening measurement; only the
# contenders are measured in full. Milliseconds of warm-up and of timed repetitions.
QUICK_MS = (2, 10)
FULL_MS = (25, 100)


@dataclass(frozen=True)
class Timers:
    """A quick and a full timer of one method; ``adaptive`` is False when they are the same."""

    quick: Timer
    full: Timer
    id: str
    adaptive: bool
    short: ShortPolicy | None = None  # the short-kernel policy for the contenders (opt-in)


def choose_timers(
    do_bench: Timer | None, warmup: int | None, rep: int | None, use_cuda_graph: bool, adaptive: bool = True
) -> tuple[Callable[[], Timers], str]:
    """(a factory for the timers, their id). The factory defers touching the GPU driver.

    With ``TUNEBOOK_TIMER=short`` (never for a user ``do_bench``, which decides alone) the
    timers carry the short-kernel policy and their id says so. As in ``triton.autotune``,
    ``warmup``, ``rep`` or ``use_cuda_graph`` take the place of a ``do_bench`` given with them.

    >>> choose_timers(lambda call, quantiles: [1.0], None, None, False)[1].startswith('custom:')
    True
    >>> choose_timers(lambda call, quantiles: [1.0], 5, None, False)[1].startswith('custom:')
    False
    """
    if warmup is not None or rep is not None or use_cuda_graph:
        do_bench = None
    make, timer_id = _method_timers(do_bench, warmup, rep, use_cuda_graph, adaptive)
    if do_bench is not None or _settings.timer() != "short":
        return make, timer_id
    policy = policy_from_settings(_compat.interpreting())
    return (lambda: replace(make(), short=policy)), policy.timer_id(timer_id)


def _method_timers(
    do_bench: Timer | None, warmup: int | None, rep: int | None, use_cuda_graph: bool, adaptive: bool
) -> tuple[Callable[[], Timers], str]:
    if do_bench is not None:
        timer_id = f"custom:{custom_name(do_bench)}"
        return (lambda: Timers(do_bench, do_bench, timer_id, False)), timer_id
    if _compat.interpreting():

        def quick(kernel_call: Callable[[], Any], quantiles: Any = QUANTILES) -> list[float]:
            return wallclock_bench(kernel_call, quantiles, min_reps=1, max_reps=2, budget_s=0.02)

        return (
            lambda: Timers(quick if adaptive else wallclock_bench, wallclock_bench, "wallclock", adaptive)
        ), ("wallclock")
    full_warmup = warmup if warmup is not None else FULL_MS[0]
    full_rep = rep if rep is not None else FULL_MS[1]
    quick_warmup, quick_rep = min(QUICK_MS[0], full_warmup), min(QUICK_MS[1], full_rep)
    if use_cuda_graph:

        def make_graph() -> Timers:
            full = _compat.cudagraph_benchmarker(full_rep)
            return Timers(
                _compat.cudagraph_benchmarker(quick_rep) if adaptive else full, full, "cuda-graph", adaptive
            )

        return make_graph, "cuda-graph"

    def make_events() -> Timers:
        full = _compat.timed_benchmarker(full_warmup, full_rep)
        quick = _compat.timed_benchmarker(quick_warmup, quick_rep) if adaptive else full
        return Timers(quick, full, "events", adaptive)

    return make_events, "events"


def custom_name(timer: Any) -> str:
    """What a user's ``do_bench`` is, for its timer id (``custom:<name>``).

    A named function or method, nested ones included, keeps the name it always had (its
    ``__qualname__``), and a callable object its class's name, so existing books still
    match. A lambda is ``<lambda>`` (its qualified name) and a hash of its own code (bytecode,
    constants, names: not the statement around it, nor its module, which differs between a
    file run as ``__main__`` and the same file imported). A ``functools.partial`` is named by
    its function and a hash of its arguments, written without memory addresses: every
    partial was ``partial`` and every lambda ``<lambda>``, so two different timers shared
    one page.

    >>> import functools, math
    >>> custom_name(math.isclose)
    'isclose'
    >>> custom_name(functools.partial(math.isclose, rel_tol=0.1)).startswith("partial(isclose)#")
    True
    >>> custom_name(functools.partial(math.isclose, rel_tol=0.1)) != custom_name(
    ...     functools.partial(math.isclose, rel_tol=0.2))
    True
    >>> custom_name(lambda f, quantiles=None: 1.0) == custom_name(lambda f, quantiles=None: 1.0)
    True
    """
    if isinstance(timer, functools.partial):
        arguments = f"{_stable(timer.args)};{_stable(dict(timer.keywords))}"
        return f"partial({custom_name(timer.func)})#{_short_hash(arguments)}"
    qualname = getattr(timer, "__qualname__", None)
    code = getattr(timer, "__code__", None)
    if isinstance(qualname, str) and inspect.iscode(code) and qualname.endswith("<lambda>"):
        return f"{qualname}#{_short_hash(_code_text(code))}"
    return qualname if isinstance(qualname, str) else type(timer).__name__


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:8]


def _code_text(code: Any) -> str:
    """A function's own code as text: its bytecode, names and constants (a nested function's
    or lambda's code among them, the same way), with no line numbers or file."""
    consts = [_code_text(c) if inspect.iscode(c) else _stable(c) for c in code.co_consts]
    return f"{code.co_code.hex()}{code.co_names}{code.co_varnames}[{','.join(consts)}]"


# A memory address in a repr (``<... at 0x7f...>``, ``cuda_stream=0x55d1...``): another in
# every process, so it is left out of a timer's id.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _stable(value: Any) -> str:
    """``value`` as text that is the same in every process (no addresses): what a partial's
    arguments contribute to its timer's id."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ",".join(_stable(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if callable(value):
        return custom_name(value)
    return _ADDRESS.sub("0x", repr(value))
