"""Served configs that cannot compile here, set aside for the rest of the process.

In ``serve`` mode a key the book lacks is answered without measuring: another platform's
winner, a neighbour's, a rule's. Such a config was never compiled for this call on this GPU,
and one may not fit it (more shared memory than this GPU or Triton release gives it, a
``tl.static_assert`` on its meta-parameters). Triton raises before the kernel launches, so
nothing was written: the autotuner sets the config aside and decides the call again, and the
caller sees a served call instead of an exception.
"""

from __future__ import annotations

from . import _warnings

# Served configs a kernel sets aside in a process before a compile error reaches the caller.
MAX_SET_ASIDE = 4


class SetAside:
    def __init__(self, label: str) -> None:
        self._label = label
        self.why: dict[str, str] = {}  # config id -> the error that set it aside

    def __contains__(self, cid: str) -> bool:
        return cid in self.why

    def __bool__(self) -> bool:
        return bool(self.why)

    def add(self, cid: str, exc: BaseException) -> bool:
        """Set ``cid`` aside, or False where the error must reach the caller: it was set aside
        before, or MAX_SET_ASIDE already were (the kernel or the call, not a config, is then
        at fault)."""
        if cid in self.why or len(self.why) >= MAX_SET_ASIDE:
            return False
        self.why[cid] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        _warnings.warn_once(
            f"set-aside:{self._label}:{cid}",
            "tunebook: %s: %s, served without being measured for this key, cannot run here (%s); "
            "it is set aside for this process and the call served by the next answer",
            self._label,
            cid,
            self.why[cid],
        )
        return True
