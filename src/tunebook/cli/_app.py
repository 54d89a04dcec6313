"""The ``tunebook`` command group: one small module per command, registered here."""

from __future__ import annotations

import errno
import logging
from typing import Any

import click

from .._version import __version__
from . import diff, explain, export_vllm, hook, import_vllm, merge, prune, push, report, show, tune
from ._common import os_error_line


def _configure_logging(verbose: int) -> None:
    """The CLI is the one place that installs a handler on the ``tunebook`` logger."""
    logger = logging.getLogger("tunebook")
    for old in [h for h in logger.handlers if getattr(h, "tunebook_cli", False)]:
        logger.removeHandler(old)  # run twice in one process (tests): one handler, current stderr
    handler = logging.StreamHandler()
    handler.tunebook_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


class Group(click.Group):
    """The command group; an OSError no command anticipated is one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as exc:
            if exc.option_name in ("-v", "--verbose") and exc.ctx is not None and exc.ctx.parent is ctx:
                where = (  # after click's own wording, whatever its version
                    f"{exc.message.rstrip('.')}: {exc.option_name} is an option of tunebook itself; give "
                    f"it before the command (tunebook {exc.option_name} {exc.ctx.info_name} ...)"
                )
                raise click.NoSuchOption(exc.option_name, where, ctx=exc.ctx) from None
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # stdout closed by `| head`: click ends quietly
            raise click.ClickException(os_error_line(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tunebook")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Inspect and manage tunebook books: the remembered results of @tunebook.autotune.

    BOOK arguments are a book directory, one page directory in it, or one book .json file
    (format 1); when omitted they default to the writable book directory (TUNEBOOK_DIR, else
    the user cache dir).
    """
    _configure_logging(verbose)


cli.add_command(show.command)
cli.add_command(explain.command)
cli.add_command(merge.command)
cli.add_command(push.command)
cli.add_command(diff.command)
cli.add_command(export_vllm.command)
cli.add_command(import_vllm.command)
cli.add_command(prune.command)
cli.add_command(report.command)
cli.add_command(tune.command)
cli.add_command(hook.install_command)
cli.add_command(hook.uninstall_command)
