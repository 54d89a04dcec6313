"""``tunebook report``: one self-contained HTML page with plots, for people reviewing a book.

Per kernel page: a table of winners; "tuned vs first config" (the winner's time and the
reference config's time per key: the first config, the one the kernel runs untuned, or
where it has no timing the median config, hatched — see _summary); and the config
landscape, a heatmap of every config's time relative to the key's winner (grey: failed or
not measured). Plots are PNGs embedded as base64, so the page can be mailed or archived;
they are shown at their natural size (see _plots).

Pages are rendered in parallel processes (a figure costs ~0.2 s of one core; a book of 50
kernels would otherwise take tens of seconds), with progress on stderr. Needs matplotlib
(``pip install 'tunebook[report]'``), imported only by this command.
"""

from __future__ import annotations

import html
import multiprocessing
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape

from .._book import Entry
from .._book.files import atomic_write_text
from .._optional import available, install_line
from .._version import __version__
from ._common import (
    book_argument,
    err,
    load_or_fail,
    out,
    output_fix,
    output_option,
    select_pages,
    warn_skipped,
    write_problem,
    writing,
)
from ._load import Loaded, Page, is_page_dir, page_entries, skipped_as
from ._plots import MAX_CONFIG_ROWS, Plot, landscape, tuned_vs_reference
from ._summary import (
    KeySummary,
    fmt_key,
    fmt_time,
    is_imported,
    misses_line,
    reference_cell,
    reference_header,
    reference_notes,
    summarise,
    winner_cell,
)

