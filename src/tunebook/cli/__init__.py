"""The ``tunebook`` command line: show, explain, merge, push, diff, export, import, prune, report and
tune books, and install or uninstall the ``TUNEBOOK_PATCH`` start-up hook.

Needs the optional ``cli`` extra (click, rich). Nothing here imports them at
``import tunebook`` time: :func:`main` checks for them first and, when they are missing,
prints the exact install line and exits 1.

Each command is a small module of this package; ``_app`` assembles the group.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .._optional import available, install_line

INSTALL_LINE = install_line("cli")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``tunebook`` entry point and ``python -m tunebook``)."""
    missing = [name for name in ("click", "rich") if not available(name)]
    if missing:
        print(
            f"tunebook: the command line needs the optional 'cli' extra ({missing[0]} is missing):",
            file=sys.stderr,
        )
        print(INSTALL_LINE, file=sys.stderr)
        raise SystemExit(1)
    from ._app import cli

    cli.main(args=list(argv) if argv is not None else None, prog_name="tunebook")


__all__ = ["INSTALL_LINE", "main"]
