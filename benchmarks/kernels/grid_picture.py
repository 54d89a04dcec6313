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

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import geometric_mean
from typing import Any

import _heatmap
from _heatmap import Panel
from compare_grids import DECODE, TARGET_BATCH, TARGET_CONTEXT, TARGET_OF_COPY


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
        meta = doc.get("meta") if isinstance(doc, dict) else None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or meta.get("op") != DECODE or not isinstance(results, list):
            raise SystemExit(f"{path}: not a {DECODE} grid (paged_attention.py's {DECODE}.json)")
        metas.append(meta)
        for row in results:
            if isinstance(row, dict) and "sdpa/tunebook" in (row.get("ratios") or {}):
                rows.setdefault(row["label"], []).append(row)
    if not rows:
        raise SystemExit("the runs hold no cell timed against SDPA: nothing to draw")
    # A cell is (layout, batch, context): runs of two block sizes would overwrite each other's.
    blocks = sorted({int(same[0]["shape"].get("page", 16)) for same in rows.values()})
    if len(blocks) > 1:
        raise SystemExit(
            f"the runs hold cells of cache blocks of {' and '.join(map(str, blocks))} tokens; "
            "draw one block size at a time"
        )
    metas[0] = {**metas[0], "block": blocks[0]}
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
    layouts = sorted(
        {(p.head_size, p.layout) for p in cells}, key=lambda hl: (-hl[0], -int(hl[1].split("/")[0]))
    )
    top, bottom = [], []
    for column, hl in enumerate(layouts):
        at = {(p.batch, p.context): p for p in cells if (p.head_size, p.layout) == hl}
        batches, contexts = sorted({b for b, _ in at}), sorted({c for _, c in at})
        names = [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts]
        nan = float("nan")
        ratios = [[at[b, c].ratio if (b, c) in at else nan for c in contexts] for b in batches]
        shares = [[_share(at.get((b, c))) for c in contexts] for b in batches]
        top.append(
            Panel(
                ratios,
                [[b >= TARGET_BATCH for _ in contexts] for b in batches],
                [str(b) for b in batches],
                names,
                target=1.0,
                low=0.8,
                high=1.6,
                title=f"heads {hl[1]} x {hl[0]}",
                ylabel="SDPA / tunebook\nbatch" if column == 0 else "",
            )
        )
        bottom.append(
            Panel(
                shares,
                [[c >= TARGET_CONTEXT for c in contexts] for _ in batches],
                [str(b) for b in batches],
                names,
                target=TARGET_OF_COPY,
                low=0.0,
                high=1.0,
                ylabel="share of copy bandwidth\nbatch" if column == 0 else "",
                xlabel="context (tokens)",
            )
        )
    title = (
        f"paged_attention_decode, served, blocks of {meta.get('block', 16)} tokens "
        f"({meta.get('device', '?')}, Triton {meta.get('triton', '?')}, "
        f"torch {meta.get('torch', '?')}, {meta.get('date', '?')}): framed cells are issue 13's targets "
        f"(SDPA / tunebook >= 1 at batch >= {TARGET_BATCH}; >= {TARGET_OF_COPY:.2f} of copy from "
        f"{TARGET_CONTEXT:,} tokens), bold where missed"
    )
    _heatmap.draw([top, bottom], title, out)


def _share(point: Point | None) -> float:
    return point.of_copy if point is not None and point.of_copy is not None else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    opts = _heatmap.arguments(__doc__, "runs of paged_attention.py (OP.json)", argv)
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
