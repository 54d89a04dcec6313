"""The book as the autotuner sees it: layers of stores, and one kernel's page over them.

Layers, in order of precedence: the writable directory (``TUNEBOOK_DIR``), the fleet's
Redis book (``TUNEBOOK_REDIS_URL``, when set), then each read-only directory
(``autotune(books=...)`` first, then ``TUNEBOOK_PATH``). For one key the layers' results
are united; where two layers measured the same config, the earlier layer stands.

Results are recorded into the writable layers (the directory, then Redis); what one of
them refuses is kept in memory and sent along with its next write, or at the interpreter's
exit (``unwritten.py``; Redis's outbox sends its own); so are the serve-mode miss records a
directory refused. What the page fetches
from Redis is copied into the writable directory, so the local book stands on its own when
Redis is gone. A page that was tuned from a shipped book's results carries them along.

Stores are consulted key by key: the first time a key is asked (:meth:`Page.get`), on a
miss that is about to tune (:meth:`Page.refresh`) and when a result is recorded
(:meth:`Page.record`), each time for that key only; the names of at most NAME_BUDGET keys
of each store are asked once per page, for nearest-key searches (:meth:`Page.key_names`).
Never on a hit, which the autotuner answers from memory. Opening a page reads nothing.

Thread safety: a Page is used under its autotuner's lock; Book is immutable; the Redis
store is shared per process and thread-safe itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import _settings
from .._jsonio import key_text as _key_text
from .._jsonio import parse_key_texts, slug
from .._warnings import warn_once
from . import unwritten
from .pagedir import page_dir_name
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


def _fingerprint(platform: Mapping[str, Any], *leave_out: str) -> dict[str, Any]:
    """A platform as a page records it, without its id (and the fields ``leave_out`` names)."""
    return {k: v for k, v in platform.items() if k not in ("id", *leave_out)}


def relation(
    kernel: KernelIdentity,
    platform: Mapping[str, Any],
    other_kernel: Mapping[str, Any],
    other_platform: Mapping[str, Any],
) -> str | None:
    """What another page (its kernel and platform records) is to the page of ``kernel`` on
    ``platform``, for serve mode's answers and re-tunes' seeds; None where it is neither:

    * "edited": this kernel's name and key names, another source hash, this platform;
    * "upgraded": this kernel's name and key names, this GPU and timer under another Triton
      release or runtime (the source hash differs there too: it covers Triton's own jitted
      functions);
    * "same_arch": this kernel version (name, key names, source hash) on another platform of
      this backend, GPU architecture and Triton release: another GPU model, or this GPU
      under another timer (under another runtime alone it is "upgraded").

    An upgraded page may also hold an edit: the source hash moves with the release, so the
    two cannot be told apart.
    """
    if other_kernel.get("name") != kernel.name or other_kernel.get("key") != list(kernel.key):
        return None
    if _fingerprint(other_platform) == _fingerprint(platform):
        return "edited" if other_kernel.get("hash") != kernel.source_hash else None
    if _fingerprint(other_platform, "triton", "runtime") == _fingerprint(platform, "triton", "runtime"):
        return "upgraded"
    compiler = ("backend", "arch", "triton")
    same_compiler = all(f in platform and other_platform.get(f) == platform[f] for f in compiler)
    return "same_arch" if same_compiler and other_kernel.get("hash") == kernel.source_hash else None


def _adds_to(entry: Entry, base: Entry | None) -> bool:
    """Whether merging ``entry`` under ``base`` (base stands) would change ``base``."""
    if base is None:
        return bool(entry.results)
    return any(
        cid not in base.results or (base.results[cid].quick and not result.quick)
        for cid, result in entry.results.items()
    )


# The configs a kernel declares: their ids, or a test of (id, stored config).
Declared = Collection[str] | Callable[[str, Mapping[str, Any]], bool]


def _only(entry: Entry, declared: Declared) -> Entry:
    """``entry`` with the results of ``declared`` configs only."""
    keep = declared if callable(declared) else (lambda cid, config: cid in declared)
    results = {cid: r for cid, r in entry.results.items() if keep(cid, r.config)}
    return replace(entry, results=results, chosen=entry.chosen if entry.chosen in results else "")


# How many key names a nearest-key search reads from each store of a page, once per page
# and process: a miss costs the same whatever the page's size (a 40,000-key page cost
# 159 ms of HKEYS on Redis, most of a 333 ms miss on a directory). A page of at most this
# many keys (every page we know of) is listed whole, so its nearest key is exact. A larger
# one is sampled: the first NAME_BUDGET names in the store's own order. That costs hint
# quality only, and it stays deterministic where issue 16 needs it (serve mode's "winner
# of the nearest remembered key" must be the same on every rank): the order is the
# store's, not the process's: one Redis hash, or one directory, lists the same names to
# every rank. Not a time budget: when it stopped would depend on the machine's load.
# Not covered: copies of a page of more than NAME_BUDGET keys on two file systems (a
# directory lists in its file system's order), which an index of names written beside
# the page would cover.
NAME_BUDGET = 2048


@dataclass
class Layer:
    """One store of a page, with what it held for the keys asked so far, and what it has yet
    to accept.

    ``role``: "local" (the writable directory: what shared layers add is copied into it),
    "shared" (a fleet's store, written too), or "shipped" (read-only).
    """

    store: BookStore
    role: str
    entries: dict[str, Entry] = field(default_factory=dict)
    pending: dict[str, Entry] = field(default_factory=dict)
    index: frozenset[str] | None = None

    @property
    def writable(self) -> bool:
        return self.role != "shipped"

    def push(self, name: str, news: Mapping[str, Entry], page: Page) -> bool:
        """Merge ``news`` (and anything refused before) into the store; False if it refused.

        A store that sends again what it refused itself (``keeps_unsent``: the Redis store's
        outbox, which retries after an outage without waiting for this page's next miss) is
        sent ``news`` only: sending what it holds again would count its misses twice."""
        if getattr(self.store, "keeps_unsent", False):
            stored = self.store.merge(name, page.document(news)) if news else None
            if stored is not None:
                self._take(stored, page)
            return stored is not None or not news
        pending = dict(self.pending)
        for k, entry in news.items():
            pending[k] = entry.merged_over(pending[k]) if k in pending else entry
        if not pending:
            return True
        stored = self.store.merge(name, page.document(pending))
        if stored is None:
            self.pending = pending
            unwritten.keep(page)
            return False
        # A key the store left out was not written (its file must be left alone): offered again.
        self.pending = {k: e for k, e in pending.items() if k not in stored.entries}
        if self.pending:
            unwritten.keep(page)
        self._take(stored, page)
        return True

    def waiting(self, name: str) -> Mapping[str, Entry]:
        """What the store has yet to take of page ``name``: the refused news this layer offers
        again with its next write, or what a store that sends it again itself holds."""
        if getattr(self.store, "keeps_unsent", False):
            return self.store.held(name)  # type: ignore[attr-defined]
        return self.pending

    def sync(self, name: str, keys: Collection[str], page: Page) -> None:
        """Catch up with the store on ``keys``: send what it refused before, then fetch them."""
        if self.pending:
            self.push(name, {}, page)
        stored = self.store.fetch(name, keys, expected=page.identity)
        if stored is not None:  # None: nothing there, or unusable now; what was read before stays valid
            self._take(stored, page)

    def keys(self, name: str, page: Page, fresh: bool = False) -> frozenset[str]:
        """The key texts the store holds (names only): at most NAME_BUDGET of them, asked once
        per page; every one, asked again, when ``fresh``. With what it read or was sent."""
        if self.index is None or fresh:
            stored = self.store.fetch(
                name, (), max_names=None if fresh else NAME_BUDGET, expected=page.identity
            )
            ok = (
                stored is not None and stored.index is not None and page.same_kernel(stored, repr(self.store))
            )
            self.index = (
                stored.index if ok and stored is not None and stored.index is not None else frozenset()
            )
        return self.index | self.entries.keys() | self.waiting(name).keys()

    def _take(self, stored: Document, page: Page) -> None:
        if page.same_kernel(stored, f"{self.store!r} {page.file_name}"):
            self.entries.update(stored.entries)


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
        self._readers: dict[Path, DirectoryStore] = {}

    @classmethod
    def from_env(cls, extra_readonly: Sequence[str | Path] = ()) -> Book:
        """The book the environment describes: TUNEBOOK_DIR, TUNEBOOK_REDIS_URL, then the
        read-only ``extra_readonly`` and TUNEBOOK_PATH."""
        from .redis_store import shared_store

        given = [(Path(p), "books=") for p in extra_readonly] + [
            (p, "TUNEBOOK_PATH") for p in _settings.book_path()
        ]
        for path, source in given:
            if not path.is_dir():  # a typo would otherwise only show as fallbacks in serve mode
                warn_once(
                    f"readonly:{path}",
                    "tunebook: the read-only book %s (from %s) %s, so no result is read from it; "
                    "check the path",
                    path,
                    source,
                    "does not exist" if not path.exists() else "is not a directory",
                )
        readonly = [path for path, _ in given]
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

    def reader(self, directory: Path) -> DirectoryStore:
        """A read-only store of one of the book's directories, kept: the hint searches read
        other pages at every tuned key, and the store keeps a format-1 page's parse while its
        file is unchanged (an old version's page of ~10 MB took ~2 s to read again)."""
        if directory not in self._readers:
            self._readers[directory] = DirectoryStore(directory, writable=False)
        return self._readers[directory]

    def open(self, kernel: KernelIdentity, platform: dict[str, Any], slug: str, platform_id: str) -> Page:
        return Page(self, kernel, platform, book_file_name(kernel, slug, platform_id))


class Page:
    """One kernel on one platform, merged over the book's layers, key by key.

    ``entries`` holds, per key asked so far, the union of the layers' results, the earlier
    layer standing per config. A key is read from the stores the first time it is asked
    (:meth:`get`), again before it is tuned (:meth:`refresh`) and when a result is recorded
    (:meth:`record`): each time that key only, never the whole book. A hit never gets here.
    """

    def __init__(self, book: Book, kernel: KernelIdentity, platform: dict[str, Any], file_name: str) -> None:
        self.book = book
        self.kernel = kernel
        self.platform = platform
        self.file_name = file_name
        self.path = book.directory / file_name if book.directory is not None else None
        self.layers = [Layer(store, role) for role, store in book.stores()]
        self.entries: dict[str, Entry] = {}
        self._asked: set[str] = set()
        self._parsed: dict[str, Any] = {}  # key text -> its key (key_names)

    def same_kernel(self, doc: Document, where: str) -> bool:
        if doc.kernel.get("hash") == self.kernel.source_hash:
            return True
        warn_once(f"read:{where}", "tunebook: skipping book %s: it belongs to another kernel version", where)
        return False

    @property
    def identity(self) -> dict[str, Any]:
        """``{"kernel", "platform"}`` as page.json holds them: what the stores are asked for (a
        store reads a page's keys by it when the page's own record is damaged)."""
        return {"kernel": self.kernel.to_json(), "platform": self.platform}

    def document(self, entries: Mapping[str, Entry]) -> Document:
        return Document(kernel=self.kernel.to_json(), platform=self.platform, entries=dict(entries))

    @property
    def local(self) -> BookStore | None:
        """The writable directory's store, if the book has one."""
        return next((layer.store for layer in self.layers if layer.role == "local"), None)

    def get(self, key_text: str, declared: Declared | None = None) -> Entry | None:
        """The key's entry over every layer (read from the stores the first time it is asked).

        ``declared``: the config ids the kernel declares; only their results are copied from
        a shared layer into the local one (see :meth:`refresh`).
        """
        if key_text not in self._asked:
            self.refresh(key_text, declared=declared)
        return self.entries.get(key_text)

    def settled(self, key_text: str) -> Entry | None:
        """The key's entry in the first read-only layer whose search ended with a choice
        (read with the key by :meth:`get`); None if no read-only layer has one."""
        for layer in self.layers:
            entry = layer.entries.get(key_text) if layer.role == "shipped" else None
            if entry is not None and entry.chosen:
                return entry
        return None

    def lookup(self, texts: Sequence[str]) -> list[Entry]:
        """The entries of ``texts`` that some layer holds, in that order (one fetch per layer)."""
        missing = [t for t in texts if t not in self._asked]
        if missing:
            self._sync(missing)
        return [self.entries[t] for t in texts if t in self.entries]

    def refresh(
        self, key_text: str | None = None, force: bool = False, declared: Declared | None = None
    ) -> None:
        """Catch up with other processes and hosts on ``key_text`` (before tuning it), or on
        every key asked so far. What the shared layers add is copied into the local one, of
        ``declared`` configs only when they are given (a fleet's results for configs this
        kernel does not declare are no business of this host's book). ``force`` is accepted
        for compatibility: changes are always seen."""
        self._sync([key_text] if key_text is not None else sorted(self._asked), declared)

    def _sync(self, texts: list[str], declared: Declared | None = None) -> None:
        self._asked.update(texts)
        for layer in self.layers:
            layer.sync(self.file_name, texts, self)
        self._copy_shared_to_local(texts, declared)
        self._compose(texts)

    def keys(self, fresh: bool = False) -> set[str]:
        """The key texts the layers hold (names only) and the keys asked so far: at most
        NAME_BUDGET names of each store, asked once per page, as nearest-key hints need no
        more; ``fresh`` asks every name again (the command line's listings, a sweep)."""
        found: set[str] = set(self.entries)
        for layer in self.layers:
            found |= layer.keys(self.file_name, self, fresh)
        return found

    def key_names(self) -> dict[str, Any]:
        """:meth:`keys`, each with its key parsed (None: not a key), for nearest-key searches.
        Each name is parsed once per page: a second miss parses only names it had not seen."""
        texts = self.keys()
        new = [t for t in texts if t not in self._parsed]
        if new:
            self._parsed.update(zip(new, parse_key_texts(new)))
        return {t: self._parsed[t] for t in texts}

    def _copy_shared_to_local(self, texts: Sequence[str], declared: Declared | None) -> None:
        local = next((layer for layer in self.layers if layer.role == "local"), None)
        if local is None:
            return
        news: dict[str, Entry] = {}
        for layer in self.layers:
            if layer.role != "shared":
                continue
            for k in texts:
                entry = layer.entries.get(k)
                if entry is not None and declared is not None:
                    entry = _only(entry, declared)
                if entry is not None and _adds_to(entry, local.entries.get(k)):
                    news[k] = news[k].merged_over(entry) if k in news else entry
        if news:
            local.push(self.file_name, news, self)

    def _compose(self, texts: Sequence[str]) -> None:
        """Rebuild ``entries`` of ``texts``: each layer over the ones after it, per config."""
        lower_first = [(layer.entries, layer.waiting(self.file_name)) for layer in reversed(self.layers)]
        for k in texts:
            composed: Entry | None = None
            for entries, waiting in lower_first:
                mine = entries.get(k)
                if k in waiting:
                    mine = waiting[k].merged_over(mine)
                if mine is not None:
                    composed = composed.merged_over(mine) if composed is not None else mine  # upper stands
            if composed is not None:
                self.entries[k] = composed

    def record(self, key_text: str, entry: Entry) -> Entry:
        """Persist ``entry`` in every writable layer; return the entry as it now stands.

        Each store merges it over what it holds (what is stored stands per config). What a
        store refuses is kept for this process and sent along with its next write.
        """
        self.record_many({key_text: entry})
        return self.entries.get(key_text, entry)

    def record_many(self, entries: Mapping[str, Entry]) -> None:
        """:meth:`record` for several keys in one request per layer (a sweep's driver gathers
        what arrived meanwhile)."""
        self._asked.update(entries)
        for layer in self.layers:
            if layer.writable:
                layer.push(self.file_name, entries, self)
        self._compose(list(entries))

    def unsaved(self) -> int:
        """How many results the writable directory refused (a read-only mount, a full disk):
        this process holds them, and offers them again with its next write and at its exit."""
        return sum(
            len(entry.results)
            for layer in self.layers
            if layer.role == "local"
            for entry in layer.pending.values()
        )

    def sibling_winners(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of the same kernel on other platforms, in any directory.

        Their winners are good first guesses for a search here (the best config moves
        less between GPUs than between shapes). Each sibling page is asked for this key
        only. The Redis book is not searched: that would mean a SCAN over the fleet's keys.
        """
        return [
            entry
            for where, doc, entry in self._other_pages(key, f"*--{self.kernel.id}--*")
            if self.same_kernel(doc, where)
        ]

    def renamed(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of this very kernel (source hash and key names) on this
        very platform, in pages under another kernel name, in any directory; newest first.

        The name a page is filed under is not part of what a result is matched by: the same
        function defined in a script run directly (``__main__.k``) and imported
        (``module.k``), or tuned under ``tunebook.autotune`` (its function's name) and then
        adopted by ``tunebook.patch()`` (``module.qualname``), is one kernel, and its results
        there are as exact as this page's own. As for siblings, each page is asked for this
        key only, and the Redis book is not searched.
        """
        found = [
            entry
            for _, doc, entry in self._other_pages(key, f"*--{self.kernel.id}--*--{self.platform.get('id')}*")
            if doc.kernel.get("hash") == self.kernel.source_hash
            and doc.kernel.get("key") == list(self.kernel.key)
            and doc.platform == self.platform
        ]
        return sorted(found, key=lambda entry: entry.updated_at, reverse=True)

    def same_arch_winners(self, key: Sequence[Any]) -> list[tuple[Entry, str]]:
        """(entry, where it was tuned) for this exact key of this kernel version on other
        platforms of this backend, GPU architecture and Triton release (``relation``
        "same_arch"), in any directory: this GPU's pages under another timer first, then
        other GPUs', each group newest first.

        A config of one such page was compiled by the same compiler for the same per-SM
        resources (one that still cannot compile for a call is set aside: ``_set_aside.py``),
        and its winner for the key is evidence about this GPU: another NVIDIA generation's
        fused-MoE tables cost 4-6% on average on an H200 against its own, vLLM's default
        rule up to 52% (BENCHMARKS.md, section 5). Serve mode answers a key this platform
        lacks with it, after this GPU's own evidence.
        """
        this_gpu: list[tuple[str, Entry, str]] = []
        other_gpu: list[tuple[str, Entry, str]] = []
        for _, doc, entry in self._other_pages(key, f"*--{self.kernel.id}--*"):
            if relation(self.kernel, self.platform, doc.kernel, doc.platform) != "same_arch":
                continue
            device = str(doc.platform.get("device", "?"))
            if device == self.platform.get("device"):
                timer, runtime = doc.platform.get("timer", "?"), doc.platform.get("runtime", "?")
                this_gpu.append((entry.updated_at, entry, f"this GPU under timer {timer}, {runtime}"))
            else:
                other_gpu.append((entry.updated_at, entry, f"{device} (arch {doc.platform.get('arch')})"))
        this_gpu.sort(key=lambda triple: triple[0], reverse=True)
        other_gpu.sort(key=lambda triple: triple[0], reverse=True)
        return [(entry, where) for _, entry, where in (*this_gpu, *other_gpu)]

    def other_versions(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of other versions of this kernel (the same name and key
        names) on this GPU, in any directory: another source hash on this platform first, then
        pages of this GPU and timer under another Triton release or CUDA/ROCm runtime (an
        upgrade usually moves both; the kernel id differs there too, as it covers Triton's own
        jitted functions); each group newest first.

        After an edit or a Triton upgrade the page starts empty, yet the old version's ranking
        for the same key on the same GPU is the best first guess there is: a re-tune measures
        its fastest configs first, so a small budget keeps what the old search found (and
        finds what changed). As for siblings, each page is asked for this key only, and the
        Redis book is not searched.
        """
        edited, upgraded = self.versions_on_this_gpu(key)
        return [*edited, *(entry for entry, _ in upgraded)]

    def versions_on_this_gpu(self, key: Sequence[Any]) -> tuple[list[Entry], list[tuple[Entry, str]]]:
        """:meth:`other_versions` in its two groups: (entries of another source hash on this
        platform, (entry, the Triton release and runtime it was tuned under) of this GPU and
        timer under another release or runtime), each newest first. Serve mode ranks them
        apart: an old release's winner for the key is better evidence than a neighbouring
        key's; an edited kernel's old winner is not."""
        own = page_dir_name(self.file_name)
        cut = own.find(f"--{self.kernel.id}--")
        if cut < 0:
            return [], []
        this_release: list[tuple[str, Entry]] = []
        other_release: list[tuple[str, Entry, str]] = []
        for _, doc, entry in self._other_pages(key, f"{own[:cut]}--*"):
            how = relation(self.kernel, self.platform, doc.kernel, doc.platform)
            if how == "edited":
                this_release.append((entry.updated_at, entry))
            elif how == "upgraded":
                tuned_under = f"Triton {doc.platform.get('triton', '?')}, {doc.platform.get('runtime', '?')}"
                other_release.append((entry.updated_at, entry, tuned_under))
        this_release.sort(key=lambda pair: pair[0], reverse=True)
        other_release.sort(key=lambda triple: triple[0], reverse=True)
        return [entry for _, entry in this_release], [(entry, under) for _, entry, under in other_release]

    def _other_pages(self, key: Sequence[Any], pattern: str) -> list[tuple[str, Document, Entry]]:
        """(page name, document, entry of ``key``) of every other page matching ``pattern``
        in the book's directories that holds ``key``."""
        found: list[tuple[str, Document, Entry]] = []
        text = _key_text(key)
        own = page_dir_name(self.file_name)
        for directory in self.book.directories():
            try:
                names = sorted({page_dir_name(p.name) for p in directory.glob(pattern)})
            except OSError:
                continue
            store = self.book.reader(directory)
            for name in names:
                if name == own or "." in name:  # ourselves; .corrupt-/.foreign- leftovers
                    continue
                doc = store.fetch(name + ".json", [text])
                if doc is not None and text in doc.entries:
                    found.append((str(directory / name), doc, doc.entries[text]))
        return found
