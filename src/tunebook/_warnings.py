"""Reporting a problem once per process, where the user can see it.

Book problems never raise into a kernel call; they are reported once, to the "tunebook"
logger and as a :class:`~tunebook.BookWarning`, so that applications that configure no
logging (the logger has only a NullHandler) still see them, and
``warnings.filterwarnings("ignore", category=tunebook.BookWarning)`` silences them.

The warning points at the user's line that made the kernel call, not at tunebook's or
Triton's own frames.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable

from ._errors import BookWarning, UnreadableBookFile
from ._forksafe import renew_lock

log = logging.getLogger("tunebook")

_warned: set[str] = set()
_lock = threading.Lock()
renew_lock(globals(), "_lock", threading.Lock)
_OWN_DIRS: tuple[str, ...] = (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _own_dirs() -> tuple[str, ...]:
    global _OWN_DIRS
    if len(_OWN_DIRS) == 1:
        triton = sys.modules.get("triton")
        where = getattr(triton, "__file__", None)
        if where:
            _OWN_DIRS = (*_OWN_DIRS, os.path.dirname(os.path.abspath(where)) + os.sep)
    return _OWN_DIRS


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside tunebook and Triton, for warn_once's caller."""
    own = _own_dirs()
    frame = sys._getframe(2)  # the caller of warn_once
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def warn_once(
    tag: str, message: str, *args: object, warn: bool = True, category: type[Warning] = BookWarning
) -> bool:
    """Log ``message % args`` as a warning once per ``tag`` per process (and, with ``warn``,
    issue it as a ``category`` warning at the user's frame). Returns whether it was reported now."""
    return _report(tag, message, args, warn, lambda text: category(text), None)


def warn_unreadable(path: object, reason: object) -> bool:
    """Say once per process that the book file ``path`` is skipped, and why: an
    :class:`~tunebook.UnreadableBookFile` warning that carries both."""
    # A newer tunebook's file holds what this one cannot read: never advise deleting it.
    newer = "newer tunebook" in str(reason)
    message = "tunebook: skipping book %s: %s. The kernel still runs" + (
        "." if newer else "; delete or replace the file to silence this warning."
    )
    return _report(
        f"read:{path}",
        message,
        (path, reason),
        True,
        lambda text: UnreadableBookFile(text, str(path), str(reason)),
        {UNREADABLE_RECORD: True},
    )


# Set on the log record of an UnreadableBookFile: a program that lists those files itself
# (the command line) leaves these records out of its log.
UNREADABLE_RECORD = "tunebook_unreadable_book_file"


def _report(
    tag: str,
    message: str,
    args: tuple[object, ...],
    warn: bool,
    make: Callable[[str], Warning],
    extra: dict[str, object] | None,
) -> bool:
    with _lock:
        if tag in _warned:
            return False
        _warned.add(tag)
    text = message % args if args else message
    # A file name that is not UTF-8 reaches here with lone surrogates (os.fsdecode), which a
    # handler writing UTF-8 (a log file, a test runner's report) cannot encode: escape them.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    log.warning("%s", text, extra=extra)
    if warn:
        warnings.warn(make(text), stacklevel=_user_stacklevel())
    return True


def forget() -> None:
    """Report everything again (tests start each case with a clean slate)."""
    with _lock:
        _warned.clear()
