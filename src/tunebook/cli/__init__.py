"""The ``tunebook`` command line: inspect, explain, merge, diff, export, prune and report books.

Needs the optional ``cli`` extra (click, rich). Nothing here imports them at
``import tunebook`` time: :func:`main` checks for them first and, when they are missing,
prints the exact install line and exits 1.

Each command is a small module of this package; ``_app`` assembles the group.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

INSTALL_LINE = "pip install 'tunebook[cli]'"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``tunebook`` entry point and ``python -m tunebook``)."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        print(
            f"tunebook: the command line needs the optional 'cli' extra ({exc.name} is missing):",
            file=sys.stderr,
        )
        print(INSTALL_LINE, file=sys.stderr)
        raise SystemExit(1) from None
    from ._app import cli

    cli.main(args=list(argv) if argv is not None else None, prog_name="tunebook")


__all__ = ["INSTALL_LINE", "main"]
