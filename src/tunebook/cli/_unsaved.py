"""Results ``tunebook tune`` received from its workers and the book does not hold.

Workers write the book themselves, and the library's writes fail soft: a read-only mount,
a full disk or a lock held too long is logged in the worker and its results stay in its
memory, which ends with it. Each worker also sends every result to ``tunebook tune``
(``_worker``'s ``result`` events); this module keeps them, checks them against the book
when the run ends, writes what is missing into the book if it can, and otherwise into a
``tunebook-unsaved-<time>`` directory that the command names, laid out as a book, so that
``tunebook merge DIR -o BOOK`` puts them where they belong.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._book import (
    BookWarning,
    DirectoryStore,
    Document,
    Entry,
    Page,
    Result,
    atomic_write_text,
    now_iso,
)
from .._version import __version__
from ._common import write_problem


@dataclass
class KeyResults:
    """The results workers reported for one key of one kernel."""

    target: tuple[str, ...]  # (module, attr) of the kernel; with --ray, its page file too
    key_text: str
    key: list[Any]
    results: dict[str, Result] = field(default_factory=dict)


@dataclass
class Received:
    """Every result the workers reported, by job index."""

    by_job: dict[int, KeyResults] = field(default_factory=dict)

    def add(self, index: int, target: tuple[str, ...], event: dict[str, Any], result: Result) -> None:
        keyed = self.by_job.setdefault(index, KeyResults(target, event["key_text"], list(event["key"])))
        keyed.results[event["cid"]] = result

    def missing(self, pages: dict[tuple[str, ...], Page]) -> dict[int, Entry]:
        """Per job, the results the book file on disk does not hold (as an entry to write)."""
        on_disk: dict[tuple[str, ...], dict[str, Entry]] = {}
        lost: dict[int, Entry] = {}
        for index, keyed in sorted(self.by_job.items()):
            if keyed.target not in on_disk:
                path = pages[keyed.target].path
                doc = DirectoryStore(path.parent).fetch(path.name) if path is not None else None
                on_disk[keyed.target] = doc.entries if doc is not None else {}
            stored = on_disk[keyed.target].get(keyed.key_text)
            absent = {
                cid: r for cid, r in keyed.results.items() if stored is None or cid not in stored.results
            }
            if absent:
                stamp = now_iso()
                lost[index] = Entry(
                    tuple(keyed.key), absent, tuned_at=stamp, updated_at=stamp, tunebook=__version__
                )
        return lost


def _documents(
    lost: dict[int, Entry], received: Received, pages: dict[tuple[str, ...], Page]
) -> dict[tuple[str, ...], Document]:
    """The lost entries as one document per kernel page."""
    docs: dict[tuple[str, ...], Document] = {}
    for index, entry in lost.items():
        keyed = received.by_job[index]
        page = pages[keyed.target]
        doc = docs.get(keyed.target) or Document(
            kernel=page.kernel.to_json(), platform=page.platform, entries={}
        )
        doc.entries[keyed.key_text] = entry.merged_over(doc.entries.get(keyed.key_text))
        docs[keyed.target] = doc
    return docs


def save_to_book(lost: dict[int, Entry], received: Received, pages: dict[tuple[str, ...], Page]) -> None:
    """Write what the workers could not into the book, if it takes writes now (a lock held too
    long by another process, say). Failures stay silent here: the caller checks again."""
    for target, doc in _documents(lost, received, pages).items():
        path = pages[target].path
        if path is not None and write_problem(path.parent) is None:
            with warnings.catch_warnings():  # the caller reports the outcome itself
                warnings.simplefilter("ignore", BookWarning)
                DirectoryStore(path.parent).merge(path.name, doc)


def save_aside(lost: dict[int, Entry], received: Received, pages: dict[tuple[str, ...], Page]) -> Path:
    """Write the lost results as a book in ``./tunebook-unsaved-<time>`` (else the temp dir)."""
    name = f"tunebook-unsaved-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    parent = Path.cwd() if write_problem(Path.cwd()) is None else Path(tempfile.gettempdir())
    directory = parent / name
    directory.mkdir(parents=True)
    for target, doc in _documents(lost, received, pages).items():
        atomic_write_text(directory / pages[target].file_name, doc.dumps())
    return directory
