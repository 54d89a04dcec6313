"""The book as the autotuner sees it: layers of stores, and one kernel's page over them.

Layers, in order of precedence: the writable directory (``TUNEBOOK_DIR``), the fleet's
Redis book (``TUNEBOOK_REDIS_URL``, when set), then each read-only directory
(``autotune(books=...)`` first, then ``TUNEBOOK_PATH``). For one key the layers' results
are united; where two layers measured the same config, the earlier layer stands.

Results are recorded into the writable layers (the directory, then Redis); what one of
them refuses is kept in memory and sent along with its next write, or at the interpreter's
exit (``write_refused_at_exit``; Redis's outbox sends its own); so are the serve-mode miss
records a directory refused (``write_misses``). What the page fetches
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

import atexit
import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import _settings
from .._forksafe import renew_in_child
from .._jsonio import key_text as _key_text
from .._jsonio import parse_key_texts, slug
from .._warnings import warn_once
from .files import why_not_writable, write_fix
from .pagedir import LeaveAlone, page_dir_name
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


# Pages one of whose writable layers refused results (``Layer.pending``), kept for the
# interpreter's exit, when ``write_refused_at_exit`` tries them once more: a process whose
# disk was full, or its directory read-only, for a moment near its end has no later write
# to carry them. (The Redis store's outbox does the same for its own: redis_store.py.)
_refused: dict[int, tuple[int, Page]] = {}  # id(page) -> (the pid that holds it, the page)
# Serve-mode miss records (``_misses.py``'s writer thread, through ``write_misses``) that a
# writable directory refused, per directory (``_where``: two autotuners of one kernel each
# have a store of their own) and page: sent along with a later miss record of the page, and
# once more at exit with the refused results. Before, they were dropped: the news
# ``tunebook tune --misses`` reads was lost without a word. Bounded in memory and in work:
# * at most MAX_HELD_MISS_KEYS keys are held per process (each with its call description,
#   ~10 kB with a grid per candidate); misses of further keys are counted only, for the
#   exit's warning (misses of a key already held add to its count);
# * a new miss is added to its page's held set in O(1) while the directory's last refusal
#   is less than MISS_RETRY_S old: the held set is offered again only on a miss after that
#   (it was re-merged and offered on every miss: 5.7 ms a miss at 20,000 held keys);
# * a refusal for good (read-only, permissions, a file in the directory's path: _FINAL) is
#   not retried before exit (once at exit), and the call descriptions are dropped: counts only.
MAX_HELD_MISS_KEYS = 4096
MISS_RETRY_S = 5.0
_FINAL = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


@dataclass
class _HeldMisses:
    """The serve-mode miss records one directory refused, in the process ``pid``."""

    pid: int
    store: BookStore
    # page name -> (the page's identity, an empty Document; key text -> entry held)
    pages: dict[str, tuple[Document, dict[str, Entry]]] = field(default_factory=dict)
    # page name -> what of it the writer thread is offering the store right now: counted at
    # exit (the 5 s flush gave up while the writer was mid-write, slow NFS, a busy lock),
    # where it was taken out of ``pages`` and neither retried nor counted.
    flying: dict[str, Document] = field(default_factory=dict)
    retry_at: float = 0.0  # time.monotonic() before which no write is offered
    why: BaseException | None = None  # its last refusal
    final: bool = False  # refused for good: nothing offered again, counts only kept
    over_keys: int = 0  # keys past MAX_HELD_MISS_KEYS, counted, not held (each time they missed)
    over_misses: int = 0


_held_misses: dict[str, _HeldMisses] = {}  # _where(store) -> what it refused
_held_keys = 0  # keys held in _held_misses, all directories and pages
_misses_lock = threading.Lock()


def _renew_held_misses() -> None:
    # A forked child: what is held is its parent's to write and count.
    global _misses_lock, _held_keys
    _misses_lock, _held_keys = threading.Lock(), 0
    _held_misses.clear()


renew_in_child(_renew_held_misses)
# At exit, no write is begun once this has passed: the clock is read before each batch of
# EXIT_BATCH keys (a key's write takes ~2 ms; its lock waits 0.2 s at most). Read at exit.
EXIT_WRITE_S = 5.0
EXIT_BATCH = 16


def write_misses(store: BookStore, name: str, doc: Document) -> bool:
    """Write serve-mode miss records ``doc`` into page ``name`` of ``store``, with those of the
    page it refused before; what it refuses now (or leaves out) is held for a later miss
    record of the page and the exit. While the directory's last refusal is recent (or was
    for good), ``doc`` is only added to what is held. True if ``doc`` was written."""
    global _held_keys
    where = _where(store)
    with _misses_lock:
        held = _held_misses.get(where)
        if held is not None and held.pid != os.getpid():  # a forked child's copy of its parent's
            del _held_misses[where]
            held = None
        if held is not None and (held.final or time.monotonic() < held.retry_at):
            _hold(held, name, doc, doc.entries)
            return False
        offer = doc
        if held is not None and name in held.pages:  # offered again with this record
            _, kept = held.pages.pop(name)
            _held_keys -= len(kept)
            for k, entry in doc.entries.items():
                kept[k] = entry.merged_over(kept.get(k))
            offer = replace(doc, entries=kept)
            held.flying[name] = offer
    written, why = _merge_partly(store, name, offer)
    left = {k: e for k, e in offer.entries.items() if k not in written}
    if held is not None:
        with _misses_lock:
            held.flying.pop(name, None)
            # The directory takes records again: forget it once nothing is held.
            if not left and not held.pages and not held.over_misses and _held_misses.get(where) is held:
                del _held_misses[where]
    if not left:
        return True
    with _misses_lock:
        held = _held_misses.get(where)
        if held is None or held.pid != os.getpid():
            held = _held_misses[where] = _HeldMisses(os.getpid(), store)
        held.store, held.why = store, why
        held.retry_at = time.monotonic() + MISS_RETRY_S
        if _refused_for_good(why) and not held.final:
            held.final = True
            for _, kept in held.pages.values():
                for k, entry in kept.items():
                    kept[k] = replace(entry, call=None)
        _hold(held, name, offer, left)
    return False


def _refused_for_good(why: BaseException | None) -> bool:
    """Whether no retry in this process's life is expected to get past ``why``."""
    return isinstance(why, OSError) and not isinstance(why, LeaveAlone) and why.errno in _FINAL


