"""How a sweep's driver writes results into the book: queued as they arrive, written a page
at a time, often enough that a killed driver loses little (its workers' journals hold the
rest) and seldom enough that writing never becomes the driver's main work."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .._book import Book, Entry, KernelIdentity, Page, Result, book_file_name, now_iso
from .._version import __version__
from .schedule import KeySearch

# The driver writes the book at most this often (every result is written: later ones in one go).
FLUSH_S = 0.5

OnResult = Callable[[dict[str, Any], Page, str, str, Sequence[Any], Result], None]


class Pages:
    """The driver's book pages, one per (kernel books, page file), opened once."""

    def __init__(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        self.jobs = jobs
        self.pages: dict[tuple[tuple[str, ...], str], Page] = {}

    def of(self, key: KeySearch) -> Page:
        assert key.plan is not None
        books = tuple(str(b) for b in self.jobs[key.job].get("books", ()))
        spec = key.plan.page
        kernel = spec["kernel"]
        identity = KernelIdentity(str(kernel["name"]), str(kernel["hash"]), tuple(kernel["key"]))
        name = (books, book_file_name(identity, str(spec["slug"]), str(spec["platform_id"])))
        if name not in self.pages:
            self.pages[name] = Book.from_env(books).open(
                identity, dict(spec["platform"]), str(spec["slug"]), str(spec["platform_id"])
            )
        return self.pages[name]


class BookWriter:
    def __init__(self, jobs: Sequence[dict[str, Any]], on_result: OnResult | None) -> None:
        self.jobs = jobs
        self.pages = Pages(jobs)
        self.on_result = on_result
        self.unwritten: dict[Page, dict[str, Entry]] = {}
        self.flushed = 0.0
        self.flush_gap = FLUSH_S

    def queue(self, key: KeySearch, fresh: dict[str, Result], chosen: str | None, seconds: float) -> None:
        """Queue news for the book; :meth:`flush` writes them."""
        plan = key.plan
        assert plan is not None
        page = self.pages.of(key)
        stamp = now_iso()
        entry = Entry(
            key=plan.key,
            results=fresh,
            tuning_seconds=seconds,
            tuned_at=stamp,
            updated_at=stamp,
            tunebook=__version__,
            chosen=chosen or "",
            first=plan.ids[0] if plan.ids else "",
            reopens=key.reopens,
        )
        news = self.unwritten.setdefault(page, {})
        before = news.get(plan.key_text)
        news[plan.key_text] = entry.merged_over(before) if before is not None else entry
        if chosen is not None:
            news[plan.key_text] = replace(news[plan.key_text], chosen=chosen)
        if self.on_result is not None:
            for cid, result in fresh.items():
                self.on_result(self.jobs[key.job], page, plan.key_text, cid, plan.key, result)

    def flush(self, force: bool = False) -> None:
        """Write what arrived since the last write, one write per page. Each write of a page
        rewrites its file (merge-on-write), so a driver taking results from many GPUs writes
        at most every FLUSH_S, or twice as long as the last write took (a large page): the
        more results arrive, the more each write carries, and the driver spends at most a
        third of its time writing."""
        if not self.unwritten or (not force and time.monotonic() - self.flushed < self.flush_gap):
            return
        start = time.monotonic()
        unwritten, self.unwritten = self.unwritten, {}
        for page, entries in unwritten.items():
            page.record_many(entries)
        self.flushed = time.monotonic()
        self.flush_gap = max(FLUSH_S, 2 * (self.flushed - start))
