"""Pieces every command shares: the BOOK argument, loading with errors, output helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from .. import _settings
from .._book.files import LOCK_TIMEOUT_S, atomic_write_text
from .._book.records import Document
from ._load import Loaded, load

book_argument = click.argument("book", required=False, type=click.Path(path_type=Path))


def output_option(help: str, *, directory: bool = True, required: bool = True) -> Any:
    """``-o/--output``: a directory (merge, export, import) or a file (report)."""
    kind = click.Path(path_type=Path, file_okay=not directory, dir_okay=directory)
    # No explicit default: since click 8.2 an option declared with default=None is never
    # "missing", so required=True would let a run without -o through as output=None.
    return click.option("-o", "--output", "output", required=required, type=kind, help=help)


def resolve_book(book: Path | None) -> Path:
    """The BOOK argument, or the writable book directory (``TUNEBOOK_DIR``) when omitted."""
    return book if book is not None else _settings.book_dir()


def load_or_fail(book: Path | None) -> Loaded:
    """Load a book, turning a missing path into a one-line error instead of a traceback."""
    try:
        return load(resolve_book(book))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


def out() -> Console:
    """People's output: rich on stdout, plain text when stdout is not a terminal."""
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def err() -> Console:
    return Console(stderr=True, highlight=False)


def echo_json(data: Any) -> None:
    """Scripts' output: one JSON document, keys sorted, so it diffs and greps well."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))


def warn_skipped(loaded: Loaded) -> None:
    """Tell the person about every file that was not read, on stderr."""
    console = err()
    for path, why in loaded.skipped:
        console.print(f"[yellow]skipped[/] {path}: {why}", markup=True, highlight=False)


def parse_assignments(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``("A=B", "C=D")`` -> ``{"A": "B", "C": "D"}``, with an error naming the bad one."""
    parsed: dict[str, str] = {}
    for value in values:
        name, sep, rhs = value.partition("=")
        if not sep or not name.strip() or not rhs.strip():
            raise click.BadParameter(f"expected NAME=VALUE, found {value!r}", param_hint=option)
        parsed[name.strip()] = rhs.strip()
    return parsed


def write_document(path: Path, doc: Document) -> None:
    """Replace ``path`` with ``doc`` atomically, under the lock a tuning process takes.

    Unlike the library's merge-on-write, the CLI has already decided the full content
    (by measurement, or by replacing imported keys), so what is on disk does not stand.
    """
    from filelock import FileLock  # deferred like the library's writer

    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        atomic_write_text(path, doc.dumps())
