"""The report's plots: tuned vs first config per key (a figure), and the config landscape
(a heatmap drawn as an HTML table).

Sized to be read at the page's natural size. The figure is drawn at ``DPI`` with text of
``FONT`` / ``SMALL`` points (about 14 / 12.5 px, the page's own text size) and shown
unscaled: a figure wider than the page scrolls sideways instead of shrinking its text.
The heatmap's numbers are page text, readable at any zoom.

Cost: the heatmap was a matplotlib figure of up to 60 x N annotated cells, ~0.5 s of the
~0.9 s a page took; as a table it costs nothing. The bar chart uses matplotlib's object
API (no pyplot state) with constrained layout: ~0.15 s on one idle core. ``report``
renders pages in parallel processes.

Needs matplotlib (``pip install 'tunebook[report]'``), imported on first use.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from typing import Any

from .._book.records import Entry
from ._summary import KeySummary, fmt_key, short_config

DPI = 100
FONT = 10
SMALL = 9
GREY, BLUE = "#bbbbbb", "#2b7bba"
MAX_CONFIG_ROWS = 60  # more rows than this make an unreadable heatmap; the fastest are kept


@dataclass(frozen=True)
class Plot:
    """A PNG (base64) and its size in pixels, so the page can show it unscaled."""

    png: str
    width: int
    height: int


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency, imported on first use
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # no GUI backend, ever, and no pyplot state shared between figures
    return fig


def _plot(fig: Any) -> Plot:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    return Plot(base64.b64encode(buffer.getvalue()).decode("ascii"), width, height)


def _time_unit(largest_ms: float) -> tuple[str, float]:
    """The unit that shows ``largest_ms`` with at most 3 digits before the point, and its scale."""
    for unit, scale in (("s", 1e3), ("ms", 1.0), ("µs", 1e-3)):
        if largest_ms >= scale:
            return unit, scale
    return "ns", 1e-6


def short_key(key: list[Any]) -> str:
    """The key without its dtype tail when every dtype is the same: labels stay readable."""
    dtypes = [v for v in key if isinstance(v, str) and v.startswith("torch.")]
    shown = [v for v in key if v not in dtypes] if len(set(dtypes)) <= 1 else key
    return fmt_key(shown) if shown else fmt_key(key)


# Characters of a key shown under its bars: a longer key is cut in its middle, so that keys
# differing in their first or last values stay told apart (a rotated label the figure crops
# shows only its tail).
MOST_TICK_CHARS = 40


def _tick_label(text: str) -> str:
    if len(text) <= MOST_TICK_CHARS:
        return text
    half = (MOST_TICK_CHARS - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def tuned_vs_reference(summaries: list[KeySummary]) -> Plot | None:
    """Grouped bars per key: the reference config's time (hatched where it is the median
    fallback) and the winner's, with the speed-up above each group."""
    fig = bars_figure(summaries)
    return _plot(fig) if fig is not None else None


def bars_figure(summaries: list[KeySummary]) -> Any:
    """The figure of :func:`tuned_vs_reference` (a matplotlib Figure), or None without timings."""
    rows = [s for s in summaries if s.winner_ms is not None and s.reference_ms is not None]
    if not rows:
        return None
    unit, scale = _time_unit(max(max(s.reference_ms or 0, s.winner_ms or 0) for s in rows))
    fig = _figure(max(6.5, 2.5 + 0.6 * len(rows)), 4.2)
    ax = fig.subplots()
    xs = list(range(len(rows)))
    width = 0.4
    reference = ax.bar(
        [x - width / 2 for x in xs], [(s.reference_ms or 0) / scale for s in rows], width, color=GREY
    )
    fallback = [bar for bar, s in zip(reference, rows) if s.reference_note is not None]
    for bar in fallback:
        bar.set_hatch("//")
    ax.bar([x + width / 2 for x in xs], [(s.winner_ms or 0) / scale for s in rows], width, color=BLUE)
    top = 0.0
    for x, s in zip(xs, rows):
        height = max(s.reference_ms or 0, s.winner_ms or 0) / scale
        top = max(top, height)
        if s.speedup is not None:
            ax.annotate(
                f"{s.speedup:.2f}x",
                (x, height),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=SMALL,
            )
    bottom = min(min(s.reference_ms or math.inf, s.winner_ms or math.inf) for s in rows) / scale
    if 0 < bottom and top / bottom > 30:  # keys across orders of magnitude: small ones stay visible
        ax.set_yscale("log")
        ax.set_ylim(bottom / 2, top * 2)
    else:
        ax.set_ylim(0, top * 1.15 or 1)  # headroom for the speed-up labels
    rotation = 30 if len(rows) > 6 else 0
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [_tick_label(short_key(s.key)) for s in rows],
        rotation=rotation,
        ha="right" if rotation else "center",
        fontsize=SMALL,
        parse_math=False,  # a key holding "$" is text, not TeX (an unbalanced one raised)
    )
    ax.tick_params(axis="y", labelsize=SMALL)
    ax.set_ylabel(f"median time ({unit})", fontsize=FONT)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=GREY, label="first config (untuned)")]
    if fallback:  # an entry for the hatched bars only when there are some
        handles.append(Patch(facecolor=GREY, hatch="//", label="median config (first config has no timing)"))
    handles.append(Patch(facecolor=BLUE, label="tuned (winner)"))
    # Above the plot, never over a bar or its label; one entry a line when the long one is there,
    # so that it never runs past the figure's edge.
    ax.legend(
        handles=handles,
        loc="lower left",
        bbox_to_anchor=(0, 1.01),
        ncol=1 if fallback else len(handles),
        fontsize=SMALL,
        frameon=False,
        borderaxespad=0,
    )
    return fig


