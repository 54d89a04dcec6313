"""Reading books for the command line: a directory or one file, with reasons for what is skipped.

The library's reader warns once and moves on, which is right inside a kernel call; a
person at a terminal wants to see every skipped file and why, so the CLI reads files
itself with the same parser (``Document.from_json``) and keeps the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._book import (
    BookWarning,
    DirectoryStore,
    Document,
    Entry,
    KernelIdentity,
    book_file_name,
    pagedir,
    read_book_file,
)
from .._book.records import NEWER
from .._book.stores import DAMAGED_PAGE
from .._errors import UnreadableBookFile
from .._fingerprint import platform_id, platform_slug
from .._warnings import UNREADABLE_RECORD
from ._summary import key_order, sorted_entries

# The mark of a page directory ``prune`` renamed before deleting it: a dot, so no reader takes
# it for a page; one an interrupted prune left is a leftover the next prune removes.
PRUNING = ".pruning-"

# Each kind of leftover in a book directory, by the exact name tunebook gives it (a person's
# "notes.corrupt-keep" is none: prune once deleted anything with the mark in its name) and
# whether it is a directory: what it is, and whether ``prune`` removes it (a ``.foreign-``
# page holds another kernel's readable results).
_STAMP = r"\d{8}T\d{6}-\d+"  # <time>-<pid>, as pagedir writes them
LEFTOVERS: dict[re.Pattern[str], tuple[bool | None, str, bool]] = {
    re.compile(rf".+\.corrupt-{_STAMP}"): (None, "an unreadable book kept aside by an earlier write", True),
    re.compile(rf".+{re.escape(PRUNING)}\d+"): (True, "a page an interrupted prune was deleting", True),
    re.compile(rf".+\.foreign-{_STAMP}"): (
        True,
        "another kernel's page found under this name and kept aside",
        False,
    ),
}


def leftover_kind(path: Path) -> tuple[str, bool] | None:
    """(what the leftover ``path`` is, whether ``prune`` removes it); None: no leftover of ours."""
    is_dir = path.is_dir() and not path.is_symlink()
    for pattern, (directory, what, pruned) in LEFTOVERS.items():
        # None: either (a write keeps aside whatever sits at a file's name, a directory too)
        if pattern.fullmatch(path.name) and directory in (None, is_dir):
            return what, pruned
    return None


@dataclass(frozen=True)
class Page:
    """One readable book file: a kernel on a platform.

    ``streamed``: a format-2 page read for its kernel and platform only (``doc.entries`` is
    empty); :func:`page_entries` reads its keys one at a time (``load(..., stream=True)``).
    """

    path: Path
    doc: Document
    streamed: bool = False

    @property
    def kernel_name(self) -> str:
        return str(self.doc.kernel.get("name", "?"))

    @property
    def identity(self) -> KernelIdentity:
        return identity_of(self.doc)

    @property
    def platform_id(self) -> str:
        return platform_id_of(self.doc.platform)

    @property
    def platform_label(self) -> str:
        return platform_label(self.doc.platform)

    @property
    def canonical_name(self) -> str:
        """The file name tunebook itself would give this page (inputs may have been renamed)."""
        return canonical_file_name(self.doc)


@dataclass
class Loaded:
    """What a BOOK argument held: readable pages, skipped files with reasons, leftovers, and
    empty pages (``pagedir.is_empty_page``: an older tunebook killed while it created them),
    which hold nothing to read and are no error."""

    source: Path
    pages: list[Page] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)

    def leftover_kinds(self) -> Iterator[tuple[Path, str, bool]]:
        """Each leftover with what it is and whether ``prune`` removes it (one gone or
        replaced since the listing is left out)."""
        for path in self.leftovers:
            kind = leftover_kind(path)
            if kind is not None:
                yield path, *kind


def identity_of(doc: Document) -> KernelIdentity:
    key = doc.kernel.get("key", [])
    return KernelIdentity(
        str(doc.kernel.get("name", "kernel")),
        str(doc.kernel["hash"]),
        tuple(str(k) for k in key) if isinstance(key, list) else (),
    )


def platform_id_of(platform: dict[str, Any]) -> str:
    """The platform's id as the autotuner computes it: a hash of the fingerprint without "id"."""
    return platform_id({k: v for k, v in platform.items() if k != "id"})


