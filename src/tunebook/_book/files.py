"""Book files on disk: safe reads, atomic merge-on-write under a lock.

Contract (relied on by every caller, tested in tests/test_book_files.py):

* **Reads never raise.** A missing file is empty; a corrupt, truncated, foreign, oversized
  or newer-format file is skipped with one warning per file per process.
* **Writes are atomic.** The new content goes to a temp file in the same directory, is
  flushed and fsynced, then ``os.replace``-d over the old one, and the directory is
  fsynced: a reader sees the old file or the new one, never a torn one, even across a
  crash or SIGKILL.
* **Writes merge.** Under an exclusive lock (``<file>.lock``, released by the OS if the
  holder dies) the writer re-reads the file and merges its news over it, so concurrent
  processes never lose each other's entries. What is already on disk stands.
* **Writes fail soft.** A read-only or vanished directory, a full disk or a lock held too
  long: the error is logged once per directory and the caller carries on; nothing on
  disk is lost. A corrupt file about to be replaced is first kept aside as
  ``<file>.corrupt-<time>``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._errors import BookFormatError, BookWarning
from .._jsonio import strict_loads
from .._warnings import warn_once
from .records import FORMAT, VERSION, Document

log = logging.getLogger("tunebook")

MAX_BOOK_BYTES = 64 * 1024 * 1024  # a book of 10^5 results is ~20 MB; anything far larger is not ours
LOCK_TIMEOUT_S = 30.0

__all__ = ["BookWarning", "atomic_write_text", "merge_write", "read_book_file", "read_document"]


def read_book_file(path: Path) -> tuple[Document | None, str | None]:
    """(the book at ``path``, None), or (None, why it cannot be used); never raises.

    A missing file is (None, None). The one strict reader: the autotuner warns with the
    reason once, the command line shows it.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return None, None
    if size > MAX_BOOK_BYTES:
        return None, f"{size} bytes is over the {MAX_BOOK_BYTES}-byte limit for a book file"
    try:
        return Document.from_json(strict_loads(path.read_text(encoding="utf-8"))), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, OverflowError, RecursionError) as exc:  # BookFormatError, JSON errors too
        return None, f"{type(exc).__name__}: {exc}" if not isinstance(exc, BookFormatError) else str(exc)


def read_document(path: Path) -> Document | None:
    """The book at ``path``, or None if it is missing or unusable (warned once)."""
    doc, reason = read_book_file(path)
    if reason is not None:
        warn_once(
            f"read:{path}",
            "tunebook: skipping book %s: %s. The kernel still runs; delete or replace the file to "
            "silence this warning.",
            path,
            reason,
        )
    return doc


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that no reader ever sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); a book is shared by every process, user and
        # host that reads the directory, so give it the permissions of an ordinary new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class _LeaveAlone(Exception):
    """The book on disk is not ours to replace: a newer tunebook's, too large, or unreadable now."""


def _newer_format(text: str) -> bool:
    try:
        data = strict_loads(text)
    except (ValueError, OverflowError, RecursionError):
        return False
    version = data.get("version") if isinstance(data, dict) else None
    return (
        isinstance(data, dict)
        and data.get("format") == FORMAT
        and isinstance(version, int)
        and not isinstance(version, bool)
        and version > VERSION
    )


def _keep_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
        log.warning("tunebook: kept the %s book %s aside as %s", why, path, aside)


def _read_for_merge(path: Path, kernel_hash: Any) -> Document | None:
    """Like read_document, but a corrupt file is moved aside rather than overwritten, and so
    is one of another kernel under this kernel's name (it would serve foreign results).

    A book of a newer format is neither moved nor overwritten: an older tunebook sharing
    the directory must not destroy a newer one's results.
    """
    if not path.exists():
        return None
    doc = read_document(path)
    if doc is not None and doc.kernel.get("hash") != kernel_hash:
        _keep_aside(path, "foreign")
        return None
    if doc is None:
        # Only a file whose content is broken may be replaced. One that is too large to read
        # here, that could not be read just now (EIO, EMFILE), or that a newer tunebook wrote
        # is left alone: this process's results stay in memory instead.
        try:
            if path.stat().st_size > MAX_BOOK_BYTES:
                raise _LeaveAlone(path)
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = ""
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _LeaveAlone(path) from exc
        if _newer_format(text):
            raise _LeaveAlone(path)
        _keep_aside(path, "corrupt")
    return doc


def _remove_stale_temp_files(path: Path) -> None:
    """Temp files of this book seen while holding its lock belong to writers that died."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def merge_write(path: Path, news: Document) -> Document | None:
    """Merge ``news`` into the book at ``path`` and return what is on disk afterwards.

    Returns None when nothing could be written (the reason is logged once).
    """
    from filelock import FileLock, Timeout  # deferred: keeps `import tunebook` light

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            _remove_stale_temp_files(path)
            merged = news.merged_over(_read_for_merge(path, news.kernel.get("hash")))
            atomic_write_text(path, merged.dumps())
            return merged
    except _LeaveAlone:
        warn_once(
            f"write:{path}",
            "tunebook: leaving %s as it is (written by a newer tunebook, too large, or unreadable "
            "just now); results of this process are kept in memory only",
            path,
        )
    except Timeout:
        warn_once(
            f"write:{path}",
            "tunebook: could not lock %s within %.0f s; this result is kept in memory only",
            path,
            LOCK_TIMEOUT_S,
        )
    except (OSError, ValueError) as exc:  # ValueError: a value JSON cannot hold (never expected)
        warn_once(
            f"write:{path.parent}",
            "tunebook: cannot write to book directory %s (%s); tuning results of this process are "
            "kept in memory only. Point TUNEBOOK_DIR at a writable directory to remember them.",
            path.parent,
            _why_not_writable(path.parent, exc),
        )
    return None


def _why_not_writable(directory: Path, exc: BaseException) -> str:
    """The reason a book directory cannot be written, in words that fit the situation."""
    for part in (directory, *directory.parents):
        if part.exists() and not part.is_dir():
            where = "it" if part == directory else f"{part}, a part of its path,"
            return f"{where} is a file, not a directory"
    return str(exc)
