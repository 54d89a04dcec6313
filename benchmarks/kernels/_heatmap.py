"""Heatmaps of benchmark ratios against a target, drawn the same way for every op's picture
(``grid_picture.py``, ``linear_picture.py``): each cell's number written in it, the cells a
target applies to framed and their misses in bold, the other cells faded so that the eye
goes to the target's region, a diverging colour scale centred on the target.

Uses matplotlib's object API (no pyplot state); needs ``pip install 'tunebook[report]'``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 110
FADED = 0.35  # the colour's opacity outside a target's region


@dataclass(frozen=True)
class Panel:
    """One heatmap: ``values[row][column]`` (NaN: no such cell), ``framed[row][column]``
    where the target applies; the colour scale runs from ``low`` through ``target`` to
    ``high``."""

    values: list[list[float]]
    framed: list[list[bool]]
    rows: list[str]
    columns: list[str]
    target: float
    low: float
    high: float
    title: str = ""
    ylabel: str = ""
    xlabel: str = ""


def arguments(doc: str, runs: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """A picture script's command line (``--runs`` files, ``--out`` PNG), once matplotlib is
    known to be there."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help=runs)
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    opts = p.parse_args(argv)
    out: Path = opts.out
    if out.is_dir():  # matplotlib would write "<dir>.png" beside it, or refuse its suffix
        p.error(f"--out {out}: a directory; give the PNG file's path (such as {out / 'grid.png'})")
    if out.suffix.lower() != ".png":
        p.error(f"--out {out}: the picture is a PNG; give a path ending in .png")
    if not out.parent.is_dir():
        p.error(f"--out {out}: no directory {out.parent} to write it in")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        script = Path(sys.argv[0]).name
        raise SystemExit(f"{script} needs matplotlib: pip install 'tunebook[report]'") from None
    return opts


def draw(panels: Sequence[Sequence[Panel]], title: str, out: Path) -> None:
    """``panels[row][column]`` (rows may be shorter than others) into one figure, written to
    ``out`` (a PNG)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    across = max(len(row) for row in panels)  # a shorter row leaves its last places empty
    widths = [max(2, *(len(row[c].columns) for row in panels if c < len(row))) for c in range(across)]
    heights = [max(len(p.rows) for p in row) for row in panels]
    fig = Figure(
        figsize=(1.15 * sum(widths) + 1.5, 0.42 * sum(heights) + 1.3 * len(panels) + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    grid = fig.add_gridspec(len(panels), across, width_ratios=widths, height_ratios=heights)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            norm = TwoSlopeNorm(vcenter=panel.target, vmin=panel.low, vmax=panel.high)
            ax = fig.add_subplot(grid[r, c])
            alpha = [[1.0 if f else FADED for f in framed] for framed in panel.framed]
            ax.imshow(panel.values, cmap="RdBu", norm=norm, aspect="auto", alpha=alpha)
            for i, values in enumerate(panel.values):
                for j, value in enumerate(values):
                    _cell(ax, Rectangle, norm, i, j, value, panel.framed[i][j], panel.target)
            ax.set_xticks(range(len(panel.columns)), panel.columns)
            ax.set_yticks(range(len(panel.rows)), panel.rows)
            ax.tick_params(labelsize=8)
            if panel.title:
                ax.set_title(panel.title, fontsize=10)
            if panel.ylabel:
                ax.set_ylabel(panel.ylabel, fontsize=9)
            if panel.xlabel:
                ax.set_xlabel(panel.xlabel, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out, dpi=DPI)


def _cell(ax: Any, box: Any, norm: Any, i: int, j: int, value: float, framed: bool, target: float) -> None:
    if math.isnan(value):
        ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="#777777")
        return
    missed = framed and value < target
    dark = framed and abs(float(norm(value)) - 0.5) > 0.33  # white text on deep colours
    # A miss that rounds to the target (0.895 as "0.90") is shown to the third decimal.
    text = f"{value:.3f}" if missed and round(value, 2) >= target else f"{value:.2f}"
    ax.text(
        j, i, text, ha="center", va="center", fontsize=8,
        fontweight="bold" if missed else "normal", color="white" if dark else "black",
    )  # fmt: skip
    if framed:
        ax.add_patch(box((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.4, ec="black" if missed else "#555555"))
