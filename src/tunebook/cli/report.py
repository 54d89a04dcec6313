"""``tunebook report``: one self-contained HTML page with plots, for people reviewing a book.

Per kernel page: a table of winners; "tuned vs first config" (the winner's time and the
reference config's time per key: the first config, the one the kernel runs untuned, or
where it has no timing the median config, hatched — see _summary); and the config
landscape, a heatmap of every config's time relative to the key's winner (grey: failed or
not measured). Plots are PNGs embedded as base64, so the page can be mailed or archived.
Needs matplotlib (``pip install 'tunebook[report]'``), imported only by this command.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import click

from .._autotuner import __version__
from .._book.files import atomic_write_text
from ._common import (
    book_argument,
    existing_parent,
    load_or_fail,
    out,
    output_option,
    select_pages,
    warn_skipped,
    writing,
)
from ._load import Page
from ._summary import (
    KeySummary,
    fmt_key,
    fmt_time,
    misses_line,
    reference_cell,
    reference_header,
    reference_notes,
    short_config,
    sorted_entries,
    summarise_page,
    winner_cell,
)

INSTALL_LINE = "pip install 'tunebook[report]'"
MAX_CONFIG_ROWS = 60  # more rows than this make an unreadable heatmap; the fastest are kept
MAX_ANNOTATED_CELLS = 400

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; }
h2 { font-size: 1.2em; margin-top: 2em; border-top: 1px solid #ccc; padding-top: 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.dim { color: #777; } .miss { color: #a60; } img { max-width: 100%; display: block; margin: 0.5em 0; }
"""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException(f"the report needs matplotlib; install it with:\n{INSTALL_LINE}") from None
    matplotlib.use("Agg")  # no display needed, and never a GUI window from a CLI
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tuned_vs_reference(plt: Any, summaries: list[KeySummary]) -> str | None:
    rows = [s for s in summaries if s.winner_ms is not None and s.reference_ms is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 3), 3.6))
    xs = range(len(rows))
    width = 0.4
    bars = ax.bar(
        [x - width / 2 for x in xs],
        [s.reference_ms for s in rows],
        width,
        label="first config (untuned)",
        color="#bbbbbb",
    )
    fallback = [bar for bar, s in zip(bars, rows) if s.reference_note is not None]
    for bar in fallback:
        bar.set_hatch("//")
    if fallback:  # a legend entry for the hatched bars only when there are some
        fallback[0].set_label("median config (first config has no timing)")
    ax.bar(
        [x + width / 2 for x in xs],
        [s.winner_ms for s in rows],
        width,
        label="tuned (winner)",
        color="#2b7bba",
    )
    for x, s in enumerate(rows):
        if s.speedup is not None:
            ax.annotate(
                f"{s.speedup:.2f}x",
                (x, max(s.reference_ms or 0, s.winner_ms or 0)),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(list(xs), [_short_key(s.key) for s in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("median time (ms)")
    ax.set_title("tuned vs first config, per key")
    ax.legend(fontsize=8)
    return _png(fig)


def landscape(plt: Any, page: Page) -> str | None:
    """Heatmap: configs (rows) x keys (columns), time relative to the key's winner."""
    entries = sorted_entries(page.doc)
    configs = sorted({cid for e in entries for cid in e.results})
    if len(entries) == 0 or len(configs) < 2:
        return None

    def score(cid: str) -> float:  # geometric mean of relative time: the overall fastest on top
        logs = []
        for e in entries:
            best, result = e.best(), e.results.get(cid)
            if best is not None and result is not None and result.ok and e.results[best].median > 0:
                logs.append(math.log(result.median / e.results[best].median))
        return math.exp(sum(logs) / len(logs)) if logs else math.inf

    configs = sorted(configs, key=lambda c: (score(c), c))[:MAX_CONFIG_ROWS]
    grid = []
    for cid in configs:
        row = []
        for e in entries:
            best, result = e.best(), e.results.get(cid)
            ok = best is not None and result is not None and result.ok and e.results[best].median > 0
            row.append(result.median / e.results[best].median if ok else math.nan)
        grid.append(row)
    import numpy as np

    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(entries) + 4), max(2.5, 0.28 * len(configs) + 1.5)))
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="#dddddd")
    vmax = float(min(np.nanmax(np.array(grid, dtype=float)), 4.0)) if data.count() else 2.0
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=1.0, vmax=max(vmax, 1.01))
    if len(configs) * len(entries) <= MAX_ANNOTATED_CELLS:  # numbers beat colours when they fit
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if value > (vmax + 1) / 2 else "black",
                    )
    ax.set_xticks(
        range(len(entries)), [_short_key(list(e.key)) for e in entries], rotation=45, ha="right", fontsize=7
    )
    labels = [short_config(_config_of(page, cid)) for cid in configs]
    ax.set_yticks(range(len(configs)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, label="time / winner's time (grey: failed or not measured)")
    ax.set_title("config landscape")
    return _png(fig)


def _config_of(page: Page, cid: str) -> dict[str, Any]:
    for entry in page.doc.entries.values():
        if cid in entry.results:
            return entry.results[cid].config
    return {}


def _short_key(key: list[Any]) -> str:
    """The key without its dtype tail when every dtype is the same: labels stay readable."""
    dtypes = [v for v in key if isinstance(v, str) and v.startswith("torch.")]
    shown = [v for v in key if v not in dtypes] if len(set(dtypes)) <= 1 else key
    return fmt_key(shown) if shown else fmt_key(key)


def _page_html(plt: Any, page: Page) -> str:
    summaries = summarise_page(page.doc)
    key_names = ", ".join(map(str, page.doc.kernel.get("key", [])))
    esc = html.escape
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
        f"{len(summaries)} keys</p>",
        "<table><tr><th>key</th><th>winner</th><th>time</th>"
        f"<th>{reference_header('first')}</th><th>speed-up</th>"
        f"<th>configs</th><th>failed</th></tr>{rows}</table>",
        *(f"<p class='dim'>{esc(note)}</p>" for note in reference_notes(summaries)),
        *(f"<p class='miss'>{esc(line)}</p>" for line in [misses_line(summaries, page.kernel_name)] if line),
    ]
    for title, png in (
        ("tuned vs first config", tuned_vs_reference(plt, summaries)),
        ("config landscape", landscape(plt, page)),
    ):
        if png is not None:
            parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    failures = [(s.key, cid, e) for s in summaries for cid, e in s.failures]
    if failures:
        items = "".join(
            f"<li>{esc(fmt_key(k))} {esc(cid)}: <span class='dim'>{esc(e[:300])}</span></li>"
            for k, cid, e in failures[:200]
        )
        parts.append(f"<details><summary>{len(failures)} failed configs</summary><ul>{items}</ul></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _speedup_cell(s: KeySummary) -> str:
    if s.speedup is not None:
        return f"{s.speedup:.2f}x"
    return "imported" if s.imported else "-"


def render(pages: list[Page], source: Path) -> str:
    plt = _pyplot()
    body = "\n".join(
        _page_html(plt, p) for p in sorted(pages, key=lambda p: (p.kernel_name, p.platform_label))
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>tunebook report: {html.escape(str(source))}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>tunebook report</h1><p class='dim'>book {html.escape(str(source))} · "
        f"{len(pages)} kernel pages · tunebook {__version__} · "
        "speed-ups are against each key's first config, the one the kernel runs untuned "
        "(labelled median where it has no timing: the median measured config instead)</p>\n"
        f"{body or '<p>This book has no readable files.</p>'}\n</body></html>\n"
    )


@click.command("report")
@book_argument
@output_option("HTML file to write.", directory=False)
@click.option("--kernel", "kernels", multiple=True, metavar="NAME", help="Only this kernel (repeatable).")
def command(book: Path | None, output: Path, kernels: tuple[str, ...]) -> None:
    """Write an HTML report of BOOK with embedded plots: tuned vs first config, config landscape."""
    loaded = load_or_fail(book)
    pages = select_pages(loaded, kernels)
    warn_skipped(loaded)
    text = render(pages, loaded.source)
    with writing(output, f"Choose another file with -o, or make {existing_parent(output.parent)} writable."):
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text)
    out().print(f"wrote {output} ({len(pages)} kernel pages)")
