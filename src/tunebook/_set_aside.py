"""Served configs that cannot compile here, set aside for the rest of the process.

In ``serve`` mode a key the book lacks is answered without measuring: another platform's
winner, a neighbour's, a rule's. Such a config was never compiled for this call on this GPU,
and one may not fit it (more shared memory than this GPU or Triton release gives it, a
``tl.static_assert`` on its meta-parameters). Triton raises before the kernel launches, so
nothing was written: the autotuner sets the config aside and decides the call again, and the
caller sees a served call instead of an exception.

What is set aside is kept out of serve mode's answers from other evidence only: a key's own
results (the book's, its partial ones) and tuning are untouched, and a config measured for
its key that fails is the caller's to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _stats, _warnings

# Served configs a kernel sets aside in a process before a compile error reaches the caller.
MAX_SET_ASIDE = 4


class SetAside:
    def __init__(self, label: str) -> None:
        self._label = label
        self.why: dict[str, str] = {}  # config id -> the error that set it aside
        # (key, config id) of answers served without a measurement of that config for the
        # key -> the stats the answer counted, taken back when it is set aside
        self._unmeasured: dict[tuple[Any, str], tuple[str, ...]] = {}

    def __contains__(self, cid: str) -> bool:
        return cid in self.why

    def allowed(self, ids: Sequence[str]) -> list[str]:
        return [cid for cid in ids if cid not in self.why]

    def served(self, key: Any, cid: str, counted: Sequence[str]) -> None:
        """``cid`` answers ``key`` unmeasured; the answer counted ``counted`` in ``stats()``."""
        self._unmeasured[key, cid] = tuple(counted)

    def unmeasured(self, key: Any, cid: str) -> tuple[str, ...] | None:
        return self._unmeasured.get((key, cid))

    def add(self, key: Any, cid: str, exc: BaseException) -> bool:
        """Set ``cid`` aside after it failed for ``key``; False where the error must reach the
        caller: MAX_SET_ASIDE are already set aside (the kernel or the call, not a config, is
        then at fault). A config another thread set aside meanwhile is decided again too."""
        if cid not in self.why:
            if len(self.why) >= MAX_SET_ASIDE:
                return False
            self.why[cid] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        for name in self._unmeasured.pop((key, cid), ()):  # the failed answer is not counted
            _stats.add(name, -1)
        return True

    def warn(self, cid: str) -> None:
        _warnings.warn_once(
            f"set-aside:{self._label}:{cid}",
            "tunebook: %s: %s, served without being measured for this key, cannot run here (%s); "
            "it is set aside for this process and the call served by the next answer",
            self._label,
            cid,
            self.why[cid],
        )
