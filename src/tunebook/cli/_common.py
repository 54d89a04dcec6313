"""Pieces every command shares: the BOOK argument, loading with errors, output helpers."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import click
from rich.console import Console
from rich.markup import escape

from .. import _settings
from .._book import pagedir
from .._book.files import LOCK_TIMEOUT_S, read_book_file
from .._book.records import NEWER, Document, Entry
from .._progress import is_terminal
from .._writable import existing_parent as existing_parent  # the CLI's commands import them here
from .._writable import writable_fix
from .._writable import write_problem as write_problem
from ._load import Loaded, Page, is_page_dir, load

book_argument = click.argument("book", required=False, type=click.Path(path_type=Path))


def output_option(help: str, *, directory: bool = True, required: bool = True) -> Any:
    """``-o/--output``: a directory (merge, export, import) or a file (report)."""
    kind = click.Path(path_type=Path, file_okay=not directory, dir_okay=directory)

    def not_a_page(ctx: Any, param: Any, value: Path | None) -> Path | None:
        # Pages written inside a page are found by no reader: the book is its parent.
        if directory and value is not None and is_page_dir(value):
            raise click.BadParameter(
                f"{value} is a page of a book, not a book; give the book directory, {value.parent}",
                param_hint="-o",
            )
        return value

    # No explicit default: since click 8.2 an option declared with default=None is never
    # "missing", so required=True would let a run without -o through as output=None.
    return click.option(
        "-o", "--output", "output", required=required, type=kind, help=help, callback=not_a_page
    )


# What a person can do about an OSError, by errno; the command adds its own fix where it has one.
_OS_FIXES = {
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions (and chattr attributes) of that path",
    errno.EROFS: "the file system is mounted read-only; use a path on a writable one",
    errno.ENOSPC: "the disk is full; free some space and run it again",
    errno.EDQUOT: "the disk quota is used up; free some space and run it again",
    errno.EFBIG: (
        "a file grew past the largest this process may write (its file size limit: see `ulimit -f`) "
        "or this file system allows; raise the limit and run it again"
    ),
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of that path is a file, not a directory",
    errno.EISDIR: "that path is a directory; give a file",
}


def trouble_exits_2(command: Any) -> Any:
    """For a command whose status 1 is an answer (``diff``: the books differ; ``explain``: a
    miss): its errors exit with 2, as diff(1)'s do, so that a script's ``|| echo changed``
    never reads a mistyped path as an answer."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except click.UsageError:
            raise  # 2 already
        except click.ClickException as exc:
            raise _Trouble(exc.format_message()) from exc.__cause__

    return run


class _Trouble(click.ClickException):
    exit_code = 2


def os_error_text(exc: OSError) -> str:
    """``/path: Permission denied``: the path and the reason, without Python's errno noise."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{where}: {reason}"


def _lock_timeout(exc: OSError) -> bool:
    """filelock's Timeout is an OSError (a TimeoutError) without an errno."""
    return isinstance(exc, TimeoutError) and exc.errno is None


def os_error_line(exc: OSError) -> str:
    """One line for an OSError no command anticipated: the path, the reason and what to do."""
    if _lock_timeout(exc):
        return f"{exc} Another process holds it (a tuning run, a merge); run this again when it is done"
    fix = _OS_FIXES.get(exc.errno or 0, "check that path and run the command again")
    return f"{os_error_text(exc)}; {fix}"


