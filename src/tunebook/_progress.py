"""Progress of a long tuning, on stderr: kernel, key, configs measured, best so far.

Shown when ``TUNEBOOK_PROGRESS=1``, or by default (``auto``) when stderr is a terminal and
the tuning has run for more than a second; never when ``TUNEBOOK_PROGRESS=0``. Every
update is also logged at DEBUG level to the "tunebook" logger.

Progress is a courtesy: a stderr that is absent (a process started with it closed, where
Python's ``sys.stderr`` is None), closed, or a pipe whose reader has gone turns it off, and
the tuning goes on (until 2026-12 the kernel call raised: its results were saved, its output
never computed).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from . import _settings

log = logging.getLogger("tunebook")


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; False where there is no usable stream (a process
    started with it closed has None for it) or it is closed."""
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # None, closed, or a stream without a file
        return False


class Progress:
    def __init__(self, kernel: str, key: Any, *, interval_s: float = 0.5) -> None:
        self.kernel, self.key = kernel, key
        self.start = time.monotonic()
        self.interval_s = interval_s
        self._last = 0.0
        self._shown = False
        mode = _settings.progress()
        self._enabled = mode == "1" or (mode == "auto" and is_terminal(sys.stderr))
        self._always = mode == "1"

    def line(self, done: int, total: int, best_ms: float, phase: str = "") -> str:
        best = f"{best_ms:.4g} ms" if math.isfinite(best_ms) else "-"
        elapsed = time.monotonic() - self.start
        extra = f" {phase}" if phase else ""
        where = f"{self.kernel} {list(self.key)}"
        return f"tunebook: {where}: {done}/{total} configs, best {best}, {elapsed:.1f}s{extra}"

    def update(self, done: int, total: int, best_ms: float, phase: str = "") -> None:
        text = self.line(done, total, best_ms, phase)
        log.debug("%s", text)
        now = time.monotonic()
        if not self._enabled or now - self._last < self.interval_s:
            return
        if not self._always and now - self.start < 1.0:
            return
        self._last = now
        self._shown = True
        self._write(text + ("\r" if is_terminal(sys.stderr) else "\n"))

    def close(self, done: int, total: int, best_ms: float, why: str = "") -> None:
        """The last line: ``why`` says why the search ended (``_tuner.why_stopped``)."""
        text = self.line(done, total, best_ms, f"done ({why})" if why else "done")
        log.info("%s", text)
        if self._shown or (self._always and self._enabled):
            self._write(text + "\n")

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # no stderr, closed, or its reader gone
            self._enabled = self._shown = self._always = False