def _hold(held: _HeldMisses, name: str, doc: Document, entries: Mapping[str, Entry]) -> None:
    """Add ``entries`` (of page ``name``, whose identity ``doc`` carries) to ``held``, within
    MAX_HELD_MISS_KEYS keys; past that, count their misses. Under _misses_lock."""
    global _held_keys
    page = held.pages.get(name)
    if page is None:
        page = held.pages[name] = (replace(doc, entries={}), {})
    kept = page[1]
    for k, entry in entries.items():
        if held.final and entry.call is not None:
            entry = replace(entry, call=None)
        if k in kept:
            kept[k] = entry.merged_over(kept[k])
        elif _held_keys < MAX_HELD_MISS_KEYS:
            kept[k] = entry
            _held_keys += 1
        else:
            held.over_keys += 1
            held.over_misses += entry.misses
    if not kept:
        del held.pages[name]


def _merge_partly(store: BookStore, name: str, doc: Document) -> tuple[Collection[str], BaseException | None]:
    """Offer ``doc`` to ``store``: (the keys it wrote, even where it refused the rest partway,
    and why it refused, or None). A miss record's keys already written must not be offered
    again: their misses would add up twice."""
    partly = getattr(store, "merge_partly", None)
    if partly is not None:
        stored, written, why = partly(name, doc)
        return (stored.entries if stored is not None else written), why
    stored = store.merge(name, doc)
    if stored is None:
        return (), getattr(store, "last_failure", None)
    return stored.entries, None


