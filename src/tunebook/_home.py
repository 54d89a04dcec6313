"""Where a kernel's decisions are kept: its identity, its page of the book, the imported
tables it reads and the timers its tunings use.

Each is made once per autotuner, on first use, because each costs something a hit must
never pay: hashing the source and what it calls (~10 ms a kernel), opening the book,
reading imported tables, touching the GPU driver for timers. :class:`~tunebook.Autotuner`
holds one ``KernelHome`` and answers ``identity()``, ``page()``, ``imported_tables()`` and
``timers()`` from it. In a process that drives GPUs of several models, one per platform
(``_devices.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _buckets, _fingerprint
from ._bench import Timers, choose_timers
from ._book import Book, KernelIdentity, Page
from ._options import Options
from ._tables import TablePage, warn_if_unknown
from ._tables import load as load_tables

TimerSettings = Callable[[], tuple[Any, int | None, int | None, bool, bool]]
"""(do_bench, warmup, rep, use_cuda_graph, adaptive), read when the timers are first chosen:
Triton's attributes of the autotuner, which a caller may still change after decorating."""


class KernelHome:
    def __init__(self, fn: Any, keys: list[str], options: Options, timer_settings: TimerSettings) -> None:
        self._fn = fn
        self._keys = keys
        self._options = options
        self._timer_settings = timer_settings
        self.opened: Page | None = None  # the page, once opened
        self._kernel: KernelIdentity | None = None
        self._tables: dict[str, list[TablePage]] = {}
        self._looked_for_names = False  # whether a tables= name no import holds was looked into
        self._timer_choice: tuple[Callable[[], Timers], str] | None = None
        self._timers: Timers | None = None

    def sibling(self) -> KernelHome:
        """A home of this kernel on another platform (a host with GPUs of several models,
        ``_devices.py``): the kernel's identity is shared, its page, tables and timers are its own."""
        home = KernelHome(self._fn, self._keys, self._options, self._timer_settings)
        home._kernel = self.kernel_identity()
        return home

    def kernel_identity(self) -> KernelIdentity:
        """The kernel as a book names it (name, source hash, key names), whatever the platform."""
        if self._kernel is None:
            self._kernel = KernelIdentity(
                self._options.name or _fingerprint.kernel_name(self._fn),
                _fingerprint.kernel_hash(self._fn),
                _buckets.identity(self._keys),
            )
        return self._kernel

    def identity(self) -> _fingerprint.Identity:
        """The kernel on this platform; names the timer without making it (no GPU driver call)."""
        return _fingerprint.identify(self.kernel_identity(), self._timer_factory()[1])

    def page(self) -> Page:
        if self.opened is None:
            ident = self.identity()
            book = Book.from_env(self._options.book_dirs())
            self.opened = book.open(
                ident.kernel, {**ident.platform, "id": ident.platform_id}, ident.slug, ident.platform_id
            )
        return self.opened

    def imported_tables(self, device: str | None) -> list[TablePage]:
        tables = self._options.tables
        if tables is None:
            return []
        slot = "device" if device is not None else "all"
        if slot not in self._tables:
            directories = self.page().book.directories()
            self._tables[slot] = load_tables(tables, directories, device)
            if not any(self._tables.values()) and not self._looked_for_names:
                self._looked_for_names = True  # heads of every page: once a kernel
                warn_if_unknown(tables, directories, self.kernel_identity().name)
        return self._tables[slot]

    def _timer_factory(self) -> tuple[Callable[[], Timers], str]:
        if self._timer_choice is None:
            self._timer_choice = choose_timers(*self._timer_settings())
        return self._timer_choice

    def timers(self) -> Timers:
        if self._timers is None:
            self._timers = self._timer_factory()[0]()
        return self._timers
