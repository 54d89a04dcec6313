"""Draw a served decode grid (``paged_attention.py``'s ``paged_attention_decode.json``) as
the picture of where issue 13's two decode targets stand.

One column of panels per head layout (query/KV heads), batch sizes down, contexts across:

* top: SDPA's time over tunebook's, timed in the same run (> 1: tunebook faster), on a
  diverging scale centred on 1. The target: at least 1 from batch 8 on (those cells are
  framed).
* bottom: tunebook's achieved KV-read bandwidth as a share of the device's copy bandwidth
  measured in the same run. The target: at least 0.70 from 8,192 tokens on (framed).

Every cell shows its number; a cell that misses its target is labelled in bold, and cells
outside a target's region are faded. Several runs
of one grid (``--runs A.json B.json``) are combined per cell by the geometric mean, as
``compare_grids.py`` combines them; runs of different layouts (the 128-wide heads' grid and
SmolLM2's) are drawn side by side.

    python benchmarks/kernels/grid_picture.py --runs A/paged_attention_decode.json \
        B/paged_attention_decode.json --out decode-grid.png

Needs matplotlib (``pip install 'tunebook[report]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import geometric_mean
from typing import Any

from compare_grids import DECODE, TARGET_BATCH, TARGET_CONTEXT, TARGET_OF_COPY

DPI = 110
FADED = 0.35  # the colour's opacity outside a target's region


@dataclass(frozen=True)
class Point:
    layout: str  # "32/8": query heads / KV heads
    head_size: int
    batch: int
    context: int
    ratio: float  # SDPA / tunebook
    of_copy: float | None  # tunebook's bandwidth / the device copy's


def points(paths: Sequence[Path]) -> tuple[list[Point], dict[str, Any]]:
    """Every timed cell of the runs (a cell in several runs: their geometric mean), and the
    first run's meta (device, versions, date)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    metas: list[dict[str, Any]] = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not a benchmark's results file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("meta", {}).get("op") != DECODE:
            raise SystemExit(f"{path}: not a {DECODE} grid (paged_attention.py's {DECODE}.json)")
        metas.append(doc["meta"])
        for row in doc["results"]:
            if "sdpa/tunebook" in row.get("ratios", {}):
                rows.setdefault(row["label"], []).append(row)
    if not rows:
        raise SystemExit("the runs hold no cell timed against SDPA: nothing to draw")
    out = []
    for same in rows.values():
        shape = same[0]["shape"]
        shares = [r["timings"]["tunebook"].get("of_copy") for r in same]
        out.append(
            Point(
                f"{shape['n_q']}/{shape['n_kv']}",
                int(shape["head_size"]),
                int(same[0]["tokens"]),
                int(shape["context"]),
                geometric_mean([r["ratios"]["sdpa/tunebook"] for r in same]),
                geometric_mean(shares) if all(shares) else None,
            )
        )
    return out, metas[0]


def draw(cells: list[Point], meta: dict[str, Any], out: Path) -> None:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    layouts = sorted(
        {(p.head_size, p.layout) for p in cells}, key=lambda hl: (-hl[0], -int(hl[1].split("/")[0]))
    )
    batches_of = {hl: sorted({p.batch for p in cells if (p.head_size, p.layout) == hl}) for hl in layouts}
    contexts_of = {hl: sorted({p.context for p in cells if (p.head_size, p.layout) == hl}) for hl in layouts}
    widths = [max(2, len(contexts_of[hl])) for hl in layouts]
    tallest = max(len(b) for b in batches_of.values())
    fig = Figure(figsize=(1.15 * sum(widths) + 1.5, 0.42 * tallest * 2 + 2.6), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, len(layouts), width_ratios=widths)
    ratio_norm = TwoSlopeNorm(vcenter=1.0, vmin=0.8, vmax=1.6)
    share_norm = TwoSlopeNorm(vcenter=TARGET_OF_COPY, vmin=0.0, vmax=1.0)
    for column, hl in enumerate(layouts):
        batches, contexts = batches_of[hl], contexts_of[hl]
        at = {(p.batch, p.context): p for p in cells if (p.head_size, p.layout) == hl}
        for panel, (what, norm, target) in enumerate(
            (("SDPA / tunebook", ratio_norm, 1.0), ("share of copy bandwidth", share_norm, TARGET_OF_COPY))
        ):
            ax = fig.add_subplot(grid[panel, column])
            values = [
                [
                    (
                        (at[b, c].ratio if panel == 0 else at[b, c].of_copy)
                        if (b, c) in at and (panel == 0 or at[b, c].of_copy is not None)
                        else float("nan")
                    )
                    for c in contexts
                ]
                for b in batches
            ]
            # Cells outside the target's region are faded: they show where tunebook stands,
            # but the eye should go to the framed cells the target is about.
            alpha = [
                [
                    1.0 if (b >= TARGET_BATCH if panel == 0 else c >= TARGET_CONTEXT) else FADED
                    for c in contexts
                ]
                for b in batches
            ]
            ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto", alpha=alpha)
            for i, b in enumerate(batches):
                for j, c in enumerate(contexts):
                    value = values[i][j]
                    if value != value:  # NaN: the grid has no such cell
                        ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="#777777")
                        continue
                    framed = b >= TARGET_BATCH if panel == 0 else c >= TARGET_CONTEXT
                    missed = framed and value < target
                    dark = framed and abs(float(norm(value)) - 0.5) > 0.33  # white text on deep colours
                    ax.text(
                        j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if missed else "normal", color="white" if dark else "black",
                    )  # fmt: skip
                    if framed:
                        ax.add_patch(
                            Rectangle(
                                (j - 0.5, i - 0.5),
                                1,
                                1,
                                fill=False,
                                lw=1.4,
                                ec="black" if missed else "#555555",
                            )
                        )
            ax.set_xticks(range(len(contexts)), [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
            ax.set_yticks(range(len(batches)), [str(b) for b in batches])
            ax.tick_params(labelsize=8)
            if column == 0:
                ax.set_ylabel(f"{what}\nbatch", fontsize=9)
            if panel == 0:
                ax.set_title(f"heads {hl[1]} x {hl[0]}", fontsize=10)
            else:
                ax.set_xlabel("context (tokens)", fontsize=9)
    fig.suptitle(
        f"paged_attention_decode, served ({meta.get('device', '?')}, Triton {meta.get('triton', '?')}, "
        f"torch {meta.get('torch', '?')}, {meta.get('date', '?')}): framed cells are issue 13's targets "
        f"(SDPA / tunebook >= 1 at batch >= {TARGET_BATCH}; >= {TARGET_OF_COPY:.2f} of copy from "
        f"{TARGET_CONTEXT:,} tokens), bold where missed",
        fontsize=9,
    )
    fig.savefig(out, dpi=DPI)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="runs of paged_attention.py (OP.json)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    opts = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("grid_picture.py needs matplotlib: pip install 'tunebook[report]'") from None
    cells, meta = points(opts.runs)
    draw(cells, meta, opts.out)
    many = [c for c in cells if c.batch >= TARGET_BATCH]
    long = [c for c in cells if c.context >= TARGET_CONTEXT and c.of_copy is not None]
    print(
        f"{opts.out}: {len(cells)} cells; batch >= {TARGET_BATCH} at SDPA or better "
        f"{sum(c.ratio >= 1 for c in many)} of {len(many)}; contexts >= {TARGET_CONTEXT} at "
        f"{TARGET_OF_COPY:.2f} of copy or more {sum(c.of_copy >= TARGET_OF_COPY for c in long if c.of_copy)} "
        f"of {len(long)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
