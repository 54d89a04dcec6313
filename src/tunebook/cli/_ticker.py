"""How far a long book command (merge, push) has got, on stderr, while it writes.

A merge or push of tens of thousands of keys takes minutes; without a line it looks hung.
A :class:`Ticker` counts what is done and, from ``first_s`` on, says "N of M keys" at most
every ``every_s`` (the counts double as the message of an interruption). It is shown as
tuning progress is (``TUNEBOOK_PROGRESS``: 1 always, 0 never, ``auto`` when stderr is a
terminal), and a stderr that is gone turns it off, never the command.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .. import _settings
from .._progress import is_terminal


class Ticker:
    def __init__(
        self,
        doing: str,
        total: int,
        unit: str = "keys",
        *,
        first_s: float = 2.0,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.doing, self.total, self.unit = doing, total, unit
        self.done = 0
        self.every_s, self._clock = every_s, clock
        self._start = clock()
        self._next = self._start + first_s  # the clock's time of the next line
        mode = _settings.progress()
        self.shown = mode == "1" or (mode == "auto" and is_terminal(sys.stderr))

    def add(self, n: int = 1) -> None:
        """Count ``n`` more done; say so if it is time."""
        self.done += n
        if not self.shown:
            return
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.every_s
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        line = f"{self.doing}: {self.done:,} of {self.total:,} {self.unit}{share}, {now - self._start:.0f} s"
        stream = sys.stderr  # None where the process started with it closed (print would use stdout)
        try:
            if stream is None:
                raise ValueError("no stderr")
            print(line, file=stream, flush=True)
        except (OSError, ValueError):  # closed, gone or absent: progress is a courtesy
            self.shown = False
