"""Process-wide counters behind :func:`tunebook.stats`.

The hit path only bumps an int on its own autotuner (the cheapest thing Python can do);
``stats()`` adds them up over the live autotuners.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ._forksafe import renew_lock

# Reentrant: a finalizer (_retire) can run inside any allocation, by garbage collection,
# including one made while this thread already holds the lock.
_lock = threading.RLock()
renew_lock(globals(), "_lock", threading.RLock)
_totals = {
    "misses": 0,
    "benchmarked": 0,
    "failures": 0,
    "tuning_seconds": 0.0,
    "book_hits": 0,
    "compile_seconds": 0.0,
    "group_wait_seconds": 0.0,
    "table_answers": 0,
    "upgrade_answers": 0,
    "same_arch_answers": 0,
}
_SECONDS = ("tuning_seconds", "compile_seconds", "group_wait_seconds")
_counters: weakref.WeakSet[Counters] = weakref.WeakSet()
_retired_hits = 0
_retired_fallbacks = 0


class Counters:
    """One autotuner's hit and fallback counts. Each is a one-element list, so that the hit
    path bumps ``counter[0]`` on a list it already holds (see _hits.Hit)."""

    __slots__ = ("__weakref__", "fallbacks", "hits")

    def __init__(self) -> None:
        self.hits = [0]
        self.fallbacks = [0]


def register(owner: Any) -> Counters:
    """Counters for ``owner`` (an autotuner), added to :func:`stats` while it lives and after."""
    counters = Counters()
    weakref.finalize(owner, _retire, counters.hits, counters.fallbacks)
    with _lock:
        _counters.add(counters)
    return counters


def _retire(hits: list[int], fallbacks: list[int]) -> None:
    global _retired_hits, _retired_fallbacks
    with _lock:
        _retired_hits += hits[0]
        _retired_fallbacks += fallbacks[0]


def add(name: str, amount: float = 1) -> None:
    with _lock:
        _totals[name] += amount


def take_back(name: str) -> None:
    """Undo one ``add(name)``, never below zero (it may predate a ``reset_stats()``)."""
    with _lock:
        _totals[name] = max(0, _totals[name] - 1)


def stats() -> dict[str, float]:
    """Counters for this process.

    * ``hits`` — calls answered by a config measured for their key (in memory or in the book).
    * ``misses`` — keys the book could not fully answer when first seen.
    * ``benchmarked`` — configs timed in this process.
    * ``fallbacks`` — calls served in ``serve`` mode with a config not measured for their key.
    * ``failures`` — configs that failed to compile or run while tuning (recorded, never retried).
    * ``tuning_seconds`` — wall time spent benchmarking.
    * ``book_hits`` — keys answered from the book without benchmarking.
    * ``compile_seconds`` — of the tuning time, spent compiling candidates ahead of measuring
      them (GPU; the rest is measuring and, in a group, waiting). Stays 0 on Triton 3.4,
      which has no asynchronous compile: there each candidate compiles inside its measuring.
    * ``group_wait_seconds`` — of the tuning time, spent waiting for other ranks of the
      group a key was tuned in (``group=``): for them to arrive, to measure their part of a
      batch, or to deal the next one.
    * ``table_answers`` — keys served in ``serve`` mode by an imported table of this GPU
      (``tables=``); each is also a miss, and its calls fallbacks.
    * ``upgrade_answers`` — keys served in ``serve`` mode by their winner on this GPU under
      another Triton release or runtime (the page of this one lacks them: an upgrade not yet
      re-tuned); each is also a miss, and its calls fallbacks.
    * ``same_arch_answers`` — keys served in ``serve`` mode by their winner on another GPU of
      this architecture and Triton release (a book shipped for an H200, served on an H100),
      where nothing of this GPU answers; each is also a miss, and its calls fallbacks.

    >>> import tunebook
    >>> sorted(tunebook.stats())  # doctest: +NORMALIZE_WHITESPACE
    ['benchmarked', 'book_hits', 'compile_seconds', 'failures', 'fallbacks', 'group_wait_seconds',
     'hits', 'misses', 'same_arch_answers', 'table_answers', 'tuning_seconds', 'upgrade_answers']
    """
    with _lock:
        live = list(_counters)
        hits = _retired_hits + sum(c.hits[0] for c in live)
        fallbacks = _retired_fallbacks + sum(c.fallbacks[0] for c in live)
        return {**_totals, "hits": hits, "fallbacks": fallbacks}


def reset() -> None:
    """Zero every counter (tests and benchmarks call this between phases)."""
    global _retired_hits, _retired_fallbacks
    with _lock:
        for k in _totals:
            _totals[k] = 0.0 if k in _SECONDS else 0
        _retired_hits = _retired_fallbacks = 0
        for c in list(_counters):
            c.hits[0] = 0
            c.fallbacks[0] = 0
