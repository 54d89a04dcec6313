"""Served configs that cannot compile for a key, set aside for the rest of the process.

In ``serve`` mode a key the book lacks is answered without measuring: another platform's
winner, a neighbour's, ``fallback=``'s, the first config. Such a config was never compiled
for this key here, and one may not fit it (more shared memory than this GPU or Triton
release gives it, a ``tl.static_assert`` on its meta-parameters). Triton raises before the
kernel launches, so nothing was written: the autotuner sets the config aside for that key
and decides the call again, and the caller sees a served call instead of an exception.

Only the failing key is affected: its other decisions and every other key's (the book's
answers, tuning, other served answers) stay as they are. A config measured for its key
(the key's own partial results) that fails is the caller's to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _stats, _warnings

# Configs a key may have set aside in a process before a compile error reaches the caller.
MAX_SET_ASIDE = 4


class SetAside:
    def __init__(self, label: str) -> None:
        self._label = label
        self._by_key: dict[Any, dict[str, str]] = {}  # key -> config id -> why it was set aside
        # (key, config id) of answers served without a measurement of that config for the
        # key -> the stats() counters the answer added, taken back when it is set aside
        self._unmeasured: dict[tuple[Any, str], tuple[str, ...]] = {}

    def of(self, key: Any) -> dict[str, str]:
        """The config ids set aside for ``key`` (and why)."""
        return self._by_key.get(key, {})

    def served(self, key: Any, cid: str, counted: Sequence[str]) -> None:
        """``cid`` answers ``key`` unmeasured; the answer counted ``counted`` in ``stats()``."""
        self._unmeasured[key, cid] = tuple(counted)

    def add(self, key: Any, cid: str, exc: BaseException) -> bool:
        """``cid`` failed for ``key``: whether to decide the call again without it. True where
        it was served unmeasured (it is set aside now, the answer's counts taken back) or set
        aside already (another thread's call met it first); False where it was measured for
        the key, or MAX_SET_ASIDE are set aside for the key already."""
        aside = self._by_key.setdefault(key, {})
        if cid in aside:
            return True
        counted = self._unmeasured.pop((key, cid), None)
        if counted is None or len(aside) >= MAX_SET_ASIDE:
            return False
        aside[cid] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        for name in counted:  # the failed answer is not counted: the next one is
            _stats.take_back(name)
        _warnings.warn_once(
            f"set-aside:{self._label}:{cid}",
            "tunebook: %s: %s, served without being measured for key %s, cannot run here (%s); "
            "it is set aside for that key in this process and the call served by the next answer",
            self._label,
            cid,
            list(key),
            aside[cid],
        )
        return True
