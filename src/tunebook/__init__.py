"""tunebook: tune Triton kernels once, remember every result in a book, serve with zero benchmarking.

>>> import tunebook
>>> tunebook.stats()["benchmarked"] >= 0
True

Public surface: :func:`autotune` (a drop-in for ``triton.autotune``), :class:`Autotuner`,
:func:`patch` and :func:`unpatch` (every ``triton.autotune`` kernel of the process remembers),
:class:`Space` and :func:`bucket` (config spaces and bucketed keys), :func:`stats` and
:func:`reset_stats`, :class:`Book`, :func:`tune_on_ray` (a sweep over every GPU of a Ray
cluster), the errors (:class:`TunebookError` and its family, :class:`BookWarning`), and
``Config`` (Triton's, re-exported).
"""

from __future__ import annotations

import logging as _logging
import sys as _sys

from ._autotuner import Autotuner, autotune
from ._book import Book
from ._buckets import Bucket, bucket, next_power_of_2
from ._compat import Config
from ._errors import (
    BookFormatError,
    BookWarning,
    ConfigurationError,
    MissingDependency,
    NoRecordedGrid,
    PatchWarning,
    SnapshotTooLarge,
    SpaceError,
    TunebookError,
    TuningFailed,
    UnreadableBookFile,
    WrongResult,
)
from ._patch import patch, unpatch
from ._search import Budget, strategy_names
from ._space import Space
from ._stats import reset as reset_stats
from ._stats import stats
from ._sweep import tune_on_ray
from ._tables import Tables
from ._version import __version__

_logging.getLogger("tunebook").addHandler(_logging.NullHandler())

__all__ = [
    "Autotuner",
    "Book",
    "BookFormatError",
    "BookWarning",
    "Bucket",
    "Budget",
    "Config",
    "ConfigurationError",
    "MissingDependency",
    "NoRecordedGrid",
    "PatchWarning",
    "SnapshotTooLarge",
    "Space",
    "SpaceError",
    "Tables",
    "TunebookError",
    "TuningFailed",
    "UnreadableBookFile",
    "WrongResult",
    "__version__",
    "autotune",
    "bucket",
    "next_power_of_2",
    "patch",
    "reset_stats",
    "stats",
    "strategy_names",
    "tune_on_ray",
    "unpatch",
]


def __dir__() -> list[str]:
    return sorted(__all__)


# The TUNEBOOK_PATCH start-up hook patches Triton right after `import triton`. When this
# package's import is what imports triton, the patch waits for the package to be whole: now.
if callable(_imported := getattr(_sys.modules.get("_tunebook_startup_hook"), "tunebook_imported", None)):
    _imported(_sys.modules[__name__])
