"""Book files on disk: the bounded reader, atomic writes, and format 1 (one file per page).

Format 2 (a directory per page, a file per key; what tunebook writes) is pagedir.py, built
on the reader and the atomic write here. Format 1 is still read everywhere, and never
written: its merge-on-write under a ``<file>.lock`` beside the book is gone with it.

Contract (relied on by every caller, tested in tests/test_book_files.py and
tests/test_hostile_files.py):

* **Reads never raise, never wait, never read without limit.** A missing file is empty;
  a corrupt, truncated, foreign, oversized or newer-format file is skipped with one
  warning per file per process; anything but a regular file (a FIFO, a device, a dangling
  or looping link) is reported, never opened blindly (``read_regular_file``).
* **Writes are atomic.** The new content goes to a temp file in the same directory, is
  flushed and fsynced, then ``os.replace``-d over the old one, and the directory is
  fsynced: a reader sees the old file or the new one, never a torn one, even across a
  crash or SIGKILL.
* **Writes fail soft** (``warn_write_failure``): a read-only or vanished directory or a
  full disk is logged once per directory and the caller carries on; nothing on disk is
  lost. Merging, locks and keeping unreadable files aside are format 2's (pagedir.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from pathlib import Path

from .._errors import BookFormatError, BookWarning
from .._jsonio import strict_loads
from .._warnings import warn_once, warn_unreadable
from .records import Document

log = logging.getLogger("tunebook")

MAX_BOOK_BYTES = 64 * 1024 * 1024  # a book of 10^5 results is ~20 MB; anything far larger is not ours
LOCK_TIMEOUT_S = 30.0  # the command line's wait for a key's lock (it rewrites pages it has decided)

__all__ = ["BookWarning", "atomic_write_text", "read_book_file", "read_document"]


class Unusable(Exception):
    """What is at a book path cannot be used as a book; the message says why, for a person.

    ``replaceable``: nothing there can be a book (a FIFO, a device, a dangling link), so a
    writer may move it aside; otherwise (too large, unreadable just now) it is left alone.
    """

    def __init__(self, reason: str, *, replaceable: bool = False) -> None:
        super().__init__(reason)
        self.replaceable = replaceable


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at ``path`` (symbolic links followed), or None if nothing
    is there; raises :class:`Unusable` with the reason for anything else.

    Never waits and never reads more than ``limit`` + 1 bytes, whatever is planted at the
    path: only a regular file is opened (a FIFO would block ``open``, a device would be read
    without end; ``st_size`` is 0 for both), it is opened non-blocking in case it was swapped
    for one after the check, and the read stops at the limit whatever the size claimed.
    A dangling or looping symbolic link is reported, not taken for a missing file.
    """
    fd = open_regular_file(path, limit)
    if fd is None:
        return None
    try:
        return read_bounded(fd, limit)
    finally:
        os.close(fd)


