"""``neighbors``: start from configs that won elsewhere, then climb.

Winners move little between nearby keys (M=4096 and M=8192) and between similar GPUs, so the
best place to start is their winners, given as ``hints``. Without hints it starts from four
seeded random candidates. Then, repeatedly, it measures the candidates one step from the
best so far (one parameter, one level: :class:`~tunebook._search._encoding.Encoding`); when
all of those are measured without improvement it widens to two steps; when those are
measured too, the best is a local optimum and ``ask`` returns ``[]``.

The proposal depends only on what has been told, not on the order it was told in, so a
killed run resumed with ``known`` carries on where it stopped.

>>> from tunebook._search import make_strategy
>>> cands = [{"B": b, "w": w} for b in (16, 32, 64, 128) for w in (2, 4, 8)]
>>> s = make_strategy("neighbors", cands, hints=[4])
>>> s.ask(8)
[4]
>>> s.tell(4, 1.0); sorted(s.ask(8))
[1, 3, 5, 7]
"""

from __future__ import annotations

import random

from ._base import Strategy, register_strategy
from ._encoding import Encoding

_RANDOM_STARTS = 4
# Configs this close to the best are climbed from too (relative).
SLACK = 0.10


@register_strategy
class Neighbors(Strategy):
    name = "neighbors"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._encoding = Encoding(self.candidates)
        self._order = list(range(len(self.candidates)))
        random.Random(self.seed).shuffle(self._order)
        # Hints are proposed by the base class; without any, random starts stand in.
        self._starts = [] if self.hints else self._order[:_RANDOM_STARTS]

    def _propose(self, n: int) -> list[int]:
        picks = [i for i in self._starts if self.fresh(i)][:n]
        if picks or self.pending:
            return picks  # climb only from starts that have all been measured
        best = self.best
        if best is None:
            # Every start failed: keep drawing at random until one runs.
            return [i for i in self._order if self.fresh(i)][:n]
        # Widen step by step: one step from the best, then one step from every config
        # within SLACK of it (noise and plateaus hide the way down), then two steps.
        best_ms = self.results[best]
        beam = sorted((ms, i) for i, ms in self.results.items() if ms <= best_ms * (1 + SLACK))
        for radius in (1, 2):
            for _, origin in beam:
                picks = [i for i in self._encoding.neighbors(origin, radius) if self.fresh(i)][:n]
                if picks:
                    return picks
        return []
