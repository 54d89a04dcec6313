"""``search``: run a strategy against a measuring function under a budget.

>>> table = {0: 3.0, 1: 1.5, 2: math.inf, 3: 2.0}
>>> result = search([{"B": b} for b in (16, 32, 64, 128)],
...                 lambda batch: {i: table[i] for i in batch}, strategy="exhaustive")
>>> result.best, result.best_ms, result.measured
(1, 1.5, (0, 1, 2, 3))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._optional import available
from ._base import Strategy, clean_ms, make_strategy

__all__ = ["SMALL_SPACE", "Budget", "SearchResult", "choose_strategy", "search"]

# Below this many candidates measuring all of them is cheap enough (Triton's own autotuner
# does it for every config list) and the only way to be sure of the best.
SMALL_SPACE = 64


@dataclass(frozen=True)
class Budget:
    """How much a search may spend.

    ``max_configs`` counts every candidate with a result for this key, *including* the
    ``known`` ones but those ``search`` is told are ``uncounted`` (never chosen by a search):
    a killed run resumed with the same budget ends where the uninterrupted run would have.
    ``max_seconds`` is wall time of this call, checked between batches, after the first (a
    time budget never means no measurement). None is unlimited.

    >>> Budget(max_configs=200).max_seconds is None
    True
    >>> Budget(max_configs=2.5)
    Traceback (most recent call last):
    ...
    ValueError: Budget.max_configs must be a positive integer or None; found 2.5
    """

    max_configs: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        # As autotune()'s max_configs= and max_seconds= (_options.py): NaN compares false with
        # everything, so a check of "< 0" let it through as an unlimited budget.
        configs, seconds = self.max_configs, self.max_seconds
        if configs is not None and not (
            isinstance(configs, int) and not isinstance(configs, bool) and configs > 0
        ):
            raise ValueError(f"Budget.max_configs must be a positive integer or None; found {configs!r}")
        number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if seconds is not None and not (number and seconds > 0):
            raise ValueError(
                f"Budget.max_seconds must be a positive number of seconds or None; found {seconds!r}"
            )

    @property
    def unlimited(self) -> bool:
        return self.max_configs is None and self.max_seconds is None


@dataclass(frozen=True)
class SearchResult:
    """What a search did.

    ``measured``: indices measured by this call, in order. ``timings``: every result, known
    and new (inf for failures). ``best``/``best_ms``: the fastest successful candidate (None /
    inf if none ran). ``trace[k]``: best ms after the k-th measurement of this call.
    ``stopped``: why it ended — "exhausted" (every candidate has a result), "max_configs",
    "max_seconds" or "converged" (the strategy had nothing more to propose).
    """

    strategy: str
    measured: tuple[int, ...]
    timings: dict[int, float]
    best: int | None
    best_ms: float
    trace: tuple[float, ...]
    stopped: str


def _optuna_installed() -> bool:
    return available("optuna")


def choose_strategy(n_candidates: int, budget: Budget = Budget(), hints: Sequence[int] = ()) -> str:
    """The rule behind ``strategy="auto"``, first match wins:

    1. at most ``SMALL_SPACE`` (64) candidates -> "exhaustive";
    2. hints given -> "neighbors" (it stops by itself at a local optimum);
    3. no budget at all, or ``max_configs`` covers every candidate -> "exhaustive";
    4. Optuna installed -> "bayes";
    5. otherwise -> "random".

    >>> choose_strategy(48), choose_strategy(5000, hints=[7]), choose_strategy(5000)
    ('exhaustive', 'neighbors', 'exhaustive')
    """
    if n_candidates <= SMALL_SPACE:
        return "exhaustive"
    if hints:
        return "neighbors"
    if budget.unlimited or (budget.max_configs is not None and budget.max_configs >= n_candidates):
        return "exhaustive"
    return "bayes" if _optuna_installed() else "random"


def search(
    candidates: Sequence[Mapping[str, Any]],
    measure: Callable[[list[int]], Mapping[int, float]],
    *,
    strategy: str = "auto",
    budget: Budget = Budget(),
    known: Mapping[int, float] | None = None,
    hints: Sequence[int] = (),
    seed: int = 0,
    on_progress: Callable[[int, int, float], None] | None = None,
    batch_size: int = 8,
    clock: Callable[[], float] = time.monotonic,
    uncounted: Collection[int] = (),
) -> SearchResult:
    """Measure candidates chosen by ``strategy`` until the budget or the strategy ends.

    ``measure(batch)`` times a list of candidate indices and returns ``{index: ms}``; an index
    it leaves out, or gives None / nan / inf, counts as a failure and is never retried.
    Exceptions from ``measure`` propagate: whatever it persisted before raising comes back as
    ``known`` next time, and the search resumes without re-measuring it. ``on_progress(done,
    total, best_ms)`` is called after every batch (``done`` includes known results).
    ``uncounted``: known results that ``budget.max_configs`` does not count (failures found
    outside the search, by check='s reference search), though they are never measured again.
    """
    if batch_size < 1:
        raise ValueError(f"search: batch_size must be >= 1; found {batch_size}")
    n = len(candidates)
    results: dict[int, float] = {}
    for i, ms in (known or {}).items():
        if not (isinstance(i, int) and 0 <= i < n):
            raise IndexError(f"search: known result for {i!r}, which is not an index into the {n} candidates")
        results[i] = clean_ms(ms)
    name = choose_strategy(n, budget, hints) if strategy == "auto" else strategy
    strat: Strategy = make_strategy(name, candidates, seed=seed, hints=hints)
    for i in sorted(results):
        strat.tell(i, results[i])

    free = sum(1 for i in set(uncounted) if i in results)
    cap = n if budget.max_configs is None else min(n, budget.max_configs + free)
    start = clock()
    measured: list[int] = []
    trace: list[float] = []
    best_ms = min(results.values(), default=math.inf)
    stopped: str
    while len(results) < cap:
        # The clock is read from the second batch on: a budget smaller than the time between two
        # reads of it stopped every search before its first batch, and the key was never tuned.
        if budget.max_seconds is not None and measured and clock() - start >= budget.max_seconds:
            stopped = "max_seconds"
            break
        batch = strat.ask(min(batch_size, cap - len(results)))
        if not batch:
            stopped = "converged"
            break
        timings = measure(list(batch))
        for i in batch:
            ms = clean_ms(timings.get(i))
            results[i] = ms
            strat.tell(i, ms)
            measured.append(i)
            best_ms = min(best_ms, ms)
            trace.append(best_ms)
        if on_progress is not None:
            on_progress(len(results), cap, best_ms)
    else:
        stopped = "exhausted" if len(results) >= n else "max_configs"

    finite = [(ms, i) for i, ms in results.items() if math.isfinite(ms)]
    best = min(finite)[1] if finite else None
    return SearchResult(
        strategy=name,
        measured=tuple(measured),
        timings=results,
        best=best,
        best_ms=results[best] if best is not None else math.inf,
        trace=tuple(trace),
        stopped=stopped,
    )
