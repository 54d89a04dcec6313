"""Candidates as ordinal codes, and their neighbourhoods.

Model-based and local strategies need structure that a list of dicts does not show: which
values of a parameter are next to each other. Numeric parameters are *ordered*: their
distinct values are sorted and a value's code is its rank, so BLOCK_M 32 -> 64 is one step
whatever the ratio. Anything else (None mixed with numbers, strings) is *categorical*: every
other value is one step away. Candidates may be flat dicts or book records
(``{"kwargs": {...}, "num_warps": 4}``); a missing name reads as None.

>>> enc = Encoding([{"B": 16, "w": 4}, {"B": 32, "w": 4}, {"B": 64, "w": 8}, {"B": 32, "w": 8}])
>>> enc.codes[2]
(2, 1)
>>> sorted(enc.neighbors(1, radius=1))
[0, 3]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Encoding", "flatten"]


def flatten(candidate: Mapping[str, Any]) -> dict[str, Any]:
    """A book config record's "kwargs" lifted beside its options; flat dicts unchanged."""
    inner = candidate.get("kwargs")
    if isinstance(inner, Mapping):
        return {**inner, **{k: v for k, v in candidate.items() if k != "kwargs"}}
    return dict(candidate)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Encoding:
    """Ordinal codes of a candidate list: ``codes[i]`` is a tuple of per-parameter levels."""

    def __init__(self, candidates: Sequence[Mapping[str, Any]]) -> None:
        flat = [flatten(c) for c in candidates]
        self.names: tuple[str, ...] = tuple(dict.fromkeys(name for c in flat for name in c))
        self.levels: dict[str, tuple[Any, ...]] = {}
        self.ordered: dict[str, bool] = {}
        for name in self.names:
            seen = tuple(dict.fromkeys(c.get(name) for c in flat))
            ordered = all(_numeric(v) for v in seen)
            self.levels[name] = tuple(sorted(seen)) if ordered else seen
            self.ordered[name] = ordered
        rank = {name: {v: k for k, v in enumerate(self.levels[name])} for name in self.names}
        self.codes: list[tuple[int, ...]] = [tuple(rank[n][c.get(n)] for n in self.names) for c in flat]
        self.index: dict[tuple[int, ...], int] = {}
        for i, code in enumerate(self.codes):
            self.index.setdefault(code, i)  # equal candidates: the first stands for all

    def _steps(self, k: int, level: int, span: int) -> list[int]:
        """Levels one step from ``level`` along parameter ``k``."""
        size = len(self.levels[self.names[k]])
        if self.ordered[self.names[k]]:
            return [lv for lv in (level - span, level + span) if 0 <= lv < size]
        return [lv for lv in range(size) if lv != level] if span == 1 else []

    def _walk(self, code: tuple[int, ...], k: int) -> Iterator[int]:
        """The nearest existing candidate each way along parameter ``k``, skipping gaps that
        constraints cut (BLOCK_K 32 -> 128 when 64 is infeasible is still one step)."""
        size = len(self.levels[self.names[k]])
        if not self.ordered[self.names[k]]:
            for lv in self._steps(k, code[k], 1):
                hit = self.index.get((*code[:k], lv, *code[k + 1 :]))
                if hit is not None:
                    yield hit
            return
        for direction in (-1, 1):
            lv = code[k] + direction
            while 0 <= lv < size:
                hit = self.index.get((*code[:k], lv, *code[k + 1 :]))
                if hit is not None:
                    yield hit
                    break
                lv += direction

    def neighbors(self, i: int, radius: int = 1) -> list[int]:
        """Candidates one step from candidate ``i`` (radius 1), or exactly two steps away
        (radius 2: two parameters one step each, or one ordered parameter two steps)."""
        code = self.codes[i]
        found: dict[int, None] = {}
        if radius == 1:
            for k in range(len(self.names)):
                found.update(dict.fromkeys(self._walk(code, k)))
        elif radius == 2:
            for k in range(len(self.names)):
                for lv in self._steps(k, code[k], 2):
                    self._add(found, (*code[:k], lv, *code[k + 1 :]))
                for q in range(k + 1, len(self.names)):
                    for lk in self._steps(k, code[k], 1):
                        for lq in self._steps(q, code[q], 1):
                            moved = list(code)
                            moved[k], moved[q] = lk, lq
                            self._add(found, tuple(moved))
        else:
            raise ValueError(f"radius must be 1 or 2; found {radius}")
        found.pop(i, None)
        return list(found)

    def _add(self, found: dict[int, None], code: tuple[int, ...]) -> None:
        hit = self.index.get(code)
        if hit is not None:
            found[hit] = None

    def nearest(self, code: Sequence[int], allowed: Iterator[int] | Sequence[int]) -> int | None:
        """The allowed candidate closest to ``code`` in L1 distance over levels (lowest index on ties)."""
        best, best_d = None, None
        for i in allowed:
            d = sum(abs(a - b) for a, b in zip(self.codes[i], code))
            if best_d is None or d < best_d:
                best, best_d = i, d
        return best