@contextlib.contextmanager
def writing(what: Path, fix: str, progress: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``what`` into one line: the path, the reason, ``fix``
    (where the reason has a fix of its own, a full disk or quota, that one), then
    ``progress()`` (how far the command got, e.g. "12 of 40 keys were written"), if given."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # stdout closed by `| head`: click ends quietly
        done = f" {progress()}." if progress is not None else ""
        if _lock_timeout(exc):  # a lock, not the file system: "make it writable" would mislead
            raise click.ClickException(f"cannot write {what}: {os_error_line(exc)}.{done}") from None
        # Temp and lock files beside ``what`` are ours, not the person's: name only ``what``.
        target = what.absolute()
        failed = Path(exc.filename).absolute() if exc.filename is not None else target
        ours = failed in (target, target.parent) or failed.parent in (target, target.parent)
        reason = (exc.strerror or str(exc)) if ours else os_error_text(exc)
        if exc.errno in _SPACE:  # no permission or other directory helps: space (or a limit) does
            fix = _OS_FIXES[exc.errno].capitalize() + "."
        raise click.ClickException(f"cannot write {what}: {reason}. {fix}{done}") from None


_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def output_fix(path: Path, choose: str) -> str:
    """How to make ``path`` (an -o output) writable, as a sentence (see ``writable_fix``)."""
    return writable_fix(path, choose) + "."


def resolve_book(book: Path | None) -> Path:
    """The BOOK argument, or the writable book directory (``TUNEBOOK_DIR``) when omitted."""
    return book if book is not None else _settings.book_dir()


def missing_book(source: Path, given: bool) -> click.ClickException:
    """The error for a BOOK that does not exist: a typo, or the default before any tuning."""
    if given:
        return click.ClickException(
            f"no book at {source}: no such file or directory. Pass a book directory (e.g. the "
            "TUNEBOOK_DIR of the machine that tuned) or one book .json file."
        )
    where = (
        "TUNEBOOK_DIR points there"
        if _settings.TUNEBOOK_DIR.raw()
        else "the default book directory; set TUNEBOOK_DIR to use another"
    )
    return click.ClickException(
        f"nothing tuned yet: no book at {source} ({where}). A @tunebook.autotune kernel writes "
        "it when it first tunes; or pass a BOOK directory or file."
    )


def load_or_fail(book: Path | None, stream: bool = False) -> Loaded:
    """Load a book (``stream``: see ``_load.load``), turning a missing path into a one-line
    error instead of a traceback."""
    source = resolve_book(book)
    if not source.exists():
        raise missing_book(source, given=book is not None)
    if book is None and not source.is_dir():  # the writable book is a directory, never one file
        raise click.ClickException(
            f"TUNEBOOK_DIR is {source}, a file, not a directory: point it at the book directory, or "
            "pass a book file as BOOK"
        )
    if not source.is_dir() and source.suffix == ".json" and is_page_dir(source.parent):  # tab completion
        raise click.ClickException(
            f"{source} is a file inside the page {source.parent} (its "
            f"{'page.json' if source.name == 'page.json' else 'key file'}), not a book: pass the page "
            f"directory {source.parent}, or the book directory {source.parent.parent}"
        )
    try:
        return load(source, stream)
    except FileNotFoundError as exc:  # neither a directory nor a regular file (a socket, a FIFO)
        raise click.ClickException(str(exc)) from None


def select_pages(loaded: Loaded, kernels: Sequence[str] = ()) -> list[Page]:
    """The pages of ``kernels`` (all without a filter), or an error listing what the book holds.

    Nothing to show is a failure for every command: a script must not read an empty
    report, table or export as success.
    """
    pages = [p for p in loaded.pages if not kernels or p.kernel_name in kernels]
    if pages:
        return pages
    if loaded.pages:
        names = sorted({p.kernel_name for p in loaded.pages})
        raise click.ClickException(
            f"no book file for kernel {', '.join(kernels)} in {loaded.source}; "
            f"kernels there: {', '.join(names)}"
        )
    if loaded.skipped:
        reasons = "; ".join(f"{path.name}: {why.splitlines()[0]}" for path, why in loaded.skipped[:3])
        more = f"; and {len(loaded.skipped) - 3} more" if len(loaded.skipped) > 3 else ""
        raise click.ClickException(
            f"no readable book file in {loaded.source} ({len(loaded.skipped)} skipped: {reasons}{more})"
        )
    raise click.ClickException(
        f"nothing tuned yet: {loaded.source} holds no book files (*.json). A @tunebook.autotune kernel "
        "writes them when it first tunes."
    )


# Off a terminal (a log file, a pipe, CI) nothing is wrapped: a wrapped line splits the
# paths and commands people copy out of it. Rich would otherwise wrap at 80 columns.
_UNWRAPPED = 1 << 16


def _console(stream: TextIO | None, stderr: bool) -> Console:
    tty = is_terminal(stream)
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr, width=None if tty else _UNWRAPPED)


def out() -> Console:
    """People's output: rich on stdout, plain text when stdout is not a terminal."""
    return _console(sys.stdout, stderr=False)