def platform_label(platform: dict[str, Any]) -> str:
    """Enough for a person to tell platforms apart: every field of the fingerprint but the
    backend, which the name and arch imply (pages under two CUDA runtimes, or of two SKUs
    sharing a name, looked alike without the runtime and SM count).

    >>> platform_label({"backend": "cuda", "device": "NVIDIA H200", "arch": "90", "runtime": "cuda 12.8",
    ...                 "sm_count": 132, "triton": "3.6.0", "timer": "events"})
    'NVIDIA-H200-90 (cuda 12.8, 132 SMs, triton 3.6.0, timer events)'
    """
    fp = {k: v for k, v in platform.items() if k != "id"}
    extras = [str(fp["runtime"])] if fp.get("runtime") else []
    extras += [f"{fp['sm_count']} SMs"] if fp.get("sm_count") else []
    extras += [f"{k} {fp[k]}" for k in ("triton", "timer") if fp.get(k)]
    slug = platform_slug(fp)
    return f"{slug} ({', '.join(extras)})" if extras else slug


def canonical_file_name(doc: Document) -> str:
    fp = {k: v for k, v in doc.platform.items() if k != "id"}
    return book_file_name(identity_of(doc), platform_slug(fp), platform_id(fp))


def parse_file(path: Path) -> tuple[Document | None, str | None]:
    """(document, None) or (None, why it cannot be read)."""
    doc, why = read_book_file(path)  # the library's own strict reader
    if doc is None and why is None:
        why = "the file vanished while it was being read"
    return doc, why


@contextlib.contextmanager
def skipped_as(path: Path) -> Iterator[list[tuple[Path, str]]]:
    """The BookWarnings raised inside, as ``(path, reason)`` in the list it yields (filled on
    leaving), instead of shown: a command lists what it skipped in its own words."""
    skipped: list[tuple[Path, str]] = []
    logger = logging.getLogger("tunebook")
    quiet = _SkippedFilesFilter()  # the command says each once, its own way: not the log too
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BookWarning)
            yield skipped
    finally:
        logger.removeFilter(quiet)
    for w in caught:
        if isinstance(w.message, UnreadableBookFile):  # the file itself, and why in a few words
            skipped.append((Path(w.message.path), w.message.reason))
        elif issubclass(w.category, BookWarning):
            skipped.append((path, str(w.message)))


class _SkippedFilesFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, UNREADABLE_RECORD, False)


def parse_page(directory: Path) -> tuple[Document | None, list[tuple[Path, str]]]:
    """A format-2 page directory (with a format-1 file of the same name beside it, if any):
    (the whole document or None, every file skipped with its reason)."""
    with skipped_as(directory) as skipped:
        doc = DirectoryStore(directory.parent, writable=False).fetch(directory.name + ".json")
    if doc is None and not skipped:
        skipped.append((directory, f"no readable {pagedir.PAGE_FILE} in it"))
    return doc, skipped


def parse_page_meta(directory: Path) -> tuple[Document | None, list[tuple[Path, str]]]:
    """A format-2 page directory's kernel and platform, without its keys (see parse_page)."""
    with skipped_as(directory) as skipped:
        meta = pagedir.read_meta(directory)
    if meta is None:
        if not skipped:
            skipped.append((directory, f"no readable {pagedir.PAGE_FILE} in it"))
        return None, skipped
    return Document(meta["kernel"], meta["platform"]), skipped