def write_refused_at_exit(timeout_s: float | None = None) -> int:
    """At the interpreter's exit: write once more what the writable layers refused, and the
    serve-mode miss records a directory refused, EXIT_BATCH keys at a time
    until ``timeout_s`` (``EXIT_WRITE_S``) has passed, and say (once per directory) how many
    results and misses of how many keys stay unwritten, why and what to do. Returns how many
    results (misses not counted) stay unwritten."""
    global _held_keys
    deadline = time.monotonic() + (EXIT_WRITE_S if timeout_s is None else timeout_s)
    lost: dict[str, _Unwritten] = {}
    for pid, page in list(_refused.values()):
        if pid != os.getpid():  # a forked child's copy of its parent's: the parent's to write
            continue
        for layer in page.layers:
            if not layer.pending or getattr(layer.store, "keeps_unsent", False):
                continue
            _push_until(layer, page, deadline)
            if layer.pending:
                left = lost.setdefault(_where(layer.store), _Unwritten())
                left.keys += len(layer.pending)
                left.results += sum(len(e.results) for e in layer.pending.values())
                left.why = getattr(layer.store, "last_failure", None)
                left.said = False
    _refused.clear()
    with _misses_lock:
        me = os.getpid()
        held = [(h, list(h.flying.values())) for h in _held_misses.values() if h.pid == me]
        _held_misses.clear()
        _held_keys = 0
    for h, flying in held:
        for name, (identity, kept) in h.pages.items():
            # Once more, even after a refusal for good (counts only then): a directory made
            # writable again (a mount remounted) takes them; one refused batch ends it.
            rest, why = _push_misses_until(h.store, name, replace(identity, entries=kept), deadline)
            h.why = why or h.why
            if rest:
                left = lost.setdefault(_where(h.store), _Unwritten())
                left.said = left.said and h.final and _refused_for_good(why or h.why)
                left.miss_keys += len(rest)
                left.misses += sum(e.misses for e in rest.values())
                left.why = h.why
        for offer in flying:  # the writer's, still under way: not offered here again
            left = lost.setdefault(_where(h.store), _Unwritten())
            left.said = False
            left.flying_keys += len(offer.entries)
            left.flying_misses += sum(e.misses for e in offer.entries.values())
            left.why = left.why or h.why
        if h.over_misses:
            left = lost.setdefault(_where(h.store), _Unwritten())
            left.said = left.said and h.final
            left.over_keys += h.over_keys
            left.over_misses += h.over_misses
            left.why = left.why or h.why
    for where, left in sorted(lost.items()):
        if left.said:
            continue
        what = [f"{left.results} result(s) of {left.keys} key(s)"] if left.keys else []
        what += [f"{left.misses} serve-mode miss(es) of {left.miss_keys} key(s)"] if left.miss_keys else []
        if left.flying_keys:
            what.append(
                f"{left.flying_misses} serve-mode miss(es) of {left.flying_keys} key(s) still being "
                "written by the miss writer as the process exited"
            )
        if left.over_misses:
            what.append(
                f"{left.over_misses} serve-mode miss(es) not kept past the {MAX_HELD_MISS_KEYS} keys held"
            )
        then = ["the next run that meets those keys tunes them again"] if left.keys else []
        # A miss record is news for `tunebook tune --misses`: without it that command does not
        # see the key until another serve-mode process meets it.
        then += (
            ["`tunebook tune --misses` does not see those misses"]
            if left.miss_keys or left.over_misses or left.flying_keys
            else []
        )
        why = left.why
        warn_once(  # a BookWarning: the book lacks them until a person acts
            f"unwritten-at-exit:{where}",
            "tunebook: %s this process recorded were not written to the book "
            "directory %s: %s, and again at exit. They are lost with this process; %s. %s",
            " and ".join(what),
            where,
            "it refused them"
            if why is None
            else f"it refused them ({why})"
            if isinstance(why, LeaveAlone)
            else f"it refused them ({why_not_writable(Path(where), why)})",
            # A key left alone (a newer tunebook's file, or one past the size limit) still
            # reads as it did: only this process's news for it is lost.
            "what the book holds for those keys stands" if isinstance(why, LeaveAlone) else "; ".join(then),
            "" if why is None or isinstance(why, LeaveAlone) else write_fix(why),
        )
    return sum(left.results for left in lost.values())


