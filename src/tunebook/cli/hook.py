"""``tunebook install-hook`` / ``uninstall-hook``: the ``TUNEBOOK_PATCH=1`` start-up hook.

The hook is a ``.pth`` file in the active environment's site-packages; with
``TUNEBOOK_PATCH=1`` every Python process of that environment runs ``tunebook.patch()``
when it imports Triton (``tunebook/_hook.py`` says how, and why it can never break the
interpreter's start). Without the variable it does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import _hook
from ._common import os_error_text

_DIR_HELP = "A site directory to use instead of the active environment's site-packages."


@click.command("install-hook")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help=_DIR_HELP)
def install_command(directory: Path | None) -> None:
    """Install the TUNEBOOK_PATCH=1 start-up hook into this environment.

    Afterwards, a Python process of this environment started with TUNEBOOK_PATCH=1 applies
    tunebook.patch() as it imports Triton: every Triton autotuner remembers its results
    in the book, with no code changed. Without TUNEBOOK_PATCH nothing happens.
    """
    target = directory if directory is not None else _hook.site_packages()
    if not target.is_dir():  # not "...tmp: No such file or directory" about a file of ours
        raise click.ClickException(f"{target} is not a directory; give an existing site directory with --dir")
    try:
        path = _hook.install(target)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write the hook into {target}: {os_error_text(exc)}; install it into an environment "
            "you can write (a virtual environment), or give a site directory you own with --dir"
        ) from None
    click.echo(f"installed {path}")
    remove = "tunebook uninstall-hook" + (f" --dir {target}" if directory is not None else "")
    if target.resolve() not in {d.resolve() for d in _hook.site_dirs()}:
        # Python runs a .pth file only from a site directory: say so rather than promise it.
        click.echo(
            f"{target} is not a site directory of this interpreter ({sys.executable}): the hook runs "
            f"only in a Python whose site directories include it (site.addsitedir). Remove it with: {remove}"
        )
        return
    click.echo(
        f"Python processes of this environment started with {_hook.VARIABLE}=1 now run tunebook.patch() "
        f"when they import triton. Remove it with: {remove}"
    )


@click.command("uninstall-hook")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help=_DIR_HELP)
def uninstall_command(directory: Path | None) -> None:
    """Remove the TUNEBOOK_PATCH start-up hook from this environment (if it is there)."""
    try:
        removed = _hook.uninstall([directory] if directory is not None else None)
    except OSError as exc:
        raise click.ClickException(
            f"cannot remove the hook: {os_error_text(exc)}; remove {_hook.PTH_NAME} by hand with the "
            "permissions of whoever installed it"
        ) from None
    for path in removed:
        click.echo(f"removed {path}")
    if not removed:
        where = directory if directory is not None else _hook.site_packages()
        click.echo(f"no {_hook.PTH_NAME} in {where}: nothing to remove")