def page_entries(page: Page) -> tuple[int, Iterator[tuple[int, Entry]]]:
    """(how many keys, each entry with its position, one at a time in natural key order):
    a streamed page's keys are listed by name (cheap) and each key is read when the
    iterator reaches it, so that a caller that keeps what it needs of each holds one entry
    at a time. A key file that cannot be read is skipped with a BookWarning: its position
    is then missing, and the count (of key names) is above the entries yielded."""
    if not page.streamed:
        entries = sorted_entries(page.doc)
        return len(entries), enumerate(entries)
    meta = {"kernel": page.doc.kernel, "platform": page.doc.platform}
    # Sorted by name, then by natural order: the order sorted_entries gives a whole page
    # (read_all lists keys by name; the sort is stable), so that ties fall the same way.
    # A key's files under other names (a copy, a name not UTF-8) are read with it (key_files).
    files = pagedir.key_files(page.path, meta)
    texts = sorted(sorted(files), key=_natural)

    def read() -> Iterator[tuple[int, Entry]]:
        for position, text in enumerate(texts):
            entry = pagedir.read_key_files(page.path, meta, text, files[text])
            if entry is not None:
                yield position, entry

    return len(texts), read()


def _natural(text: str) -> tuple[Any, ...]:
    try:
        key = json.loads(text)
    except ValueError:
        key = None
    # A name that is no key is unreadable (read_key warns): last, in name order.
    return (0, key_order(key)) if isinstance(key, list) else (1, ())


def _kept_aside(page: Path) -> list[Path]:
    """The ``*.corrupt-*`` copies a write kept aside inside a page (none if it cannot be listed)."""
    try:
        return sorted(f for f in page.iterdir() if leftover_kind(f) is not None)
    except OSError:
        return []


def is_page_dir(path: Path) -> bool:
    """A page directory: one with a page.json, or one named as a page (its page.json lost)."""
    return path.is_dir() and (
        os.path.lexists(path / pagedir.PAGE_FILE) or pagedir.name_ids(path.name) is not None
    )


def _sibling_identity(directory: Path, pages: list[Page]) -> tuple[dict[str, Any], list[Path]] | None:
    """The kernel and platform of a page whose page.json is damaged, taken from the book's
    readable pages whose ids (recomputed from their contents) are the ones the directory's
    name carries; with the pages they came from. None if the book holds no such pages."""
    ids = pagedir.name_ids(directory.name)
    if ids is None:
        return None
    kernel = next((p for p in pages if p.identity.id == ids[0]), None)
    platform = next((p for p in pages if p.platform_id == ids[1]), None)
    if kernel is None or platform is None:
        return None
    identity = {
        "kernel": {**kernel.doc.kernel, "id": ids[0]},
        "platform": {**platform.doc.platform, "id": ids[1]},
    }
    return identity, sorted({kernel.path, platform.path})


