"""Every exception and warning tunebook raises, in one place.

::

    TunebookError                       base of everything below
    ├── ConfigurationError (ValueError)  an autotune() option, a setting or a Space that cannot work
    │   ├── SpaceError                   a Space that cannot be built, or a candidate outside it
    │   └── SnapshotTooLarge             check= would copy more than its max_bytes
    ├── MissingDependency (ImportError)  an optional extra is not installed; says the pip line
    ├── BookFormatError (ValueError)     a document that is not a readable book of this version
    ├── TuningFailed (RuntimeError)      no candidate config could run for a key
    ├── WrongResult                      a candidate computed another answer than the reference
    └── NoRecordedGrid (KeyError)        a replayed call has no grid for a config

    BookWarning (UserWarning)            a book could not be read or written; the call went on
    PatchWarning (UserWarning)           tunebook.patch() left a Triton autotuner to Triton

Errors that reach a kernel call are the user's to fix (a bad option, a missing extra, a
call that no config can run); problems with books never raise into a kernel call, they
warn once (``BookWarning``). ``WrongResult`` and ``NoRecordedGrid`` are data inside the
tuning loop: they are recorded against one config, never raised to the caller.

>>> issubclass(SpaceError, ValueError) and issubclass(SpaceError, TunebookError)
True
"""

from __future__ import annotations


class TunebookError(Exception):
    """Base class of every tunebook exception."""


class ConfigurationError(TunebookError, ValueError):
    """An option of ``tunebook.autotune``, an environment setting or a Space cannot work.

    Raised at decoration time where the mistake can be seen then, so that a server fails
    at start-up, not at its first request."""


class SpaceError(ConfigurationError):
    """A space that cannot be built or a candidate that does not belong to it."""


class SnapshotTooLarge(ConfigurationError):
    """The tensor arguments are too large to snapshot for ``check=`` within ``max_bytes``."""


class MissingDependency(TunebookError, ImportError):
    """An optional feature's package is missing; the message holds the exact install line."""


class BookFormatError(TunebookError, ValueError):
    """A document that is not a readable tunebook book of this version."""


class TuningFailed(TunebookError, RuntimeError):
    """No candidate config could run for a key (each one's reason is in the book)."""


class WrongResult(TunebookError):
    """A candidate config computed a different answer than the reference config."""


class NoRecordedGrid(TunebookError, KeyError):
    """A config the recorded call has no grid for: it cannot be replayed, which says nothing
    about the config itself (it is skipped, not recorded as failed)."""


class BookWarning(UserWarning):
    """A book could not be read or written; the kernel call went on regardless."""


class UnreadableBookFile(BookWarning):
    """A book file was skipped: ``path`` (the file) and ``reason`` (why, in a few words) say
    which and why, for a program that lists them (the command line's ``show --json``)."""

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


class PatchWarning(UserWarning):
    """``tunebook.patch()`` could not serve a Triton autotuner (a subclass that times configs
    its own way, or one tunebook could not be built from): it keeps Triton's behaviour."""


__all__ = [
    "BookFormatError",
    "BookWarning",
    "ConfigurationError",
    "MissingDependency",
    "NoRecordedGrid",
    "PatchWarning",
    "SnapshotTooLarge",
    "SpaceError",
    "TunebookError",
    "TuningFailed",
    "WrongResult",
]
