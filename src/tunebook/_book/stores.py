"""Where book documents are kept: the store interface, and the directory store.

Every layer of a book (the writable directory, the fleet's Redis, the read-only books an
application ships) is a :class:`BookStore`; :class:`~tunebook._book.pages.Page` composes
them in one loop and knows nothing else about them.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._warnings import warn_once
from . import pagedir
from .files import read_document, warn_write_failure
from .records import Document, Entry

# How a page.json that could not be read, its keys read without it, is reported (the command
# line reports it in its own words: it knows where the identity came from).
DAMAGED_PAGE = "tunebook: the page file"
# A page's identity as page.json holds it: {"kernel": {...}, "platform": {...}}.
Identity = Mapping[str, Mapping[str, Any]]


@runtime_checkable
class BookStore(Protocol):
    """A place that keeps book documents by name (one per kernel and platform).

    Contract (tests/test_stores.py runs it against every store):

    * **What is stored stands, per key and config.** ``merge`` adds the news of a document
      to the stored one by :meth:`Document.merged_over`: a (key, config) result already
      stored is kept over a new one (a full measurement replaces a quick one while the key
      is undecided), so every process that reads the store serves the same winner.
    * **A request costs what it asks for.** ``fetch(name, keys)`` reads those keys only,
      ``merge`` reads and writes the keys of its document only: a kernel call never pays
      for the size of the book. ``fetch(name)`` (every key) is for tools.
    * **Never raises into a kernel call, never makes it wait long.** A missing, unreadable,
      foreign or oversized document, an unreachable or hostile server, a read-only or full
      disk, a lock another process holds: ``fetch`` returns None and ``merge`` returns None
      ("could not write"), or keeps the news where it is not lost; the cause is reported once.
    * **Safe across threads and processes.** Concurrent merges from many processes (and
      hosts, for a server) lose nothing; a reader never sees a torn entry.
    """

    def fetch(
        self,
        name: str,
        keys: Collection[str] | None = None,
        *,
        max_names: int | None = None,
        expected: Identity | None = None,
    ) -> Document | None:
        """The stored document ``name``, or None if there is none or it is unusable.

        ``keys``: only those keys' entries (the ones stored); ``keys=()``: no entries, and
        ``index`` set to every key text stored (names only, for nearest-key searches), or
        with ``max_names``, to those among the first ``max_names`` names the store lists, in
        its own order: the same for every reader of the store in one state, so a bounded
        search is as deterministic as a full one (see pages.NAME_BUDGET).

        ``expected``: the ``{"kernel", "platform"}`` the caller opened ``name`` for (the
        autotuner knows it). Where the store's own record of the document's identity is
        unusable but its keys' records are not, the keys are served as that identity (each
        checked against it as far as the store records whose it is), with one warning; a
        writable store rewrites the record. Without it, such a document is None.
        """
        ...

    def merge(self, name: str, doc: Document) -> Document | None:
        """Merge ``doc`` into the stored document ``name``; the stored entries of ``doc``'s
        keys afterwards, as ``fetch(name, doc.entries)`` would return them, or None if not written.
        A key the store could not write is left out of what it returns (the caller offers it
        again with its next merge); the others are written.
        """
        ...


class DirectoryStore:
    """Book pages in one directory: format 2 (a directory per page, a file per key; see
    pagedir.py), and format 1 files (one JSON file per page) read as they are.

    Meets the contract through pagedir.py: one key's file read or written per key asked,
    under that key's lock for one small write, with news left in the page's pending/ when
    the lock is busy; strict reads that warn once and skip what they cannot use. A page
    also present as a format-1 file is the union of both, the file's results standing (it
    is the older). Writes always go to format 2. A read-only store (``writable=False``, for
    books shipped with an application) never writes. A format-1 file is re-read only when
    its (mtime, size, inode) stamp changed.

    >>> import tempfile
    >>> store = DirectoryStore(Path(tempfile.mkdtemp()))
    >>> store.fetch("add--0--cpu--1.json") is None
    True
    """

    def __init__(self, directory: Path, *, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.writable = writable
        self._seen: dict[str, tuple[tuple[int, int, int], Document | None]] = {}
        self.last_failure: OSError | ValueError | None = None  # why the last write left something out

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.directory)!r}{'' if self.writable else ', writable=False'})"

    def _stamp(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.directory / name).stat()
        except (OSError, ValueError):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)  # os.replace gives every write a new inode

    def _format1(self, name: str) -> Document | None:
        """The page's format-1 file, if any (cached while it is unchanged)."""
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

    def fetch(
        self,
        name: str,
        keys: Collection[str] | None = None,
        *,
        max_names: int | None = None,
        expected: Identity | None = None,
    ) -> Document | None:
        directory = self.directory / pagedir.page_dir_name(name)
        old = self._format1(name)
        meta = self._meta(directory, expected)
        if old is not None and meta is not None and old.kernel.get("hash") != meta["kernel"].get("hash"):
            old = None  # a stale file of another kernel version beside the page: the page stands
        if meta is not None:
            kernel, platform = meta["kernel"], meta["platform"]
        elif old is not None:
            kernel, platform = old.kernel, old.platform
        else:
            return None
        index = None
        if keys is None:
            entries = pagedir.read_all(directory, meta) if meta is not None else {}
        elif not keys:
            entries = {}
            found = pagedir.list_keys(directory, meta, max_names) if meta is not None else set()
            index = frozenset(
                found | set(itertools.islice(old.entries if old is not None else (), max_names))
            )
        else:
            entries = pagedir.read_keys(directory, meta, keys) if meta is not None else {}
        return Document(kernel, platform, _under(entries, old, keys), index)

    def _meta(self, directory: Path, expected: Identity | None) -> dict[str, Any] | None:
        """The page's identity: its page.json's, or where that is unusable or absent, the one
        the caller expects (each key's file is still checked against it: the kernel's hash and
        the platform's id it records), page.json then rewritten where the store is writable."""
        if expected is None:
            return pagedir.read_meta(directory)
        meta, why = pagedir.read_page_file(directory)
        if meta is not None:
            return meta
        if not directory.is_dir():
            return None
        meta = {"kernel": dict(expected["kernel"]), "platform": dict(expected["platform"])}
        outcome = (
            f"This book is not written here, so it stays so: to rewrite it, {pagedir.repair_hint(directory)}."
        )
        if self.writable:
            try:
                pagedir.ensure_page(directory, meta)
                outcome = "It was rewritten (the unreadable one kept aside beside it)."
            except pagedir.LeaveAlone as exc:  # a newer tunebook's page.json, say
                outcome = f"It is left as it is: {exc}."
            except (OSError, ValueError) as exc:  # a read-only or full disk: the next write tries again
                why = why or "absent"
                outcome = f"It could not be rewritten ({exc}); the next write to this page tries again."
        if why is not None:  # an absent one rewritten is a page being created, or a person's rm: quiet
            warn_once(
                f"read:{directory / pagedir.PAGE_FILE}:expected",  # not the skip warning's tag
                DAMAGED_PAGE + " %s is unreadable (%s); the page's keys were read without "
                "it, each key's file checked against this kernel's hash and this platform's id. %s",
                directory / pagedir.PAGE_FILE,
                why,
                outcome,
            )
        return meta

    def merge(self, name: str, doc: Document) -> Document | None:
        return self.merge_partly(name, doc)[0]

    def merge_partly(
        self, name: str, doc: Document
    ) -> tuple[Document | None, dict[str, Entry], BaseException | None]:
        """``merge``, with the entries written even where it returns None (a write refused
        partway: a full disk at the 2nd of 3 keys has written the 1st), and why it refused
        (None where nothing was refused). Misses add up on merge: what was written must not
        be offered again."""
        written: dict[str, Entry] = {}
        if not self.writable:
            return None, written, None
        directory = self.directory / pagedir.page_dir_name(name)
        try:
            merged, left = pagedir.merge_entries(
                directory, {"kernel": doc.kernel, "platform": doc.platform}, doc.entries, written
            )
        except pagedir.LeaveAlone as exc:
            self.last_failure = exc
            warn_once(
                f"write:{directory}",
                "tunebook: leaving %s as it is: %s; results of this process are kept in memory only",
                directory,
                exc,
            )
            return None, written, exc
        except (OSError, ValueError) as exc:  # ValueError: a value JSON cannot hold (never expected)
            self.last_failure = exc
            warn_write_failure(self.directory, exc)
            return None, written, exc
        why: BaseException | None = None
        if left:  # left out of what is returned: the page offers those keys again later
            text, why = next(iter(left.items()))
            self.last_failure = why
            warn_once(
                f"write:{directory}:keys",
                "tunebook: leaving the file of key %s (and %d other key(s)) of %s as it is: %s; "
                "their results of this process are kept in memory, the other keys are written",
                text,
                len(left) - 1,
                directory,
                why,
            )
            if not merged:
                return None, written, why
        old = self._format1(name)
        if old is not None and old.kernel.get("hash") != doc.kernel.get("hash"):
            old = None
        return Document(doc.kernel, doc.platform, _under(merged, old, doc.entries)), written, why


def _under(entries: dict[str, Entry], old: Document | None, keys: Collection[str] | None) -> dict[str, Entry]:
    """``entries`` with a format-1 file's entries of the same keys standing under them."""
    if old is None:
        return entries
    out = dict(entries)
    for text in old.entries if keys is None else keys:
        below = old.entries.get(text)
        if below is not None:
            out[text] = out[text].merged_over(below) if text in out else below
    return out
