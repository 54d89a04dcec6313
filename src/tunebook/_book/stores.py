"""Where book documents are kept: the store interface, and the directory store.

Every layer of a book (the writable directory, the fleet's Redis, the read-only books an
application ships) is a :class:`BookStore`; :class:`~tunebook._book.pages.Page` composes
them in one loop and knows nothing else about them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .files import merge_write, read_document
from .records import Document


@runtime_checkable
class BookStore(Protocol):
    """A place that keeps book documents by name (one per kernel and platform).

    Contract (tests/test_stores.py runs it against every store):

    * **What is stored stands, per key and config.** ``merge`` adds the news of a document
      to the stored one by :meth:`Document.merged_over`: a (key, config) result already
      stored is kept over a new one (a full measurement replaces a quick one), so every
      process that reads the store serves the same winner.
    * **Never raises into a kernel call.** A missing, unreadable, foreign or oversized
      document, an unreachable server, a read-only or full disk: ``fetch`` returns None and
      ``merge`` returns None ("could not write"); the store reports the cause once.
    * **Safe across threads and processes.** Concurrent merges from many processes (and
      hosts, for a server) lose nothing; a reader never sees a torn document.
    * ``merge`` answers with the whole stored document after the merge, as ``fetch`` would.
    """

    def fetch(self, name: str) -> Document | None:
        """The stored document called ``name``, or None if there is none or it is unusable."""
        ...

    def merge(self, name: str, doc: Document) -> Document | None:
        """Merge ``doc`` into the stored document ``name``; the result, or None if not written."""
        ...


class DirectoryStore:
    """Book files in one directory, one JSON file per document (``<name>``).

    Meets the contract through the file layer (files.py): strict reads that warn once and
    skip what they cannot use, atomic replacement, merge-on-write under a file lock. A
    read-only store (``writable=False``, for books shipped with an application) never
    writes. ``fetch`` re-reads a file only when its (mtime, size, inode) stamp changed, so
    a refresh of an unchanged book costs one ``stat``.

    >>> import tempfile
    >>> store = DirectoryStore(Path(tempfile.mkdtemp()))
    >>> store.fetch("add--0--cpu--1.json") is None
    True
    """

    def __init__(self, directory: Path, *, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.writable = writable
        self._seen: dict[str, tuple[tuple[int, int, int], Document | None]] = {}

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.directory)!r}{'' if self.writable else ', writable=False'})"

    def _stamp(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.directory / name).stat()
        except (OSError, ValueError):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)  # os.replace gives every write a new inode

    def fetch(self, name: str) -> Document | None:
        stamp = self._stamp(name)
        if stamp is None:
            self._seen.pop(name, None)
            return read_document(self.directory / name)  # None; warns of a dangling or looping link
        seen = self._seen.get(name)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        doc = read_document(self.directory / name)
        self._seen[name] = (stamp, doc)
        return doc

    def merge(self, name: str, doc: Document) -> Document | None:
        if not self.writable:
            return None
        merged = merge_write(self.directory / name, doc)
        if merged is not None:
            stamp = self._stamp(name)
            if stamp is not None:
                self._seen[name] = (stamp, merged)
        return merged