@dataclass
class _Unwritten:
    """What stays unwritten at exit in one directory, and the last reason it gave."""

    keys: int = 0
    results: int = 0
    miss_keys: int = 0
    misses: int = 0
    over_keys: int = 0
    over_misses: int = 0
    flying_keys: int = 0
    flying_misses: int = 0
    why: BaseException | None = None
    # Whether all of it is miss records the directory refused for good: said already, at the
    # first (``files.warn_write_failure``), not said again at every exit (a pre-fork server's
    # every worker, with a read-only TUNEBOOK_DIR by design).
    said: bool = True


def _where(store: BookStore) -> str:
    return str(getattr(store, "directory", store))


def _push_misses_until(
    store: BookStore, name: str, doc: Document, deadline: float
) -> tuple[dict[str, Entry], BaseException | None]:
    """Offer the miss records ``doc`` to ``store`` again, EXIT_BATCH keys at a time, until a
    batch is refused or ``deadline`` has passed; returns what stays unwritten, and the last
    refusal (None where none)."""
    rest = dict(doc.entries)
    refused: list[BaseException] = []

    def offer(keys: list[str]) -> bool:
        written, why = _merge_partly(store, name, replace(doc, entries={k: rest[k] for k in keys}))
        for k in keys:
            if k in written:  # written before a refusal partway too: not counted unwritten
                del rest[k]
        if why is not None:
            refused.append(why)
        return why is None or isinstance(why, LeaveAlone)

    _in_batches(list(rest), deadline, offer)
    return rest, (refused[-1] if refused else None)


def _push_until(layer: Layer, page: Page, deadline: float) -> None:
    """Offer ``layer``'s refused keys to its store again, EXIT_BATCH at a time, until a batch
    is refused again or ``deadline`` has passed; what is not written stays pending."""

    def offer(batch: list[str]) -> bool:
        rest = {k: e for k, e in layer.pending.items() if k not in batch}
        layer.pending = {k: layer.pending[k] for k in batch}
        written = layer.push(page.file_name, {}, page)
        layer.pending = {**rest, **layer.pending}
        # Past keys left alone (which others do not share), but not past a refusal.
        return bool(written) or isinstance(getattr(layer.store, "last_failure", None), LeaveAlone)

    _in_batches(list(layer.pending), deadline, offer)


def _in_batches(keys: list[str], deadline: float, offer: Callable[[list[str]], bool]) -> None:
    """``offer`` EXIT_BATCH of ``keys`` at a time until it returns False (refused again: no use
    going on) or ``deadline`` has passed."""
    for start in range(0, len(keys), EXIT_BATCH):
        if time.monotonic() >= deadline or not offer(keys[start : start + EXIT_BATCH]):
            return


def forget_refused(pages: Iterable[Page]) -> None:
    """Drop what ``pages`` hold of refused results: their caller has kept them elsewhere
    (``tunebook tune``'s ``tunebook-unsaved-*``, or its own write into the book), so the
    exit neither writes them again nor calls them lost."""
    for page in pages:
        for layer in page.layers:
            if not getattr(layer.store, "keeps_unsent", False):
                layer.pending = {}
        _refused.pop(id(page), None)


atexit.register(write_refused_at_exit)


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
            _refused[id(page)] = (os.getpid(), page)
            return False
        # A key the store left out was not written (its file must be left alone): offered again.
        self.pending = {k: e for k, e in pending.items() if k not in stored.entries}
        if self.pending:
            _refused[id(page)] = (os.getpid(), page)
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
