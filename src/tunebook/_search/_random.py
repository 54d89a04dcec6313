"""``random``: a seeded permutation of the candidates, walked in order.

The same seed gives the same order, so an interrupted run resumed with its results as
``known`` measures exactly what the uninterrupted run would have; told indices are skipped,
so nothing is measured twice.

>>> from tunebook._search import make_strategy
>>> a = make_strategy("random", [{"B": b} for b in range(10)], seed=3).ask(4)
>>> a == make_strategy("random", [{"B": b} for b in range(10)], seed=3).ask(4)
True
"""

from __future__ import annotations

import random

from ._base import Strategy, register_strategy


@register_strategy
class RandomSearch(Strategy):
    name = "random"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._order = list(range(len(self.candidates)))
        random.Random(self.seed).shuffle(self._order)
        self._cursor = 0

    def _propose(self, n: int) -> list[int]:
        picks: list[int] = []
        while self._cursor < len(self._order) and len(picks) < n:
            i = self._order[self._cursor]
            self._cursor += 1
            if self.fresh(i):
                picks.append(i)
        return picks
