"""What a Redis store's merges could not send: held per book file, and sent again later.

A merge that meets an outage (or other writers at every try, :mod:`redis_store`) is not
lost: the store holds its news here, merged with what was held for the same file before, and
every later merge of that file takes it along. What is held is sent again

* by the next request that finds Redis answering, once ``retry_after_s`` has passed since
  the last hold (:meth:`Outbox.send_if_due`);
* by a daemon thread, every ``retry_after_s`` while anything is held: a process that only
  serves hits never asks the store anything, and would otherwise keep what it tuned during
  a short outage to itself;
* at the interpreter's exit (``redis_store.send_unsent_at_exit``).

A forked child starts with nothing held (what its parent held is the parent's to send) and
holds and sends its own news as any process does.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from .._forksafe import lock_for
from .records import Document, Entry

# (file name, news, probe, deadline) -> whether Redis took it; probe: try even while the
# breaker is open; deadline (time.monotonic()): contended retries end by then
Send = Callable[[str, Document, bool, "float | None"], bool]


class Outbox:
    """The news a store could not send, per file name, and when to send it again."""

    def __init__(
        self, send: Send, up: Callable[[], bool], clock: Callable[[], float], retry_after_s: float
    ) -> None:
        self._send = send
        self._up = up  # whether the store deems Redis reachable (once not, the rest waits)
        self._clock = clock
        self.retry_after_s = retry_after_s
        self._lock = lock_for(self, threading.Lock)  # renewed in a forked child (_forksafe)
        self._held: dict[str, Document] = {}
        self._due = 0.0  # the clock's time after which a request that Redis answered sends
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._sending = threading.local()  # set while this thread sends (no sending from within)

    def _adopt(self) -> None:
        """In a forked child (a pre-fork server's worker): forget the parent's news, which the
        parent sends, and its thread, which the child does not have. Under the lock."""
        if os.getpid() != self._pid:
            self._pid, self._held, self._thread = os.getpid(), {}, None

    def take(self, name: str) -> Document | None:
        """What is held for ``name``, no longer held (the caller sends it along, or holds it again)."""
        with self._lock:
            self._adopt()
            return self._held.pop(name, None)

    def hold(self, name: str, news: Document) -> None:
        """Hold ``news`` for ``name`` (merged with what is held for it), and make sure the
        sending thread runs."""
        with self._lock:
            self._adopt()
            old = self._held.get(name)
            self._held[name] = news.merged_over(old) if old is not None else news
            self._due = self._clock() + self.retry_after_s
            thread = None
            # (no new thread while the interpreter exits: the exit's own send is the last try)
            if (self._thread is None or not self._thread.is_alive()) and not sys.is_finalizing():
                thread = self._thread = threading.Thread(
                    target=self._loop, name="tunebook-redis", daemon=True
                )
        if thread is not None:
            thread.start()

    def held(self, name: str) -> dict[str, Entry]:
        """The entries held for ``name``, by key text."""
        with self._lock:
            self._adopt()
            doc = self._held.get(name)
            return dict(doc.entries) if doc is not None else {}

    def keys(self) -> frozenset[str]:
        """Every key text held, as ``file:key``."""
        with self._lock:
            self._adopt()
            return frozenset(f"{n}:{k}" for n, doc in self._held.items() for k in doc.entries)

    def results(self) -> int:
        """How many results (key, config) are held."""
        with self._lock:
            self._adopt()
            return sum(len(e.results) for doc in self._held.values() for e in doc.entries.values())

    def clear(self) -> None:
        """Forget what is held (a test's server that is gone for good)."""
        with self._lock:
            self._held.clear()

    def send(self, *, probe: bool = False, deadline: float | None = None) -> int:
        """Send what is held, one request a file, until Redis is deemed down again; the results
        still held after it. ``probe``: the first request tries even while the breaker is open
        (the interpreter's exit); ``deadline`` (time.monotonic()): no further file after it."""
        self._sending.on = True
        try:
            with self._lock:
                self._adopt()
                names = sorted(self._held)
            for name in names:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                news = self.take(name)
                if news is None:
                    continue
                if not self._send(name, news, probe, deadline):
                    self.hold(name, news)
                    if not self._up():
                        break
                probe = False  # one probe at most: a dead server costs one timeout, not one a file
        finally:
            self._sending.on = False
        return self.results()

    def send_if_due(self) -> None:
        """After a request that Redis answered: send what is held, once ``retry_after_s`` has
        passed since it was held (not from within a send)."""
        if getattr(self._sending, "on", False):
            return
        with self._lock:
            due = bool(self._held) and self._clock() >= self._due
            if due:
                self._due = self._clock() + self.retry_after_s
        if due:
            self.send()

    def _loop(self) -> None:
        while True:
            time.sleep(max(self.retry_after_s, 0.5))
            with self._lock:
                if not self._held or os.getpid() != self._pid:
                    self._thread = None
                    return
            self.send()
