"""A sweep worker's results, appended to a journal of its own before they are reported.

A sweep's workers must keep what they measured when the driver dies (nothing lost, nothing
measured twice on resume), but writing each result into the book costs a rewrite of the
whole page under its lock: measured, 270 ms for a page of 100 keys x 100 results, so the
eight workers of a node would queue on it. Each worker appends instead, as Optuna's journal
storage does:

* ``<book>/.journal/<host>-<pid>.jsonl``, one JSON line per result (the page it belongs
  to, the key, the config id, the result), flushed and fsynced: O(1) per result, and no
  lock shared with any other process;
* the writer holds an exclusive ``flock`` on its journal for as long as it lives, so a
  journal whose lock can be taken belongs to a process that is gone;
* :func:`fold` merges every such journal into the book (one write per page) and deletes
  it; a journal is deleted only once the book took all of it, and a torn last line (a
  worker killed mid-write) is ignored. Workers fold at start (the results of the worker
  they replace, or of a killed run), the driver after it lost an actor and at the end.

A journal that cannot be written (a read-only book) costs nothing but that safety net:
the worker still reports every result to the driver, which writes the book itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._book import DirectoryStore, Document, Entry, Result, now_iso
from .._errors import BookFormatError

log = logging.getLogger("tunebook")

DIRECTORY = ".journal"


class Journal:
    """This process's journal in ``book / .journal`` (opened, and locked, on the first append)."""

    def __init__(self, book: Path) -> None:
        self.path = book / DIRECTORY / f"{socket.gethostname()}-{os.getpid()}.jsonl"
        self._file: IO[str] | None = None
        self._broken = False

    def append(
        self, page: Mapping[str, Any], key_text: str, key: Sequence[Any], cid: str, result: Result
    ) -> None:
        """Record one result durably; ``page`` names its book page (kernel, platform, file)."""
        if self._broken:
            return
        item = {
            "page": dict(page),
            "key_text": key_text,
            "key": list(key),
            "cid": cid,
            "result": result.to_json(),
        }
        line = json.dumps(item) + "\n"
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._broken = True
            log.warning("tunebook: no journal at %s (%s); results go to the driver only", self.path, exc)


def fold(book: Path) -> int:
    """Merge the journals of processes that are gone into ``book``; return the results taken."""
    directory = book / DIRECTORY
    try:
        paths = sorted(directory.glob("*.jsonl"))
    except OSError:
        return 0
    taken = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer lives
            lines = fh.read().splitlines()
            if not lines and time.time() - path.stat().st_mtime < 60:
                continue  # just created, not yet locked by its writer: leave it to it
            documents = _documents(lines)
            store = DirectoryStore(book)  # written as the book writes: format 2, a file per key
            if all(store.merge(name, doc) is not None for name, doc in documents.items()):
                path.unlink()
                taken += sum(len(e.results) for doc in documents.values() for e in doc.entries.values())
    return taken


def _documents(lines: list[str]) -> dict[str, Document]:
    """The journal's results as one document per book page."""
    docs: dict[str, Document] = {}
    for line in lines:
        try:
            item = json.loads(line)
            page = item["page"]
            result = Result.from_json(item["result"], "a journal line")
            entry = Entry(key=tuple(item["key"]), results={str(item["cid"]): result}, updated_at=now_iso())
            name = str(page["file"])
        except (ValueError, KeyError, TypeError, BookFormatError):
            continue  # a line torn by a kill, or not ours
        doc = docs.setdefault(name, Document(kernel=dict(page["kernel"]), platform=dict(page["platform"])))
        key_text = str(item["key_text"])
        doc.entries[key_text] = entry.merged_over(doc.entries.get(key_text))
    return docs
