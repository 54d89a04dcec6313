"""tunebook: tune Triton kernels once, remember every result in a book, serve with zero benchmarking.

>>> import tunebook
>>> tunebook.stats()["benchmarked"] >= 0
True

Public surface: :func:`autotune` (a drop-in for ``triton.autotune``), :class:`Autotuner`,
:func:`stats`, :func:`reset_stats`, :class:`Book`, and ``Config`` (Triton's, re-exported).
"""

from __future__ import annotations

import logging

from ._autotuner import Autotuner, __version__, autotune
from ._book import Book, BookWarning
from ._buckets import Bucket, bucket, next_power_of_2
from ._compat import Config
from ._search import Budget, strategy_names
from ._space import Space
from ._stats import reset as reset_stats
from ._stats import stats

logging.getLogger("tunebook").addHandler(logging.NullHandler())

__all__ = [
    "Autotuner",
    "Book",
    "BookWarning",
    "Bucket",
    "Budget",
    "Config",
    "Space",
    "__version__",
    "autotune",
    "bucket",
    "next_power_of_2",
    "reset_stats",
    "stats",
    "strategy_names",
]