def err() -> Console:
    """Messages on stderr; soft-wrapped lines on a terminal, so paths copy whole."""
    return _console(sys.stderr, stderr=True)


def echo_json(data: Any) -> None:
    """Scripts' output: one JSON document, keys sorted, so it diffs and greps well."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))


def warn_skipped(loaded: Loaded) -> None:
    """Tell the person about every file that was not read, on stderr."""
    console = err()
    for path, why in loaded.skipped:
        console.print(f"[yellow]skipped[/] {escape(str(path))}: {escape(why)}", markup=True, highlight=False)


def skipped_results(loaded: Loaded) -> int:
    """How many of the files ``loaded`` skipped held results that were not read: all but a
    damaged page.json whose page was read all the same (its keys checked against the
    book's other pages), which loses nothing."""
    read = {page.path for page in loaded.pages}
    return sum(
        1 for path, _ in loaded.skipped if not (path.name == pagedir.PAGE_FILE and path.parent in read)
    )


def parse_assignments(values: tuple[str, ...], option: str, empty_ok: bool = False) -> dict[str, str]:
    """``("A=B", "C=D")`` -> ``{"A": "B", "C": "D"}``, with an error naming the bad one
    (``empty_ok``: ``A=`` is A set to nothing, as ``--env CUDA_VISIBLE_DEVICES=`` hides GPUs)."""
    parsed: dict[str, str] = {}
    for value in values:
        name, sep, rhs = value.partition("=")
        if not sep or not name.strip() or not (rhs.strip() or empty_ok):
            raise click.BadParameter(f"expected NAME=VALUE, found {value!r}", param_hint=option)
        parsed[name.strip()] = rhs.strip()
    return parsed


def write_document(
    path: Path,
    doc: Document,
    fold: Callable[[Entry, Entry], Entry] | None = None,
    done: Callable[[str, bool], None] | None = None,
) -> list[str]:
    """Write ``doc`` into the page that ``path`` names (a format-1 file name), in format 2:
    each key's file replaced atomically (``pagedir.replace_page``: files the caller did not
    read stay), and a format-1 file at ``path`` removed once its page is written, if it was
    readable and every key it holds is in ``doc`` (this is how a book of format 1 is
    rewritten in format 2: ``tunebook merge OLD -o NEW``); an unreadable one (a newer
    tunebook's, say) stays for a person.

    The CLI has already decided the content of the keys it writes (by measurement, or by
    replacing imported keys). ``fold`` (``merge``'s rule) folds in what a key's files hold
    when it is written, under its lock: what was written since the caller read them (another
    merge, a live autotuner) is kept. Without it (an import) the decided entry stands. A key
    file a newer tunebook wrote, which this one could not read, stays, and its key is not
    written, as is a key whose file would pass the size every reader accepts. Returns why,
    one line a key left so. ``done(key text, changed)``: called as each key is written
    (``changed`` False where its files already held it: ``pagedir.replace_page``). The book
    directory's killed page creations are the command's to sweep, once for all its pages
    (``pagedir.sweep_creations``).
    """
    directory = path.parent / pagedir.page_dir_name(path.name)
    meta = {"kernel": doc.kernel, "platform": doc.platform}
    left_alone = pagedir.replace_page(directory, meta, doc.entries, LOCK_TIMEOUT_S, fold, done)
    if not left_alone and path.is_file() and not path.is_symlink():
        old, _ = read_book_file(path)
        if old is not None and set(old.entries) <= set(doc.entries):
            path.unlink()
    return left_alone


def fail_if_left_alone(left_alone: list[str]) -> None:
    """After a command wrote what it could: the key files it had to leave as they were (a
    newer tunebook's; one it could not read just now) fail it (exit status 1), each named,
    with the fix for the reasons given."""
    if left_alone:
        newer = [why for why in left_alone if NEWER in why]
        fixes = []
        if newer:
            fixes.append("upgrade tunebook to write the newer tunebook's")
        if len(newer) < len(left_alone):
            fixes.append("look at the others (the reason is given for each) and run the command again")
        raise click.ClickException(
            f"{len(left_alone)} key file(s) left as they were, their keys not written ("
            + "; ".join(left_alone)
            + f"); {' and '.join(fixes)}. The other keys were written"
        )