def open_regular_file(path: Path, limit: int) -> int | None:
    """A read-only descriptor of the regular file at ``path``, or None if nothing is there;
    raises :class:`Unusable` as ``read_regular_file`` does. For a caller that must do more
    with the open file than read it (take an ``flock``): it closes the descriptor."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Unusable(
                f"it is a symbolic link to {os.readlink(path)!r}, which does not exist", replaceable=True
            ) from None
        return None
    except NotADirectoryError:  # the directory itself is a file now: nothing is there
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unusable("it is a symbolic link that loops (ELOOP)", replaceable=True) from None
        raise Unusable(f"it cannot be examined ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"it is {_kind_of(st.st_mode)}, not a regular file", replaceable=True)
    if st.st_size > limit:
        raise Unusable(f"{st.st_size} bytes is over the {limit}-byte limit for a book file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unusable(f"it cannot be opened ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise Unusable(f"it cannot be examined ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):  # swapped between the stat and the open
        os.close(fd)
        raise Unusable(f"it is {_kind_of(mode)}, not a regular file", replaceable=True)
    return fd


def read_bounded(fd: int, limit: int) -> bytes:
    """Everything left in ``fd``, read until its end or past ``limit`` bytes (raises Unusable)."""
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise Unusable(f"it holds more than the {limit}-byte limit for a book file")
    except OSError as exc:
        raise Unusable(f"it could not be read just now ({exc.strerror or exc})") from None


def read_book_file(path: Path) -> tuple[Document | None, str | None]:
    """(the book at ``path``, None), or (None, why it cannot be used); never raises.

    A missing file is (None, None). The one strict reader: the autotuner warns with the
    reason once, the command line shows it. A format-2 page directory (pagedir.py) is read
    whole, with the first reason any of its files gave.
    """
    if path.is_dir() and not path.is_symlink():
        return _read_page_dir(path)
    try:
        raw = read_regular_file(path, MAX_BOOK_BYTES)
    except Unusable as exc:
        return None, str(exc)
    if raw is None:
        return None, None
    return _parse(raw)


def _read_page_dir(path: Path) -> tuple[Document | None, str | None]:
    from .stores import DirectoryStore  # deferred: stores builds on this module

    doc = DirectoryStore(path.parent, writable=False).fetch(path.name + ".json")  # warns per file skipped
    return (doc, None) if doc is not None else (None, f"{path} is a directory without a readable page.json")


def _parse(raw: bytes) -> tuple[Document | None, str | None]:
    try:
        return Document.from_json(strict_loads(raw.decode("utf-8"))), None
    except (ValueError, OverflowError, RecursionError) as exc:  # BookFormatError, JSON and UTF-8 errors too
        return None, f"{type(exc).__name__}: {exc}" if not isinstance(exc, BookFormatError) else str(exc)


def read_document(path: Path) -> Document | None:
    """The book at ``path``, or None if it is missing or unusable (warned once)."""
    doc, reason = read_book_file(path)
    _warn_unusable(path, reason)
    return doc


def _warn_unusable(path: Path, reason: str | None) -> None:
    if reason is not None:
        warn_unreadable(path, reason)


def fsync_dir(directory: Path) -> None:
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


def atomic_write_text(path: Path, text: str, *, tmp_dir: Path | None = None) -> None:
    """Replace ``path`` with ``text`` so that no reader ever sees a partial file.

    The temp file is a new name (``<name>.<random>.tmp``, made by ``mkstemp``: never an
    existing file or link, and no collision with a file a killed writer of the same PID
    left) in ``tmp_dir`` when given (on the same file system), else beside ``path``, hidden.
    """
    where, prefix = (tmp_dir, f"{path.name}.") if tmp_dir is not None else (path.parent, f".{path.name}.")
    fd, tmp_name = tempfile.mkstemp(dir=where, prefix=prefix, suffix=".tmp")
    tmp = Path(tmp_name)
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
    fsync_dir(path.parent)


def warn_write_failure(directory: Path, exc: BaseException) -> None:
    """Report, once per directory, that results stay in memory because writing failed."""
    warn_once(
        f"write:{directory}",
        "tunebook: cannot write to book directory %s (%s); what this process records (tuning "
        "results, and in serve mode the keys it served untuned) is kept in memory only. %s",
        directory,
        why_not_writable(directory, exc),
        write_fix(exc),
    )


def write_fix(exc: BaseException) -> str:
    """What a person does about a failed write of the book, by its cause: another directory
    helps with permissions or a read-only mount, not with a full disk or a file size limit."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "Free some space on its disk (or quota), or point TUNEBOOK_DIR at a directory on another disk."
    if code == errno.EFBIG:
        return (
            "A file grew past the largest this process may write (its file size limit: see `ulimit -f`, "
            "RLIMIT_FSIZE) or its file system allows: raise the limit for the processes that tune."
        )
    return "Point TUNEBOOK_DIR at a writable directory to remember it."


def why_not_writable(directory: Path, exc: BaseException) -> str:
    """The reason a book directory cannot be written, in words that fit the situation."""
    for part in (directory, *directory.parents):
        if part.exists() and not part.is_dir():
            where = "it" if part == directory else f"{part}, a part of its path,"
            return f"{where} is a file, not a directory"
    return str(exc)