def _damaged_page(directory: Path, why: str | None, loaded: Loaded) -> None:
    """A page directory whose page.json is unreadable (``why``) or absent: its keys are read
    if the book's other pages name its kernel and platform, else listed by name; either way
    one line says so and how page.json is rewritten."""
    page_json = directory / pagedir.PAGE_FILE
    state = f"unreadable ({why})" if why is not None else "missing"
    book = directory.parent
    found = _sibling_identity(directory, loaded.pages)
    if found is not None:
        identity, sources = found
        with skipped_as(directory) as skipped:
            doc = DirectoryStore(directory.parent, writable=False).fetch(
                directory.name + ".json", expected=identity
            )
        loaded.skipped += [s for s in skipped if not s[1].startswith(DAMAGED_PAGE)]
        if doc is not None:
            loaded.pages.append(Page(directory, doc))
            loaded.skipped.append(
                (
                    page_json,
                    f"{state}; the page's kernel and platform were taken from "
                    f"{', '.join(str(p) for p in sources)} (their ids are the ones this directory's "
                    f"name carries) and its keys read, each checked against them; to rewrite it, run "
                    f"`tunebook merge {book} -o {book}`, or {pagedir.repair_hint(directory)}",
                )
            )
            return
    texts = sorted(t for t in (pagedir.key_text_of(n) for n in _names(directory)) if t is not None)
    shown = ", ".join(texts[:5]) + (f", ... ({len(texts)} in all)" if len(texts) > 5 else "")
    loaded.skipped.append(
        (
            page_json,
            f"{state}, and no other page of this book names the kernel and platform this "
            f"directory's name carries, so its {len(texts)} key file(s) are not shown"
            f"{': ' + shown if texts else ''}. They are intact: to rewrite page.json, "
            f"{pagedir.repair_hint(directory)}",
        )
    )


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def load(source: Path, stream: bool = False) -> Loaded:
    """Every book page under ``source`` (a book directory, not recursive: format-1 files and
    format-2 page directories), or ``source`` itself (one file or one page directory).

    ``stream``: format-2 pages are read for their kernel and platform only (``Page.streamed``;
    their keys are read by :func:`page_entries`), except one with a format-1 file of the same
    name beside it, read whole so that the file's entries stand under the page's. A key file
    that cannot be read is then reported by the reader of its keys, not here."""
    loaded = Loaded(source)
    pages: list[Path] = []
    if is_page_dir(source):
        pages = [source]
        candidates: list[Path] = []
    elif source.is_dir():
        entries = list(source.iterdir())
        pages = sorted(p for p in entries if "." not in p.name and is_page_dir(p))
        paged = {p.name + ".json" for p in pages}
        # Every *.json name, whatever it is: a FIFO, a device or a dangling link under a book's
        # name is reported with its reason by the strict reader, never opened blindly.
        candidates = sorted(
            p for p in entries if p.suffix == ".json" and not p.is_dir() and p.name not in paged
        )
        loaded.leftovers = sorted(p for p in entries if leftover_kind(p) is not None)
        for p in entries:  # a page linked from elsewhere that is gone: said, as a file's link is
            if p.is_symlink() and not p.exists() and pagedir.name_ids(p.name) is not None:
                loaded.skipped.append((p, f"a link to {os.readlink(p)}, which does not exist"))
    elif os.path.lexists(source):
        candidates = [source]
    else:
        raise FileNotFoundError(
            f"no book at {source}: it is neither a directory nor a file. Pass a book directory "
            "(e.g. the TUNEBOOK_DIR of the machine that tuned) or one book .json file."
        )
    # A write keeps an unreadable key file (or page.json) aside inside its page, too.
    loaded.leftovers += [f for page in pages for f in _kept_aside(page)]
    for path in candidates:
        doc, why = parse_file(path)
        if doc is None:
            loaded.skipped.append((path, why or "unreadable"))
        else:
            loaded.pages.append(Page(path, doc))
    damaged: list[tuple[Path, str | None]] = []
    for directory in pages:
        if not os.access(directory, os.R_OK | os.X_OK):  # else read as a page whose page.json is lost
            loaded.skipped.append(
                (
                    directory,
                    "the page directory cannot be read (permission denied); its files were not looked "
                    f"at. Check its permissions (e.g. chmod u+rwx {directory}) and run the command again",
                )
            )
            continue
        beside = os.path.lexists(directory.with_name(directory.name + ".json"))
        meta, why = pagedir.read_page_file(directory)
        # Damaged, unless a format-1 file beside names the page (fetch reads it), or a newer
        # tunebook wrote it (its page is not this tunebook's to name: skipped, as it says).
        if meta is None and not beside and not (why or "").startswith(NEWER):
            if why is None and pagedir.is_empty_page(directory):
                loaded.empty.append(directory)  # nothing lost: it never held a key
            else:
                damaged.append((directory, why))
            continue
        streamed = stream and not beside
        doc, skipped = parse_page_meta(directory) if streamed else parse_page(directory)
        loaded.skipped += skipped
        if doc is not None:
            loaded.pages.append(Page(directory, doc, streamed))
    for directory, why in damaged:  # after the others: they may name its kernel and platform
        _damaged_page(directory, why, loaded)
    return loaded
