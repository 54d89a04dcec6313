"""Recording serve-mode misses without stalling the request that met them.

:func:`record` describes the call (tensor layouts, scalar values, and the grid every
candidate would launch with), so that ``tunebook tune --misses`` can replay it offline. A
miss is written to the book (a locked, fsynced file write) by one background thread;
the kernel call only puts it on a queue. Entries for the same key are coalesced while
they wait. At interpreter exit the queue is flushed for at most FLUSH_TIMEOUT_S. What the
directory refuses (read-only, full) is kept (``unwritten.write_misses``: at most
MAX_HELD_MISS_KEYS keys, the rest counted): sent along with a miss record of the page at
least MISS_RETRY_S later (never before exit after a refusal for good, counts only then),
and once more at exit by ``unwritten.write_refused_at_exit`` (which runs
after this module's flush: atexit runs last-registered first, and this module imports
``_book``), which counts what still stays unwritten in its one warning.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from . import _calls, _settings
from ._book import Page
from ._book.records import Document, Entry, now_iso
from ._book.unwritten import write_misses
from ._call import Call
from ._forksafe import renew_in_child
from ._jsonio import stored_key
from ._version import __version__

log = logging.getLogger("tunebook")

FLUSH_TIMEOUT_S = 5.0

_queue: queue.Queue[tuple[Any, str, Document] | None] = queue.Queue()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _renew() -> None:
    # A forked child: the queued misses are the parent's (its writer writes them), and the
    # parent's writer thread does not exist here.
    global _queue, _thread, _lock
    _queue, _thread, _lock = queue.Queue(), None, threading.Lock()


renew_in_child(_renew)


def record(page: Page, key: Sequence[Any], key_text: str, call: Call, candidates: Mapping[str, Any]) -> None:
    """Remember that ``key`` missed, and how to replay ``call``; returns at once.

    ``candidates`` maps each candidate's config id to its Config (for the grids). Nothing
    where TUNEBOOK_RECORD_MISSES=0.
    """
    if not _settings.record_misses():
        return
    grids = _calls.evaluate_grids(call.grid, call.nargs, call.kwargs, candidates)
    description: dict[str, Any] | None = _calls.describe_call(call.args, call.kwargs, grids)
    if _calls.validate(description, "call") is not None:
        description = None  # e.g. a scalar the JSON schema cannot hold: count the miss anyway
    entry = Entry(key=stored_key(key), misses=1, call=description, updated_at=now_iso(), tunebook=__version__)
    submit(page, key_text, entry)


def submit(page: Page, key_text: str, entry: Entry) -> None:
    """Queue ``entry`` (a miss) for the writable book of ``page``; returns at once."""
    store = page.local
    if store is None:
        return
    doc = Document(kernel=page.kernel.to_json(), platform=page.platform, entries={key_text: entry})
    _ensure_thread()
    _queue.put((store, page.file_name, doc))


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
        store, name, doc = item
        try:
            write_misses(store, name, doc)  # logs its own failures once; keeps what was refused
        except Exception:  # a miss record must never take the process down
            log.exception("tunebook: could not record a miss in %s of %r", name, store)
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
