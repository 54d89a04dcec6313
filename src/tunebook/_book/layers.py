"""The book as the autotuner sees it: a writable directory over read-only ones.

Lookup order: the writable directory (``TUNEBOOK_DIR``), then each read-only directory
(``autotune(books=...)`` first, then ``TUNEBOOK_PATH``) in order. For one key the layers'
results are united; where two layers measured the same config, the earlier layer stands.
Results are only ever written to the writable directory, and a page that was tuned from a
shipped book's results carries them along, so the writable book is complete on its own.

Thread safety: a Page is used under its autotuner's lock; Book is immutable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _settings
from .files import merge_write, read_document
from .records import Document, Entry, _json_scalar


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
    """Where results live: one writable directory (or none) over read-only ones.

    >>> import tempfile, pathlib
    >>> book = Book(pathlib.Path(tempfile.mkdtemp()), readonly=())
    >>> book.directory is not None
    True
    """

    def __init__(self, directory: Path | None, readonly: Sequence[Path] = ()) -> None:
        self.directory = directory
        self.readonly = tuple(readonly)

    @classmethod
    def from_env(cls, extra_readonly: Sequence[str | Path] = ()) -> Book:
        readonly = [Path(p) for p in extra_readonly] + _settings.book_path()
        return cls(_settings.book_dir(), readonly)

    def open(self, kernel: KernelIdentity, platform: dict[str, Any], slug: str, platform_id: str) -> Page:
        return Page(self, kernel, platform, book_file_name(kernel, slug, platform_id))


class Page:
    """One kernel on one platform, merged over the book's layers."""

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
        self._stamp: tuple[int, int] | None = None
        self._unsaved: dict[str, Entry] = {}
        self.entries: dict[str, Entry] = {}
        self.refresh(force=True)

    def _read(self, path: Path) -> Document | None:
        doc = read_document(path)
        if doc is not None and doc.kernel.get("hash") != self.kernel.source_hash:
            from .files import warn_once

            warn_once(
                f"read:{path}", "tunebook: skipping book %s: it belongs to another kernel version", path
            )
            return None
        return doc

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def refresh(self, force: bool = False) -> None:
        """Re-read the writable file if another process changed it since we last looked."""
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        self._stamp = stamp
        doc = self._read(self.path) if self.path is not None and stamp is not None else None
        self._set_writable(doc.entries if doc else {})

    def _set_writable(self, writable: dict[str, Entry]) -> None:
        entries = dict(self._readonly_entries)
        for k, entry in writable.items():
            entries[k] = (
                self._readonly_entries[k].merged_over(entry) if k in self._readonly_entries else entry
            )
        self.entries = entries

    def sibling_winners(self, key: Sequence[Any]) -> list[Entry]:
        """Entries for this exact key of the same kernel on other platforms, in any layer.

        Their winners are good first guesses for a search here (the best config moves
        less between GPUs than between shapes).
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
        """Persist ``entry`` (merged over what is on disk) and return the entry as it now stands.

        If the directory cannot be written, the entry is kept in memory for this process.
        """
        # Entries whose earlier write failed (full disk, vanished directory) go along, so
        # they reach the disk once it accepts writes again.
        entries = dict(self._unsaved)
        entries[key_text] = entry.merged_over(entries.get(key_text)) if key_text in entries else entry
        news = Document(kernel=self.kernel.to_json(), platform=self.platform, entries=entries)
        merged = merge_write(self.path, news) if self.path is not None else None
        if merged is None:
            self._unsaved = entries
            current = self.entries.get(key_text)
            self.entries[key_text] = entry.merged_over(current)
        else:
            self._unsaved = {}
            self._stamp = self._file_stamp()
            self._set_writable(merged.entries)
        return self.entries[key_text]
