"""A sweep worker's results, appended to a journal of its own before they are reported.

A sweep's workers must keep what they measured when the driver dies (nothing lost, nothing
measured twice on resume), but writing each result into the book costs a rewrite of the
whole page under its lock: measured, 270 ms for a page of 100 keys x 100 results, so the
eight workers of a node would queue on it. Each worker appends instead, as Optuna's journal
storage does:

* ``<book>/.tunebook/journal/<host>-<pid>.jsonl``, one JSON line per result (the page it
  belongs to, the key, the config id, the result), flushed and fsynced: O(1) per result,
  and no lock shared with any other process (hidden with the book's other writer state,
  never shipped; journals at ``<book>/.journal/``, where tunebook before it wrote them,
  are folded too);
* the writer holds an exclusive ``flock`` on its journal for as long as it lives, so a
  journal whose lock can be taken belongs to a process that is gone;
* :func:`fold` merges every such journal into the book (one write per page) and deletes
  it; a journal is deleted only once the book took all of it, and a torn last line (a
  worker killed mid-write) is ignored. Workers fold at start (the results of the worker
  they replace, or of a killed run), the driver after it lost an actor and at the end.
  Folding never waits and never reads without limit, whatever is planted in the journal
  directory: only regular files are opened, non-blocking, and read up to
  ``MAX_JOURNAL_BYTES``; anything else (a FIFO, a device, a dangling link) is left as it is,
  with one warning naming it.

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
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._book import DirectoryStore, Document, Entry, Result, now_iso
from .._book.files import MAX_BOOK_BYTES, Unusable, open_regular_file, read_bounded
from .._errors import BookFormatError
from .._warnings import warn_once

log = logging.getLogger("tunebook")

DIRECTORY = os.path.join(".tunebook", "journal")
OLD_DIRECTORIES = (".journal",)  # where tunebook wrote journals before; still folded
MAX_JOURNAL_BYTES = MAX_BOOK_BYTES  # ~300 bytes a result: 200,000 results of one worker


class Journal:
    """This process's journal in ``book / DIRECTORY`` (opened, and locked, on the first append)."""

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
                self._file = _open_for_append(self.path)
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._broken = True
            log.warning("tunebook: no journal at %s (%s); results go to the driver only", self.path, exc)


def _open_for_append(path: Path) -> IO[str]:
    """The journal at ``path``, created; refuses anything planted there but a regular file
    (opened non-blocking and without following a link, so a FIFO cannot make it wait)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "a", encoding="utf-8")


def fold(book: Path) -> int:
    """Merge the journals of processes that are gone into ``book``; return the results taken."""
    return sum(_fold_one(book, path) for path in _journals(book))


def _journals(book: Path) -> list[Path]:
    paths: list[Path] = []
    for directory in (DIRECTORY, *OLD_DIRECTORIES):
        with contextlib.suppress(OSError):
            paths += sorted((book / directory).glob("*.jsonl"))
    return paths


def _fold_one(book: Path, path: Path) -> int:
    """Fold one journal whose writer is gone (its flock can be taken); the results taken."""
    try:
        fd = open_regular_file(path, MAX_JOURNAL_BYTES)
    except Unusable as exc:
        warn_once(
            f"journal:{path}",
            "tunebook: skipping sweep journal %s: %s. Delete it to silence this warning.",
            path,
            exc,
        )
        return 0
    if fd is None:
        return 0  # folded by another process meanwhile
    with os.fdopen(fd, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # its writer lives
        try:
            lines = read_bounded(fd, MAX_JOURNAL_BYTES).decode("utf-8", "replace").splitlines()
            mtime = os.fstat(fd).st_mtime
        except (Unusable, OSError) as exc:
            warn_once(f"journal:{path}", "tunebook: skipping sweep journal %s: %s", path, exc)
            return 0
        if not lines and time.time() - mtime < 60:
            return 0  # just created, not yet locked by its writer: leave it to it
        documents = _documents(lines)
        store = DirectoryStore(book)  # written as the book writes: format 2, a file per key
        if not all(store.merge(name, doc) is not None for name, doc in documents.items()):
            return 0
        with contextlib.suppress(OSError):
            path.unlink()
        return sum(len(e.results) for doc in documents.values() for e in doc.entries.values())


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
