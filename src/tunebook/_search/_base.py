"""The ask/tell contract every strategy keeps, and the registry that names them.

A strategy decides *which candidate to measure next*; it never measures. The driver
(:func:`tunebook._search.search`) asks for a batch of candidate indices, measures them, and
tells each timing back. The contract, which the shared test suite checks for every strategy:

* ``ask(n)`` returns at most ``n`` distinct indices into the candidate list, none of them
  already told and none still pending (asked, not yet told); ``[]`` means "nothing more to
  propose" and ends the search.
* ``tell(index, ms)`` records a timing in milliseconds; ``math.inf`` marks a failed config
  (it failed to compile, ran out of resources, crashed). A told index is never proposed
  again, so failures are never retried. Telling an index twice is an error.
* Results already known (from the book, or from an earlier run that was killed) are told
  before the first ask; the strategy treats them exactly like its own measurements.
* Hints (candidate indices that won elsewhere: the nearest remembered key, another
  platform) are proposed before anything else, by every strategy.

Strategies are not thread-safe; one driver owns one strategy. Register a new one with
:func:`register_strategy` and it becomes available to ``search(strategy=name)``.

>>> s = make_strategy("exhaustive", [{"B": 16}, {"B": 32}, {"B": 64}], hints=[2])
>>> s.ask(2)
[2, 0]
>>> s.tell(2, 0.5); s.tell(0, math.inf); s.ask(5)
[1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

__all__ = ["Strategy", "make_strategy", "register_strategy", "strategy_names"]


def clean_ms(ms: Any) -> float:
    """A timing as strategies see it: a non-negative float, or inf for anything unusable."""
    try:
        value = float(ms)
    except (TypeError, ValueError):
        return math.inf
    return value if value >= 0 and not math.isnan(value) else math.inf


class Strategy:
    """Base of all strategies: bookkeeping, hints first, validation. Subclasses write
    ``_propose(n)`` (fresh indices, in preference order) and may hook ``_observe``."""

    name: ClassVar[str] = ""

    def __init__(
        self, candidates: Sequence[Mapping[str, Any]], *, seed: int = 0, hints: Sequence[int] = ()
    ) -> None:
        self.candidates = candidates
        self.seed = seed
        bad = [h for h in hints if not isinstance(h, int) or not 0 <= h < len(candidates)]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: hints must be indices into the {len(candidates)} candidates; "
                f"found {bad[:5]}. Map remembered configs to candidate indices first."
            )
        self.hints: tuple[int, ...] = tuple(dict.fromkeys(hints))
        self.results: dict[int, float] = {}
        self.pending: set[int] = set()

    def __len__(self) -> int:
        return len(self.candidates)

    def fresh(self, index: int) -> bool:
        """Neither told nor pending: free to propose."""
        return index not in self.results and index not in self.pending

    @property
    def best(self) -> int | None:
        """The fastest successful index told so far (lowest index on ties), or None."""
        finite = [(ms, i) for i, ms in self.results.items() if math.isfinite(ms)]
        return min(finite)[1] if finite else None

    def ask(self, n: int) -> list[int]:
        if n <= 0:
            return []
        picks = [h for h in self.hints if self.fresh(h)][:n]
        self.pending.update(picks)
        if len(picks) < n:
            more = self._propose(n - len(picks))
            for i in more:
                if not (isinstance(i, int) and 0 <= i < len(self.candidates)) or not self.fresh(i):
                    raise RuntimeError(f"strategy {self.name!r} proposed {i!r}, not a fresh index (a bug)")
                self.pending.add(i)
            picks.extend(more)
        return picks

    def tell(self, index: int, ms: float) -> None:
        if not (isinstance(index, int) and 0 <= index < len(self.candidates)):
            raise IndexError(f"tell: {index!r} is not an index into the {len(self.candidates)} candidates")
        if index in self.results:
            raise ValueError(f"tell: candidate {index} was already told ({self.results[index]} ms)")
        value = clean_ms(ms)
        self.results[index] = value
        self.pending.discard(index)
        self._observe(index, value)

    def _propose(self, n: int) -> list[int]:
        raise NotImplementedError

    def _observe(self, index: int, ms: float) -> None:
        """Hook: a result arrived (measured now, or known beforehand)."""


_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: make ``cls`` available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_strategy(
    name: str, candidates: Sequence[Mapping[str, Any]], *, seed: int = 0, hints: Sequence[int] = ()
) -> Strategy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; registered: {', '.join(strategy_names())} (or 'auto')"
        ) from None
    return cls(candidates, seed=seed, hints=hints)
