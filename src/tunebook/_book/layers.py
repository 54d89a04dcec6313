"""The book as the autotuner sees it: a writable directory, a fleet's Redis, read-only ones.

Lookup order: the writable directory (``TUNEBOOK_DIR``), then the shared fleet book in
Redis (``TUNEBOOK_REDIS_URL``, when set), then each read-only directory
(``autotune(books=...)`` first, then ``TUNEBOOK_PATH``) in order. For one key the layers'
results are united; where two layers measured the same config, the earlier layer stands.

Results are written to the writable directory and then merged into Redis (what Redis
already holds stands there, as on disk). A page that was tuned from a shipped book's
results carries them along, and what a page fetches from Redis is copied into the
writable directory, so the writable book stands on its own when Redis is gone.

Redis is consulted when a page opens, on a miss that is about to tune
(:meth:`Page.refresh`) and after a result is recorded (:meth:`Page.record`); never on a
hit, which the autotuner answers from memory. A slow or dead Redis costs those calls at
most the store's short timeouts, then nothing while its breaker is open (see
redis_store.py).

Thread safety: a Page is used under its autotuner's lock; Book is immutable; the shared
stores are cached per process under a lock and are thread-safe themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _settings
from .files import merge_write, read_document, warn_once
from .records import Document, Entry, _json_scalar

if TYPE_CHECKING:
    from .redis_store import RedisStore

# One store per (process, URL): every page of a process shares its connection pool and,
# above all, its breaker, so an outage is detected, logged and waited out once, not once
# per kernel. Keyed by pid too, so a forked child builds its own instead of inheriting
# a lock or breaker state from its parent.
_shared_stores: dict[tuple[int, str], RedisStore | None] = {}
_shared_lock = threading.Lock()


def shared_store(url: str) -> RedisStore | None:
    """This process's store for the Redis book at ``url``; None if redis-py is missing.

    A missing redis-py is reported once (with the ``pip install`` line) and the book goes
    on without its shared layer: a deployment mistake must not fail kernel calls.
    """
    cache_key = (os.getpid(), url)
    with _shared_lock:
        if cache_key not in _shared_stores:
            from .redis_store import RedisStore  # deferred: redis-py is an optional extra

            try:
                _shared_stores[cache_key] = RedisStore(url)
            except ImportError as exc:
                warn_once(
                    f"redis-import:{url}",
                    "tunebook: TUNEBOOK_REDIS_URL is set but the shared book cannot be used: %s "
                    "Carrying on with the local book only.",
                    exc,
                )
                _shared_stores[cache_key] = None
        return _shared_stores[cache_key]


def _adds_to(entry: Entry, base: Entry | None) -> bool:
    """Whether merging ``entry`` under ``base`` (base stands) would change ``base``."""
    if base is None:
        return bool(entry.results)
    return any(
        cid not in base.results or (base.results[cid].quick and not result.quick)
        for cid, result in entry.results.items()
    )


@dataclass(frozen=True)
class KernelIdentity:
    """A kernel as the book knows it: its name (for people), source hash and key names."""

    name: str
    source_hash: str
    key: tuple[str, ...]

    @property
    def id(self) -> str:
        text = json.dumps([self.source_hash, list(self.key)], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "hash": self.source_hash, "key": list(self.key), "id": self.id}


def _slug(text: str, limit: int) -> str:
    return (re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-") or "kernel")[:limit]


def book_file_name(kernel: KernelIdentity, platform_slug: str, platform_id: str) -> str:
    """``<kernel name>--<kernel id>--<platform>--<platform id>.json``: one file per pair."""
    return f"{_slug(kernel.name, 60)}--{kernel.id}--{_slug(platform_slug, 40)}--{platform_id}.json"


class Book:
    """Where results live: one writable directory (or none), a shared Redis book (or none),
    and read-only directories, in that order of precedence.

    >>> import tempfile, pathlib
    >>> book = Book(pathlib.Path(tempfile.mkdtemp()), readonly=())
    >>> book.directory is not None and book.shared is None
    True
    """

    def __init__(
        self, directory: Path | None, readonly: Sequence[Path] = (), shared: RedisStore | None = None
    ) -> None:
        self.directory = directory
        self.readonly = tuple(readonly)
        self.shared = shared

    @classmethod
    def from_env(cls, extra_readonly: Sequence[str | Path] = ()) -> Book:
        """The book the environment describes: TUNEBOOK_DIR, TUNEBOOK_REDIS_URL, then the
        read-only ``extra_readonly`` and TUNEBOOK_PATH."""
        readonly = [Path(p) for p in extra_readonly] + _settings.book_path()
        url = _settings.redis_url()
        return cls(_settings.book_dir(), readonly, shared_store(url) if url else None)

    def open(self, kernel: KernelIdentity, platform: dict[str, Any], slug: str, platform_id: str) -> Page:
        return Page(self, kernel, platform, book_file_name(kernel, slug, platform_id))


class Page:
    """One kernel on one platform, merged over the book's layers.

    ``entries`` is what the autotuner reads: per key, the union of the layers' results,
    the earlier layer standing per config. It changes only when the page opens,
    :meth:`refresh` or :meth:`record` is called; :meth:`get` never does I/O.
    """

    def __init__(self, book: Book, kernel: KernelIdentity, platform: dict[str, Any], file_name: str) -> None:
        self.book = book
        self.kernel = kernel
        self.platform = platform
        self.file_name = file_name
        self.path = book.directory / file_name if book.directory is not None else None
        self._readonly_entries: dict[str, Entry] = {}
        for directory in book.readonly:
            doc = self._read(directory / file_name)
            if doc is not None:
                for k, entry in doc.entries.items():
                    self._readonly_entries[k] = entry.merged_over(self._readonly_entries.get(k))
        self._stamp: tuple[int, int, int] | None = None
        self._file_entries: dict[str, Entry] = {}  # the writable file as last read or written
        self._unsaved: dict[str, Entry] = {}  # recorded, but the writable file refused them
        # The Redis book as last fetched or merged into. Kept here as well as copied into
        # the writable file, so a page with no writable directory still serves them.
        self._shared_entries: dict[str, Entry] = {}
        self._unshared: dict[str, Entry] = {}  # recorded while Redis was unreachable
        self.entries: dict[str, Entry] = {}
        self.refresh(force=True)

    def _read(self, path: Path) -> Document | None:
        doc = read_document(path)
        if doc is not None and not self._same_kernel(doc, str(path)):
            return None
        return doc

    def _same_kernel(self, doc: Document, where: str) -> bool:
        if doc.kernel.get("hash") == self.kernel.source_hash:
            return True
        warn_once(f"read:{where}", "tunebook: skipping book %s: it belongs to another kernel version", where)
        return False

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)  # os.replace gives every write a new inode

    def refresh(self, force: bool = False) -> None:
        """Catch up with other processes: before tuning a key this page lacks.

        Fetches the Redis book (another host may have tuned the key; results this process
        could not send earlier go along), copies what it adds into the writable file, and
        re-reads that file if another process changed it since we last looked (always,
        with ``force``). Costs nothing on the network while the store's breaker is open.
        """
        self._sync_shared()
        stamp = self._file_stamp()
        if force or stamp != self._stamp:
            self._stamp = stamp
            doc = self._read(self.path) if self.path is not None and stamp is not None else None
            self._file_entries = dict(doc.entries) if doc else {}
        self._save_fetched()
        self._compose()

    def _sync_shared(self) -> None:
        """Refresh ``_shared_entries`` from Redis; on failure keep what was fetched before."""
        store = self.book.shared
        if store is None:
            return
        if self._unshared:  # a merge answers with the whole stored document, as a fetch does
            stored = store.merge(self.file_name, self._document(self._unshared))
            if stored is not None:
                self._unshared = {}
        else:
            stored = store.fetch(self.file_name)
        if stored is not None and self._same_kernel(stored, f"{store.url} {self.file_name}"):
            self._shared_entries = dict(stored.entries)

    def _save_fetched(self) -> None:
        """Copy into the writable file what Redis holds and it lacks (what is local stands)."""
        news = {k: e for k, e in self._shared_entries.items() if _adds_to(e, self._file_entries.get(k))}
        if not news or self.path is None:
            return
        for k, entry in self._unsaved.items():  # an earlier failed write gets another chance
            news[k] = news[k].merged_over(entry) if k in news else entry
        merged = merge_write(self.path, self._document(news))
        if merged is not None:
            self._unsaved = {}
            self._stamp = self._file_stamp()
            self._file_entries = dict(merged.entries)

    def _document(self, entries: Mapping[str, Entry]) -> Document:
        return Document(kernel=self.kernel.to_json(), platform=self.platform, entries=dict(entries))

    def _compose(self) -> None:
        """Rebuild ``entries``: writable over shared over read-only, per config."""
        writable = dict(self._file_entries)
        for k, entry in self._unsaved.items():
            writable[k] = entry.merged_over(writable.get(k))
        entries = dict(self._readonly_entries)
        for layer in (self._shared_entries, writable):
            for k, entry in layer.items():
                below = entries.get(k)
                entries[k] = below.merged_over(entry) if below is not None else entry
        self.entries = entries

    def sibling_winners(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of the same kernel on other platforms, in any directory.

        Their winners are good first guesses for a search here (the best config moves
        less between GPUs than between shapes). The Redis book is not searched: that
        would mean a SCAN over the fleet's keys on a miss.
        """
        found: list[Entry] = []
        key_text = json.dumps([_json_scalar(v) for v in key], separators=(",", ":"))
        directories = ([self.book.directory] if self.book.directory is not None else []) + list(
            self.book.readonly
        )
        for directory in directories:
            try:
                paths = sorted(directory.glob(f"*--{self.kernel.id}--*.json"))
            except OSError:
                continue
            for path in paths:
                if path.name == self.file_name:
                    continue
                doc = self._read(path)
                if doc is not None and key_text in doc.entries:
                    found.append(doc.entries[key_text])
        return found

    def get(self, key_text: str) -> Entry | None:
        return self.entries.get(key_text)

    def record(self, key_text: str, entry: Entry) -> Entry:
        """Persist ``entry`` locally, then share it, and return the entry as it now stands.

        The writable file merges it over what is on disk; then Redis merges it over what
        it holds (in both, what is already stored stands per config). Whatever could not
        be written is kept in memory for this process and goes along with the next write
        that can be made, locally and to Redis alike.
        """
        entries = dict(self._unsaved)
        entries[key_text] = entry.merged_over(entries.get(key_text)) if key_text in entries else entry
        merged = merge_write(self.path, self._document(entries)) if self.path is not None else None
        if merged is None:
            self._unsaved = entries
        else:
            self._unsaved = {}
            self._stamp = self._file_stamp()
            self._file_entries = dict(merged.entries)
        self._share(key_text, entry)
        self._compose()
        return self.entries[key_text]

    def _share(self, key_text: str, entry: Entry) -> None:
        store = self.book.shared
        if store is None:
            return
        pending = dict(self._unshared)
        pending[key_text] = entry.merged_over(pending.get(key_text)) if key_text in pending else entry
        stored = store.merge(self.file_name, self._document(pending))
        if stored is None:
            self._unshared = pending  # Redis is down (or refused): send it with the next merge
            return
        self._unshared = {}
        if self._same_kernel(stored, f"{store.url} {self.file_name}"):
            self._shared_entries = dict(stored.entries)
