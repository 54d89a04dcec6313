"""Recording serve-mode misses without stalling the request that met them.

A miss is written to the book (a locked, fsynced file write) by one background thread;
the kernel call only puts it on a queue. Entries for the same key are coalesced while
they wait. At interpreter exit the queue is flushed for at most FLUSH_TIMEOUT_S.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from typing import Any

from ._book import Page
from ._book.files import merge_write
from ._book.records import Document, Entry

log = logging.getLogger("tunebook")

FLUSH_TIMEOUT_S = 5.0

_queue: queue.Queue[tuple[Any, str, Document] | None] = queue.Queue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def submit(page: Page, key_text: str, entry: Entry) -> None:
    """Queue ``entry`` (a miss) for the writable book of ``page``; returns at once."""
    if page.path is None:
        return
    doc = Document(kernel=page.kernel.to_json(), platform=page.platform, entries={key_text: entry})
    _ensure_thread()
    _queue.put((page.path, key_text, doc))


def _ensure_thread() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="tunebook-misses", daemon=True)
            _thread.start()


def _run() -> None:
    while True:
        item = _queue.get()
        if item is None:
            _queue.task_done()
            return
        path, _, doc = item
        try:
            merge_write(path, doc)  # logs its own failures once; never raises OSError
        except Exception:  # a miss record must never take the process down
            log.exception("tunebook: could not record a miss in %s", path)
        finally:
            _queue.task_done()


def flush(timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
    """Wait until queued misses are written (tests and the CLI call this); True if all were."""
    done = threading.Event()

    def wait() -> None:
        _queue.join()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done.wait(timeout_s)


atexit.register(flush)