# matplotlib's viridis at 9 even stops: the heatmap is an HTML table and needs no matplotlib.
VIRIDIS = ("#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725")
WORST = 4.0  # relative times from 1 (the winner) to this and beyond share the colour scale


def _colour(t: float) -> str:
    """viridis reversed at ``t`` in [0, 1]: yellow for the winner, dark purple for the slowest."""
    x = (1 - min(max(t, 0.0), 1.0)) * (len(VIRIDIS) - 1)
    lo = min(int(x), len(VIRIDIS) - 2)
    a, b = (tuple(int(c[k : k + 2], 16) for k in (1, 3, 5)) for c in VIRIDIS[lo : lo + 2])
    mix = [round(u + (v - u) * (x - lo)) for u, v in zip(a, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def landscape(entries: list[Entry]) -> str | None:
    """Heatmap as an HTML table: configs (rows, the overall fastest on top) x ``entries``
    (columns, in the order given), each cell the config's time relative to the key's winner.
    A table, not a picture: its numbers are text at the page's size at any zoom, and it
    costs nothing to draw."""
    configs = sorted({cid for e in entries for cid in e.results})
    if len(entries) == 0 or len(configs) < 2:
        return None

    def relative(entry: Any, cid: str) -> float:
        best, result = entry.best(), entry.results.get(cid)
        ok = best is not None and result is not None and result.ok and entry.results[best].median > 0
        return result.median / entry.results[best].median if ok else math.nan

    def score(cid: str) -> float:  # geometric mean of relative time
        logs = [math.log(v) for e in entries if not math.isnan(v := relative(e, cid))]
        return math.exp(sum(logs) / len(logs)) if logs else math.inf

    configs = sorted(configs, key=lambda c: (score(c), c))[:MAX_CONFIG_ROWS]
    esc = html.escape
    # Key headings may break after a comma: a column is as wide as its numbers, not its key.
    head = "".join(f"<th>{esc(short_key(list(e.key))).replace(',', ',<wbr>')}</th>" for e in entries)
    rows = []
    for cid in configs:
        cells = []
        for e in entries:
            value = relative(e, cid)
            if math.isnan(value):
                cells.append("<td class='na'></td>")
                continue
            t = (min(value, WORST) - 1) / (WORST - 1)
            ink = " class='dk'" if t > 0.5 else ""
            cells.append(f"<td{ink} style='background:{_colour(t)}'>{value:.2f}</td>")
        label = esc(short_config(_config_of(entries, cid)))
        rows.append(f"<tr><th title='{esc(cid)}'>{label}</th>{''.join(cells)}</tr>")
    scale = ", ".join(f"{_colour(i / 8)}" for i in range(9))
    legend = (
        f"<div class='scale'><span>1.00 (winner)</span><span class='bar' style='background:"
        f"linear-gradient(to right, {scale})'></span><span>{WORST:.2f} or slower</span>"
        "<span class='na'>failed or not measured</span></div>"
    )
    return f"{legend}<table class='heat'><tr><th>config ↓ key →</th>{head}</tr>{''.join(rows)}</table>"


def _config_of(entries: list[Entry], cid: str) -> dict[str, Any]:
    # A config's id is made from the config (records.config_id, checked on reading), so
    # every entry that has ``cid`` has the same config: any of them will do.
    for entry in entries:
        if cid in entry.results:
            return entry.results[cid].config
    return {}
