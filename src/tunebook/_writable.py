"""Whether a book directory can take writes, asked before work whose results would be lost.

Shared by the CLI (``tunebook tune``, ``import``, ...) and the commands that need no click
(``python -m tunebook.kernels tune``, ``python -m tunebook.demo.llm tune``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["existing_parent", "write_problem"]


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: the directory whose permissions matter."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def writable_fix(path: Path, choose: str) -> str:
    """How to make ``path`` writable: ``choose`` (e.g. "choose another --out"), or make its
    nearest existing ancestor writable, unless that is a file, which no permission makes a
    directory (the error before this names it as none)."""
    there = existing_parent(path)
    return f"{choose}, or make {there} writable" if there.is_dir() else choose


def write_problem(directory: Path) -> str | None:
    """Why files could not be written into ``directory`` (None: they can).

    An existing directory is probed with a real file, which catches what permission bits
    do not say (a read-only mount, an immutable directory, root's writes). A directory yet
    to be created needs a nearest ancestor that takes a new directory, probed the same way
    (with one created and removed there): permission bits said yes to root where the
    creation then failed (``/proc``, an NFS export that squashes root), and the work that
    had been run to fill the book was lost.

    >>> import tempfile
    >>> write_problem(Path(tempfile.mkdtemp())) is None
    True
    """
    target = existing_parent(directory)
    if not target.is_dir():
        return f"{target} is not a directory"
    if target != directory:
        try:
            os.rmdir(tempfile.mkdtemp(dir=target, prefix=".tunebook-probe-"))
        except OSError as exc:
            return f"cannot create it in {target}: {exc.strerror or exc}"
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tunebook-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None
