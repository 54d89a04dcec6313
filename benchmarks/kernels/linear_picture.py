"""Draw ``linear.py`` runs (its ``linear-<GPU>.json``) as the picture of where issue 12's
GEMM target stands: one panel per model, its layers down and the rows M across, each cell
cuBLAS's time over tunebook's in the same run (> 1: tunebook faster). The target, at least
0.90 from M = 1,024 on, frames those cells; misses are in bold, cells outside the target's
region faded. A cell in several runs is their geometric mean.

    python benchmarks/kernels/linear_picture.py --runs A/linear-NVIDIA_H200.json B/... --out linear.png

Needs matplotlib (``pip install 'tunebook[report]'``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import geometric_mean
from typing import Any

import _heatmap
from _heatmap import Panel
from _model_names import OLD_NAMES

TARGET_M, TARGET = 1024, 0.90  # issue 12: at least 0.90 of cuBLAS at M >= 1024
LAYERS = ("qkv", "o", "gate_up", "down")  # a decoder layer's GEMMs in the order they run
PER_ROW = 2  # panels a row: four models make a square figure


def cells(paths: Sequence[Path]) -> tuple[dict[tuple[str, str, int], float], list[dict[str, Any]]]:
    """(model, layer, M) -> tunebook's speed over cuBLAS (geometric mean over the runs), and
    each run's header."""
    ratios: dict[tuple[str, str, int], list[float]] = {}
    heads = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not a benchmark's results file ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise SystemExit(f"{path}: no 'rows': not linear.py's results (linear-<GPU>.json)")
        heads.append({k: v for k, v in doc.items() if k != "rows"})
        for row in doc["rows"]:
            if isinstance(row, dict) and "vs_cublas" in row:
                model = OLD_NAMES.get(row["model"], row["model"])  # runs before the pack's names: one panel
                ratios.setdefault((model, row["layer"], int(row["M"])), []).append(row["vs_cublas"])
    if not ratios:
        raise SystemExit("the runs hold no row timed against cuBLAS: nothing to draw")
    return {cell: geometric_mean(values) for cell, values in ratios.items()}, heads


def draw(at: dict[tuple[str, str, int], float], heads: list[dict[str, Any]], out: Path) -> None:
    models = sorted({m for m, _, _ in at})
    panels = []
    for column, model in enumerate(models):
        layers = [x for x in LAYERS if any((model, x, m) in at for _, _, m in at)]
        layers += sorted({x for m, x, _ in at if m == model and x not in layers})
        rows = sorted({m for mm, _, m in at if mm == model})
        panels.append(
            Panel(
                [[at.get((model, layer, m), float("nan")) for m in rows] for layer in layers],
                [[m >= TARGET_M for m in rows] for _ in layers],
                layers,
                [f"{m:,}" for m in rows],
                target=TARGET,
                low=0.6,
                high=1.2,
                title=model,
                ylabel="cuBLAS / tunebook\nlayer" if column % PER_ROW == 0 else "",
                xlabel="M (rows)",
            )
        )
    devices = sorted({str(h.get("device", "?")) for h in heads})
    torches = sorted({str(h.get("torch", "?")) for h in heads})
    title = (
        f"linear, served from the books ({', '.join(devices)}, torch {', '.join(torches)})\n"
        f"framed: issue 12's target (>= {TARGET:.2f} of cuBLAS from M = {TARGET_M:,}), bold where missed"
    )
    _heatmap.draw([panels[i : i + PER_ROW] for i in range(0, len(panels), PER_ROW)], title, out)


def main(argv: Sequence[str] | None = None) -> int:
    opts = _heatmap.arguments(__doc__, "linear.py runs (linear-<GPU>.json)", argv)
    at, heads = cells(opts.runs)
    draw(at, heads, opts.out)
    target = [v for (_, _, m), v in at.items() if m >= TARGET_M]
    print(
        f"{opts.out}: {len(at)} cells; M >= {TARGET_M:,} at {TARGET:.2f} of cuBLAS or more "
        f"{sum(v >= TARGET for v in target)} of {len(target)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
