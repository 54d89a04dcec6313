"""``bayes``: model-based search with Optuna's TPE sampler (``pip install 'tunebook[optuna]'``).

Optuna proposes parameter values; this module maps them onto the candidate list:

* ordered numeric parameters are offered to Optuna as integer *ordinals* (the rank of the
  value), so BLOCK_M 32 -> 64 -> 128 is a smooth axis the model can learn along;
  categorical ones as a choice among level numbers;
* a proposal that is already measured is answered from memory, never measured again;
* a proposal outside the candidate list (a constraint or platform filter cut it) is told as
  infinitely slow, which teaches the model where the feasible region is;
* after 32 unusable proposals in a row it takes the unmeasured candidate nearest to the last
  one, so the search always moves;
* any integer is a seed, as for ``random``: Optuna (NumPy) takes 0 to 2**32 - 1 only, so
  the seed is taken modulo 2**32 (-1 is 2**32 - 1, ``time.time_ns()`` its low 32 bits).

Results known beforehand are added to the study as completed trials.

>>> from tunebook._search import make_strategy
>>> s = make_strategy("bayes", [{"B": b} for b in (16, 32, 64, 128)], seed=0)
>>> len(set(s.ask(3)))
3
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

from .._optional import require
from ._base import Strategy, register_strategy
from ._encoding import Encoding

BAYES_HINT = "or choose strategy='random' or 'neighbors'."

_MAX_TRIES = 32
# How many seeds Optuna's sampler takes (NumPy's RandomState: 0 to 2**32 - 1).
OPTUNA_SEEDS = 2**32


def import_optuna() -> Any:
    return require(
        "optuna",
        feature="the 'bayes' search strategy",
        extra="optuna",
        hint=BAYES_HINT,
    )


@register_strategy
class Bayes(Strategy):
    name = "bayes"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        optuna = self._optuna = import_optuna()
        self._encoding = enc = Encoding(self.candidates)
        dist = optuna.distributions
        # One-level parameters carry no information; Optuna never sees them.
        self._dists: dict[str, Any] = {}
        for name in enc.names:
            size = len(enc.levels[name])
            if size > 1:
                self._dists[name] = (
                    dist.IntDistribution(0, size - 1)
                    if enc.ordered[name]
                    else dist.CategoricalDistribution(tuple(range(size)))
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate / constant_liar are "experimental"
            # 48 expected-improvement candidates (Optuna's default: 24) reached 1.03x the best
            # in half the configs on the synthetic GEMM tables: a discrete space rewards a
            # greedier pick among the model's samples.
            sampler = optuna.samplers.TPESampler(
                seed=self.seed % OPTUNA_SEEDS,
                multivariate=True,
                constant_liar=True,
                n_ei_candidates=48,
                warn_independent_sampling=False,
            )
        with self._quiet():
            self._study = optuna.create_study(direction="minimize", sampler=sampler)
        self._open: dict[int, Any] = {}  # candidate index -> its still-running Optuna trial

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        # Optuna logs every finished trial at INFO; a search of 500 configs would flood the log.
        logging = self._optuna.logging
        before = logging.get_verbosity()
        logging.set_verbosity(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.set_verbosity(before)

    def _code(self, params: dict[str, Any]) -> tuple[int, ...]:
        return tuple(int(params.get(name, 0)) for name in self._encoding.names)

    def _one(self) -> int | None:
        code: tuple[int, ...] = ()
        for _ in range(_MAX_TRIES):
            trial = self._study.ask(self._dists)
            code = self._code(trial.params)
            i = self._encoding.index.get(code)
            if i is None:
                self._study.tell(trial, math.inf)
            elif i in self.results:
                self._study.tell(trial, self.results[i])
            elif i in self.pending or i in self._open:
                self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
            else:
                self._open[i] = trial
                return i
        fresh = (i for i in range(len(self.candidates)) if self.fresh(i) and i not in self._open)
        return self._encoding.nearest(code, fresh)

    def _propose(self, n: int) -> list[int]:
        picks: list[int] = []
        with self._quiet():
            for _ in range(n):
                i = self._one()
                if i is None:
                    break
                self.pending.add(i)  # so the next _one() of this batch skips it
                picks.append(i)
        self.pending.difference_update(picks)  # the base class adds them back, once checked
        return picks

    def _observe(self, index: int, ms: float) -> None:
        with self._quiet():
            trial = self._open.pop(index, None)
            if trial is not None:
                self._study.tell(trial, ms)
                return
            code = self._encoding.codes[index]
            params = {name: code[k] for k, name in enumerate(self._encoding.names) if name in self._dists}
            self._study.add_trial(
                self._optuna.trial.create_trial(params=params, distributions=self._dists, value=ms)
            )
