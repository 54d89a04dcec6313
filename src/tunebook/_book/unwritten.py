"""What a book's writable directories refused, kept for a later write and the interpreter's exit.

Two kinds of news can be refused by a store (a full disk, a read-only directory, a file
left alone): a page's results (``pages.Layer.pending``, sent along with its next write; the
pages holding some are registered here with :func:`keep`), and serve-mode miss records
(``_misses.py``'s writer thread, through :func:`write_misses`), held here per directory and
page. At the interpreter's exit :func:`write_refused_at_exit` offers both once more, within
``EXIT_WRITE_S``, and says once per directory what stays unwritten, why and what to do.
:func:`forget_refused` drops what a caller kept elsewhere (``tunebook tune``). The Redis
store's outbox keeps and sends its own (``redis_store.py``).

Thread safety: the miss records are held under one lock (the writer thread and the exit);
a page's pending results are its autotuner's, used under that autotuner's lock.
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .._forksafe import renew_in_child
from .._warnings import warn_once
from .files import why_not_writable, write_fix
from .pagedir import LeaveAlone
from .records import Document, Entry
from .stores import BookStore

if TYPE_CHECKING:
    from .pages import Layer, Page

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


def keep(page: Page) -> None:
    """Register ``page``, one of whose layers holds refused results, for the exit's write."""
    _refused[id(page)] = (os.getpid(), page)


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
