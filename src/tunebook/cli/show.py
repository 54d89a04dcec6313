"""``tunebook show``: what a book holds, per kernel and platform: winners, timings, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._common import book_argument, echo_json, load_or_fail, out, select_pages, warn_skipped
from ._load import Loaded, Page
from ._summary import (
    REFERENCES,
    KeySummary,
    Reference,
    fmt_key,
    fmt_time,
    misses_line,
    reference_cell,
    reference_header,
    reference_notes,
    summarise_page,
    winner_cell,
)

JSON_FORMAT = "tunebook-show"
JSON_VERSION = 1


def show_json(loaded: Loaded, pages: list[Page], reference: Reference) -> dict[str, Any]:
    """The ``--json`` document (shape documented in docs/cli.md; bump JSON_VERSION on change)."""
    return {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "book": str(loaded.source),
        "files": [
            {
                "path": str(page.path),
                "kernel": {**page.doc.kernel, "id": page.identity.id},
                "platform": {**page.doc.platform, "id": page.platform_id},
                "entries": [s.to_json() for s in summarise_page(page.doc, reference)],
            }
            for page in pages
        ],
        "skipped": [{"path": str(p), "reason": why} for p, why in loaded.skipped],
        "leftovers": [str(p) for p in loaded.leftovers],
    }


def _title(page: Page) -> list[str]:
    """The page's heading lines, printed above its table (not as the table's title, which
    rich pads to the table's width and wraps when longer: file names and keys must copy whole)."""
    key_names = ", ".join(map(str, page.doc.kernel.get("key", []))) or "-"
    return [
        f"[bold]{escape(page.kernel_name)}[/] [dim]{page.identity.id}[/]  on  "
        f"[bold]{escape(page.platform_label)}[/]",
        f"[dim]{escape(page.path.name)} · key ({escape(key_names)}) + argument dtypes[/]",
    ]


def _table(summaries: list[KeySummary], reference: Reference) -> Table:
    table = Table()
    for name, justify in (
        ("key", "left"),
        ("winner", "left"),
        ("time", "right"),
        (reference_header(reference), "right"),
        ("speed-up", "right"),
        ("configs", "right"),
        ("failed", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for s in summaries:
        speed = f"{s.speedup:.2f}x" if s.speedup is not None else ("imported" if s.imported else "-")
        table.add_row(
            escape(fmt_key(s.key)),
            escape(winner_cell(s)),
            fmt_time(s.winner_ms),
            reference_cell(s),
            speed,
            str(s.configs),
            str(len(s.failures)),
        )
    return table


def _print_failures(console: Console, summaries: list[KeySummary]) -> None:
    """One unwrapped line per failure: reasons are long and people grep them."""
    for s in summaries:
        for cid, error in s.failures:
            reason = error.splitlines()[0] if error else "no reason recorded"
            console.print(
                f"  [red]failed[/] {escape(fmt_key(s.key))} {escape(cid)}: {escape(reason)}", soft_wrap=True
            )


@click.command("show")
@book_argument
@click.option("--kernel", "kernels", multiple=True, metavar="NAME", help="Only this kernel (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (see docs/cli.md).")
@click.option(
    "--reference",
    type=click.Choice(REFERENCES),
    default="first",
    show_default=True,
    help="Config the speed-up is measured against: the first config (the one the kernel runs untuned; "
    "where it has no timing, the median config, labelled so), the median config, or the slowest.",
)
@click.option(
    "--failures/--no-failures",
    default=True,
    show_default=True,
    help="List failed configs with their reasons under each key.",
)
def command(
    book: Path | None, kernels: tuple[str, ...], as_json: bool, reference: Reference, failures: bool
) -> None:
    """Kernels, platforms, keys, winners, timings and failures in BOOK.

    The speed-up column is the reference config's time over the winner's: by default the
    first config, the one the kernel runs untuned (see --reference).
    """
    loaded = load_or_fail(book)
    pages = select_pages(loaded, kernels)  # an error naming the skipped files when none is readable
    if not as_json:
        warn_skipped(loaded)
    if as_json:
        echo_json(show_json(loaded, pages, reference))
        return
    console = out()
    for page in sorted(pages, key=lambda p: (p.kernel_name, p.platform_label, p.path.name)):
        summaries = summarise_page(page.doc, reference)
        for heading in _title(page):
            console.print(heading, soft_wrap=True)
        console.print(_table(summaries, reference))
        for note in reference_notes(summaries):
            console.print(f"  [dim]{escape(note)}[/]", soft_wrap=True)
        if (line := misses_line(summaries, page.kernel_name)) is not None:
            console.print(f"  [yellow]{escape(line)}[/]", soft_wrap=True)
        if failures:
            _print_failures(console, summaries)
        console.print()
    for path, what, pruned in loaded.leftover_kinds():
        then = "`tunebook prune` removes it" if pruned else "prune leaves it"
        console.print(f"[yellow]leftover[/] {escape(str(path))} ({what}; {then})")