INSTALL_LINE = install_line("report")
T = TypeVar("T")
# Below this many pages, starting worker processes (each imports tunebook and matplotlib,
# ~1 s) costs more than it saves.
MIN_PAGES_IN_PARALLEL = 8

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; }
h2 { font-size: 1.2em; margin-top: 2em; border-top: 1px solid #ccc; padding-top: 1em; }
h3 { font-size: 1em; margin: 1.2em 0 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { white-space: nowrap; }
.dim { color: #777; } .miss { color: #a60; }
.plot { overflow-x: auto; margin: 0.3em 0 1em; }
.plot img { max-width: none; display: block; }
table.heat { font-size: 0.8em; margin: 0; } table.heat td { text-align: right; min-width: 3.2em; }
table.heat td, table.heat th { padding: 2px 5px; }
table.heat th { white-space: nowrap; font-weight: normal; } table.heat td.dk { color: #fff; }
table.heat tr:first-child th { white-space: normal; vertical-align: bottom; }
table.heat td.na, .scale .na { background: #ddd; }
.scale { display: flex; gap: 0.6em; align-items: center; font-size: 0.8em; margin: 0.3em 0; }
.scale .bar { width: 12em; height: 1em; } .scale .na { padding: 0 0.5em; }
"""


def _check_matplotlib() -> None:
    if not available("matplotlib"):
        raise click.ClickException(f"the report needs matplotlib; install it with: {INSTALL_LINE}")


def _img(title: str, caption: str, plot: Plot | None) -> str:
    if plot is None:
        return ""
    esc = html.escape
    return (
        f"<h3>{esc(title)}</h3><p class='dim'>{esc(caption)}</p><div class='plot'><img alt='{esc(title)}' "
        f"width='{plot.width}' height='{plot.height}' src='data:image/png;base64,{plot.png}'></div>"
    )


def _heatmap(table: str | None) -> str:
    if table is None:
        return ""
    return (
        "<h3>config landscape</h3><p class='dim'>Every config's time relative to the key's winner "
        f"(1.00 = the winner), fastest overall on top (at most {MAX_CONFIG_ROWS} configs).</p>"
        f"<div class='plot'>{table}</div>"
    )


# What a page's section draws at most, whatever the book's size: the report costs what it
# draws (a 40,000-key page took 12 min and 16.9 GB when every key was drawn). Keys beyond
# these are sampled evenly over the page's key order, and the section says so.
MAX_TABLE_ROWS = 200
MAX_KEYS_DRAWN = 60
MAX_FAILURES_LISTED = 200


def evenly(items: Sequence[T], limit: int) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced, first and last included.

    >>> evenly(list(range(10)), 4)
    [0, 3, 6, 9]
    """
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return list(items[:limit])
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


@dataclass
class Digest:
    """What a page's section shows, folded in one key at a time (:func:`digest`): it holds
    the sampled keys only, never the page."""

    keys: int = 0  # keys read
    table: list[KeySummary] = field(default_factory=list)  # rows, evenly spaced in key order
    drawn: list[KeySummary] = field(default_factory=list)  # the plotted keys, evenly spaced
    drawn_entries: list[Entry] = field(default_factory=list)  # theirs, for the config landscape
    failures: int = 0  # failed configs of every key
    failures_listed: list[tuple[list[Any], str, str]] = field(default_factory=list)  # the first few


def digest(page: Page) -> Digest:
    """Read the page's keys one at a time in key order and fold each into a Digest.

    Memory: the key names (listed first, to know where the evenly spaced samples fall),
    then one entry at a time, plus the at most MAX_TABLE_ROWS summaries and MAX_KEYS_DRAWN
    entries it keeps: it does not grow with the page beyond its key names.
    """
    count, entries = page_entries(page)
    rows = set(evenly(range(count), MAX_TABLE_ROWS))
    plotted = set(evenly(range(count), MAX_KEYS_DRAWN))
    imported = is_imported(page.doc)
    found = Digest()
    for position, entry in entries:
        summary = summarise(entry, imported)
        found.keys += 1
        found.failures += len(summary.failures)
        room = MAX_FAILURES_LISTED - len(found.failures_listed)
        found.failures_listed += [(summary.key, cid, e) for cid, e in summary.failures[:room]]
        if position in rows:
            found.table.append(summary)
        if position in plotted:
            found.drawn.append(summary)
            found.drawn_entries.append(entry)
    return found


def page_section(page: Page) -> str:
    """One kernel page's section of the report (run in a worker process: a pure function
    but for the BookWarnings of key files it cannot read)."""
    found = digest(page)
    summaries, drawn = found.table, found.drawn
    key_names = ", ".join(map(str, page.doc.kernel.get("key", [])))
    esc = html.escape
    sampled = (
        f"<p class='dim'>{len(summaries)} of {found.keys} keys shown, evenly spaced in key order "
        f"({len(drawn)} in the plots); <code>tunebook show --json</code> lists every key.</p>"
        if len(summaries) < found.keys
        else ""
    )
    rows = "".join(
        f"<tr><td>{esc(fmt_key(s.key))}</td><td>{esc(winner_cell(s))}</td>"
        f"<td class='num'>{fmt_time(s.winner_ms)}</td><td class='num'>{esc(reference_cell(s))}</td>"
        f"<td class='num'>{_speedup_cell(s)}</td>"
        f"<td class='num'>{s.configs}</td><td class='num'>{len(s.failures)}</td></tr>"
        for s in summaries
    )
    parts = [
        f"<section class='page'><h2>{esc(page.kernel_name)} <span class='dim'>{page.identity.id}</span> on "
        f"{esc(page.platform_label)}</h2>",
        f"<p class='dim'>{esc(page.path.name)} · key ({esc(key_names)}) + argument dtypes · "
        f"{found.keys} keys</p>",
        sampled,
        "<table><tr><th>key</th><th>winner</th><th>time</th>"
        f"<th>{reference_header('first')}</th><th>speed-up</th>"
        f"<th>configs</th><th>failed</th></tr>{rows}</table>",
        *(f"<p class='dim'>{esc(note)}</p>" for note in reference_notes(summaries)),
        *(f"<p class='miss'>{esc(line)}</p>" for line in [misses_line(summaries, page.kernel_name)] if line),
        _img(
            "tuned vs first config",
            "Per key: the first config's median time (what the kernel runs untuned) and the winner's.",
            tuned_vs_reference(drawn),
        ),
        _heatmap(landscape(found.drawn_entries)),
    ]
    if found.failures:
        items = "".join(
            f"<li>{esc(fmt_key(k))} {esc(cid)}: <span class='dim'>{esc(e[:300])}</span></li>"
            for k, cid, e in found.failures_listed
        )
        listed = len(found.failures_listed)
        more = (
            f"<p class='dim'>the first {listed} shown, in key order; <code>tunebook show</code> lists "
            f"all {found.failures}</p>"
            if listed < found.failures
            else ""
        )
        parts.append(
            f"<details><summary>{found.failures} failed configs</summary><ul>{items}</ul>{more}</details>"
        )
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def rendered_page(page: Page) -> tuple[str, list[tuple[Path, str]]]:
    """(the page's section, the files skipped while reading its keys, with the reasons):
    a streamed page's keys are read here, in the worker, so their warnings come back too."""
    with skipped_as(page.path) as skipped:
        section = page_section(page)
    return section, skipped


def _speedup_cell(s: KeySummary) -> str:
    if s.speedup is not None:
        return f"{s.speedup:.2f}x"
    return "imported" if s.imported else "-"


def render_sections(
    pages: list[Page], workers: int, advance: Callable[[], None] = lambda: None
) -> list[tuple[str, list[tuple[Path, str]]]]:
    """Every page's :func:`rendered_page`, in the order of ``pages``; in ``workers``
    processes when above 1."""
    if workers <= 1 or len(pages) < MIN_PAGES_IN_PARALLEL:
        sections = []
        for page in pages:
            sections.append(rendered_page(page))
            advance()
        return sections
    # spawn, not fork: the parent may hold threads (the progress display) and fork would copy them.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(rendered_page, page): i for i, page in enumerate(pages)}
        done: dict[int, tuple[str, list[tuple[Path, str]]]] = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            advance()
    return [done[i] for i in range(len(pages))]


def render(pages: list[Page], source: Path, workers: int = 1) -> tuple[str, list[tuple[Path, str]]]:
    """The whole HTML page, with progress on stderr, and the key files skipped on the way."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _check_matplotlib()
    ordered = sorted(pages, key=lambda p: (p.kernel_name, p.platform_label))
    with Progress(
        TextColumn("rendering plots"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err()
    ) as progress:
        task = progress.add_task("", total=len(ordered))
        sections = render_sections(ordered, workers, lambda: progress.advance(task))
    body = "\n".join(section for section, _ in sections)
    text = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>tunebook report: {html.escape(str(source))}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>tunebook report</h1><p class='dim'>book {html.escape(str(source))} · "
        f"{len(pages)} kernel pages · tunebook {__version__} · "
        "speed-ups are against each key's first config, the one the kernel runs untuned "
        "(labelled median where it has no timing: the median measured config instead)</p>\n"
        f"{body}\n</body></html>\n"
    )
    return text, [skip for _, skipped in sections for skip in skipped]


def _check_not_a_book(output: Path) -> None:
    """Refuse an -o that would replace what is not a report: a file of a page (a key file or
    page.json: the report's HTML over it lost a key's results, or the whole page), or any
    file that exists and is not HTML (a format-1 book file, a typo'd path to something else)."""
    if is_page_dir(output.parent):
        raise click.BadParameter(
            f"{output} is inside the page {output.parent} of a book: the report would replace a "
            "file of the book. Give a file outside the book, e.g. report.html",
            param_hint="-o",
        )
    try:
        if not stat.S_ISREG(os.stat(output).st_mode):
            return  # a FIFO or a terminal would block a read: writing it says what it is
        with output.open("rb") as f:
            start = f.read(512).lstrip().lower()
    except OSError:
        return  # nothing there yet (a directory is click's to refuse), or unreadable: writing says why
    if start and not start.startswith((b"<!doctype html", b"<html")):
        raise click.BadParameter(
            f"{output} exists and is not an HTML page (a report replaces only its own earlier "
            "output); give another file, or remove it first",
            param_hint="-o",
        )


@click.command("report")
@book_argument
@output_option("HTML file to write.", directory=False)
@click.option("--kernel", "kernels", multiple=True, metavar="NAME", help="Only this kernel (repeatable).")
@click.option(
    "--jobs",
    "jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes rendering plots (default: one per CPU core, at most 8).",
)
def command(book: Path | None, output: Path, kernels: tuple[str, ...], jobs: int | None) -> None:
    """Write an HTML report of BOOK with embedded plots: tuned vs first config, config landscape."""
    # Streamed: each page's keys are read one at a time where its section is rendered, so the
    # report's memory does not grow with the book (see digest).
    _check_not_a_book(output)
    loaded = load_or_fail(book, stream=True)
    pages = select_pages(loaded, kernels)
    warn_skipped(loaded)
    fix = output_fix(output.parent, "Choose another file with -o")
    problem = write_problem(output.parent)  # before rendering, which takes a while
    if problem is not None:
        raise click.ClickException(f"cannot write {output}: {problem}. {fix}")
    text, skipped = render(pages, loaded.source, jobs or min(8, os.cpu_count() or 1))
    warn_skipped(Loaded(loaded.source, skipped=skipped))
    with writing(output, fix):
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text)
    out().print(f"wrote {escape(str(output))} ({len(pages)} kernel pages)")
