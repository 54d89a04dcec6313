"""Search strategies: which configs to measure, under a budget.

:func:`search` drives a named strategy (``exhaustive``, ``random``, ``bayes``,
``neighbors`` or ``auto``) through the ask/tell contract documented in
:mod:`tunebook._search._base`; :class:`Table` holds recorded timings so strategies can be
replayed offline.

>>> from tunebook._search import Budget, search
>>> times = [5.0, 4.0, 3.0, 2.5, 2.0, 2.2, 3.1, 4.0, 5.0, 6.0, 7.0, 8.0]
>>> r = search([{"B": b} for b in range(12)], lambda batch: {i: times[i] for i in batch},
...            strategy="neighbors", hints=[1])
>>> r.best, r.stopped, len(r.measured)
(4, 'converged', 8)
"""

from __future__ import annotations

from . import _bayes, _exhaustive, _neighbors, _random  # noqa: F401  (registers the strategies)
from ._base import Strategy, make_strategy, register_strategy, strategy_names
from ._driver import SMALL_SPACE, Budget, SearchResult, choose_strategy, search
from ._encoding import Encoding
from ._table import Table, TableRow

__all__ = [
    "SMALL_SPACE",
    "Budget",
    "Encoding",
    "SearchResult",
    "Strategy",
    "Table",
    "TableRow",
    "choose_strategy",
    "make_strategy",
    "register_strategy",
    "search",
    "strategy_names",
]
