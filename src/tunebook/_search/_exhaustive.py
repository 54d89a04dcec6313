"""``exhaustive``: every candidate, in the order given (hints first).

The right choice whenever the budget covers the space: no model beats measuring everything,
and the order keeps a killed run resumable.

>>> from tunebook._search import make_strategy
>>> make_strategy("exhaustive", [{"B": 16}, {"B": 32}]).ask(8)
[0, 1]
"""

from __future__ import annotations

from ._base import Strategy, register_strategy


@register_strategy
class Exhaustive(Strategy):
    name = "exhaustive"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cursor = 0  # every index before it is told or pending

    def _propose(self, n: int) -> list[int]:
        picks: list[int] = []
        i = self._cursor
        while i < len(self.candidates) and len(picks) < n:
            if self.fresh(i):
                picks.append(i)
            i += 1
        # Skipped indices were told or pending; neither ever becomes fresh again.
        self._cursor = i
        return picks
