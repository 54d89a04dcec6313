"""The book as the autotuner sees it: layers of stores, and one kernel's page over them.

Layers, in order of precedence: the writable directory (``TUNEBOOK_DIR``), the fleet's
Redis book (``TUNEBOOK_REDIS_URL``, when set), then each read-only directory
(``autotune(books=...)`` first, then ``TUNEBOOK_PATH``). For one key the layers' results
are united; where two layers measured the same config, the earlier layer stands.

Results are recorded into the writable layers (the directory, then Redis); what one of
them refuses is kept in memory and sent along with its next write. What the page fetches
from Redis is copied into the writable directory, so the local book stands on its own when
Redis is gone. A page that was tuned from a shipped book's results carries them along.

Stores are consulted when a page opens, on a miss that is about to tune
(:meth:`Page.refresh`) and when a result is recorded (:meth:`Page.record`); never on a
hit, which the autotuner answers from memory.

Thread safety: a Page is used under its autotuner's lock; Book is immutable; the Redis
store is shared per process and thread-safe itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _settings
from .._jsonio import key_text as _key_text
from .._jsonio import slug
from .._warnings import warn_once
from .files import read_document
from .records import Document, Entry
from .stores import BookStore, DirectoryStore


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


def book_file_name(kernel: KernelIdentity, platform_slug: str, platform_id: str) -> str:
    """``<kernel name>--<kernel id>--<platform>--<platform id>.json``: one file per pair."""
    return f"{slug(kernel.name, 60, 'kernel')}--{kernel.id}--{slug(platform_slug, 40)}--{platform_id}.json"


def _adds_to(entry: Entry, base: Entry | None) -> bool:
    """Whether merging ``entry`` under ``base`` (base stands) would change ``base``."""
    if base is None:
        return bool(entry.results)
    return any(
        cid not in base.results or (base.results[cid].quick and not result.quick)
        for cid, result in entry.results.items()
    )


@dataclass
class Layer:
    """One store of a page, with what it held when last asked, and what it has yet to accept.

    ``role``: "local" (the writable directory: what shared layers add is copied into it),
    "shared" (a fleet's store, written too), or "shipped" (read-only).
    """

    store: BookStore
    role: str
    entries: dict[str, Entry] = field(default_factory=dict)
    pending: dict[str, Entry] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        return self.role != "shipped"

    def push(self, name: str, news: Mapping[str, Entry], page: Page) -> bool:
        """Merge ``news`` (and anything refused before) into the store; False if it refused."""
        pending = dict(self.pending)
        for k, entry in news.items():
            pending[k] = entry.merged_over(pending[k]) if k in pending else entry
        stored = self.store.merge(name, page.document(pending))
        if stored is None:
            self.pending = pending
            return False
        self.pending = {}
        self._take(stored, page)
        return True

    def sync(self, name: str, page: Page) -> None:
        """Catch up with the store: send what it refused before, else fetch."""
        if self.pending:
            self.push(name, {}, page)
            return
        stored = self.store.fetch(name)
        if stored is not None:  # None: nothing there, or unusable now; what was read before stays valid
            self._take(stored, page)

    def _take(self, stored: Document, page: Page) -> None:
        if page.same_kernel(stored, f"{self.store!r} {page.file_name}"):
            self.entries = dict(stored.entries)


class Book:
    """Where results live: one writable directory (or none), a shared Redis book (or none),
    and read-only directories, in that order of precedence.

    >>> import tempfile, pathlib
    >>> book = Book(pathlib.Path(tempfile.mkdtemp()), readonly=())
    >>> [layer_role for layer_role, _ in book.stores()]
    ['local']
    """

    def __init__(
        self, directory: Path | None, readonly: Sequence[Path] = (), shared: BookStore | None = None
    ) -> None:
        self.directory = directory
        self.readonly = tuple(readonly)
        self.shared = shared

    @classmethod
    def from_env(cls, extra_readonly: Sequence[str | Path] = ()) -> Book:
        """The book the environment describes: TUNEBOOK_DIR, TUNEBOOK_REDIS_URL, then the
        read-only ``extra_readonly`` and TUNEBOOK_PATH."""
        from .redis_store import shared_store

        readonly = [Path(p) for p in extra_readonly] + _settings.book_path()
        url = _settings.redis_url()
        return cls(_settings.book_dir(), readonly, shared_store(url) if url else None)

    def stores(self) -> list[tuple[str, BookStore]]:
        """(role, store) of every layer, in order of precedence."""
        layers: list[tuple[str, BookStore]] = []
        if self.directory is not None:
            layers.append(("local", DirectoryStore(self.directory)))
        if self.shared is not None:
            layers.append(("shared", self.shared))
        layers += [("shipped", DirectoryStore(d, writable=False)) for d in self.readonly]
        return layers

    def directories(self) -> list[Path]:
        """Every directory of the book, writable first."""
        return ([self.directory] if self.directory is not None else []) + list(self.readonly)

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
        self.layers = [Layer(store, role) for role, store in book.stores()]
        self.entries: dict[str, Entry] = {}
        self.refresh()

    def same_kernel(self, doc: Document, where: str) -> bool:
        if doc.kernel.get("hash") == self.kernel.source_hash:
            return True
        warn_once(f"read:{where}", "tunebook: skipping book %s: it belongs to another kernel version", where)
        return False

    def document(self, entries: Mapping[str, Entry]) -> Document:
        return Document(kernel=self.kernel.to_json(), platform=self.platform, entries=dict(entries))

    def refresh(self, force: bool = False) -> None:
        """Catch up with other processes and hosts: before tuning a key this page lacks.

        Every layer is asked again (a directory re-reads its file only if it changed; a
        server whose breaker is open costs nothing); what the shared layers add is copied
        into the local one. ``force`` is accepted for compatibility: changes are always seen.
        """
        for layer in self.layers:
            layer.sync(self.file_name, self)
        self._copy_shared_to_local()
        self._compose()

    def _copy_shared_to_local(self) -> None:
        local = next((layer for layer in self.layers if layer.role == "local"), None)
        if local is None:
            return
        news: dict[str, Entry] = {}
        for layer in self.layers:
            if layer.role != "shared":
                continue
            for k, entry in layer.entries.items():
                if _adds_to(entry, local.entries.get(k)):
                    news[k] = news[k].merged_over(entry) if k in news else entry
        if news:
            local.push(self.file_name, news, self)

    def _compose(self) -> None:
        """Rebuild ``entries``: each layer over the ones after it, per config."""
        entries: dict[str, Entry] = {}
        for layer in reversed(self.layers):
            mine = dict(layer.entries)
            for k, entry in layer.pending.items():
                mine[k] = entry.merged_over(mine.get(k))
            for k, entry in mine.items():
                below = entries.get(k)
                entries[k] = below.merged_over(entry) if below is not None else entry  # upper layer stands
        self.entries = entries

    def get(self, key_text: str) -> Entry | None:
        return self.entries.get(key_text)

    def record(self, key_text: str, entry: Entry) -> Entry:
        """Persist ``entry`` in every writable layer; return the entry as it now stands.

        Each store merges it over what it holds (what is stored stands per config). What a
        store refuses is kept for this process and sent along with its next write.
        """
        self.record_many({key_text: entry})
        return self.entries.get(key_text, entry)

    def record_many(self, entries: Mapping[str, Entry]) -> None:
        """:meth:`record` for several keys in one write per layer (a sweep's driver gathers
        what arrived meanwhile: each write of a large page rewrites the whole file)."""
        for layer in self.layers:
            if layer.writable:
                layer.push(self.file_name, entries, self)
        self._compose()

    def sibling_winners(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of the same kernel on other platforms, in any directory.

        Their winners are good first guesses for a search here (the best config moves
        less between GPUs than between shapes). The Redis book is not searched: that
        would mean a SCAN over the fleet's keys on a miss.
        """
        found: list[Entry] = []
        text = _key_text(key)
        for directory in self.book.directories():
            try:
                paths = sorted(directory.glob(f"*--{self.kernel.id}--*.json"))
            except OSError:
                continue
            for path in paths:
                if path.name == self.file_name:
                    continue
                doc = read_document(path)
                if doc is not None and self.same_kernel(doc, str(path)) and text in doc.entries:
                    found.append(doc.entries[text])
        return found
