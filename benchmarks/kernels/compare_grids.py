"""Compare served attention grids: runs of ``paged_attention.py`` or ``varlen_attention.py``
(their ``OP.json``), a change (``--new``) against what it replaces (``--old``).

Machines are shared and noisy, so the two sides are timed in one call, on one machine, in
fresh processes, and the ratios compared are each run's own: per cell, the baseline's time
over tunebook's (SDPA / ours, > 1: ours faster), timed in the same run. With several runs a
side, a cell's ratio is their geometric mean, and the spread between a side's runs is
printed: the noise a change must beat.

Prints the geometric mean over the cells both sides have of new ÷ old, its range, the cells
that moved most, and per side: cells at the baseline or better, configs benchmarked and
fallbacks (a served grid must have none), and for decode the issue's two targets (batch ≥ 8
at SDPA or better; contexts of 8k tokens or more under 0.70 of a copy, and, where the grid
timed a copy of each cell's bytes, under 0.70 of that copy). ``--table`` adds
the per-cell table BENCHMARKS.md shows: decode as (head layout, batch) rows by context columns.

    python benchmarks/kernels/compare_grids.py --new NEW.json [NEW2.json] --old OLD.json [OLD2.json]
    python benchmarks/kernels/compare_grids.py --table \
        --new A/paged_attention_decode.json --old B/paged_attention_decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import geometric_mean as geomean
from typing import Any

DECODE = "paged_attention_decode"
# Issue 13's decode targets: at least SDPA from this batch on, at least this share of a copy
# from this context on.
TARGET_BATCH, TARGET_CONTEXT, TARGET_OF_COPY = 8, 8192, 0.70


@dataclass
class Cell:
    """One cell over a side's runs: the geometric means of its ratio and share of a copy."""

    row: dict[str, Any]  # the first run's row (shape, tokens, config)
    ratio: float  # baseline / tunebook
    of_copy: float | None
    of_same_copy: float | None  # a copy of the op's bytes over tunebook's time (GPU runs since session 28)


def load(paths: Sequence[Path], baseline: str) -> tuple[str, list[dict[str, dict[str, Any]]], str]:
    """Each run's timed rows by label, the op (every run must be of the same one), and what
    was left out, in words ("" if nothing): rows a deadline skipped, rows timed against
    other baselines."""
    ops, runs = set(), []
    skipped, others = 0, Counter[str]()
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not a benchmark's results file ({exc})") from None
        meta = doc.get("meta") if isinstance(doc, dict) else None
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or not isinstance(results, list):
            raise SystemExit(f"{path}: no 'meta' and 'results': not a benchmark's results file")
        ops.add(meta.get("op"))
        rows = [r for r in results if isinstance(r, dict)]
        runs.append({r["label"]: r for r in rows if f"{baseline}/tunebook" in (r.get("ratios") or {})})
        for r in rows:
            ratios = r.get("ratios") or {}
            if "skipped" in r:
                skipped += 1
            elif f"{baseline}/tunebook" not in ratios:
                names = [k.removesuffix("/tunebook") for k in ratios if k.endswith("/tunebook")]
                others[", ".join(n for n in names if n.startswith("sdpa")) or "no baseline"] += 1
    if len(ops) != 1:
        raise SystemExit(f"the files are of different ops ({sorted(map(str, ops))}): compare one op's grids")
    notes = [f"{skipped} skipped by a deadline"] if skipped else []
    notes += [f"{n} timed against {name} instead (--baseline)" for name, n in sorted(others.items())]
    return ops.pop(), runs, "; ".join(notes)


def cells(runs: list[dict[str, dict[str, Any]]], baseline: str) -> dict[str, Cell]:
    """The cells every run of a side has."""
    labels = [label for label in runs[0] if all(label in run for run in runs)]
    out = {}
    for label in labels:
        rows = [run[label] for run in runs]
        copies = [r["timings"]["tunebook"].get("of_copy") for r in rows]
        same = [r["ratios"].get("copy/tunebook") for r in rows]
        out[label] = Cell(
            rows[0],
            geomean([r["ratios"][f"{baseline}/tunebook"] for r in rows]),
            geomean(copies) if all(c for c in copies) else None,
            geomean(same) if all(c for c in same) else None,
        )
    return out


def noise(runs: list[dict[str, dict[str, Any]]], baseline: str) -> str | None:
    """A side's second run over its first: geometric mean and range of the cells' ratios."""
    if len(runs) < 2:
        return None
    both = [label for label in runs[0] if label in runs[1]]
    name = f"{baseline}/tunebook"
    moves = [runs[1][x]["ratios"][name] / runs[0][x]["ratios"][name] for x in both]
    return f"{geomean(moves):.3f} ({min(moves):.3f}-{max(moves):.3f} a cell)"


def side_summary(op: str, side: dict[str, Cell], runs: list[dict[str, dict[str, Any]]], baseline: str) -> str:
    at = sum(c.ratio >= 1 for c in side.values())
    benchmarked = sum(r["tuning"]["configs_benchmarked"] for run in runs for r in run.values())
    fallbacks = sum(bool(r["tuning"]["fallback"]) for run in runs for r in run.values())
    parts = [f"at {baseline} or better {at} of {len(side)}"]
    if op == DECODE:
        many = [c for c in side.values() if c.row["tokens"] >= TARGET_BATCH]
        at_many = sum(c.ratio >= 1 for c in many)
        parts.append(f"batch >= {TARGET_BATCH} at {baseline} or better {at_many} of {len(many)}")
        long = [c for c in side.values() if c.row["shape"]["context"] >= TARGET_CONTEXT]
        under = sum(c.of_copy is not None and c.of_copy < TARGET_OF_COPY for c in long)
        parts.append(
            f"contexts >= {TARGET_CONTEXT} under {TARGET_OF_COPY:.2f} of copy {under} of {len(long)}"
        )
        same = [c.of_same_copy for c in long if c.of_same_copy is not None]
        if same:  # grids timed with a copy of each cell's bytes
            below = sum(share < TARGET_OF_COPY for share in same)
            parts.append(f"of a copy of the same bytes {below} of {len(same)}")
    parts.append(f"benchmarked {benchmarked}, fallbacks {fallbacks} over {len(runs)} run(s)")
    return "; ".join(parts)


def short(cell: Cell) -> str:
    shape = ",".join(f"{k}={v}" for k, v in cell.row["shape"].items())
    config = " ".join(f"{k}={v}" for k, v in cell.row.get("tuned_config", {}).items())
    return f"{shape} x{cell.row['tokens']}  [{config}]"


def table(op: str, new: dict[str, Cell], old: dict[str, Cell]) -> list[str]:
    """Markdown: new (old) per cell; decode as (layout, batch) rows by context columns."""
    common = [x for x in new if x in old]
    if op != DECODE:
        lines = ["| cell | new (old) |", "| --- | --- |"]
        return lines + [f"| {short(new[x])} | {new[x].ratio:.2f} ({old[x].ratio:.2f}) |" for x in common]
    grid: dict[tuple[str, int], dict[int, str]] = {}
    contexts: set[int] = set()
    for x in common:
        s = new[x].row["shape"]
        context = s["context"]
        contexts.add(context)
        text = f"{new[x].ratio:.2f} ({old[x].ratio:.2f})"
        grid.setdefault((f"{s['n_q']}/{s['n_kv']}", new[x].row["tokens"]), {})[context] = text
    columns = sorted(contexts)
    lines = ["| heads q/kv | batch | " + " | ".join(f"{c:,}" for c in columns) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(columns))
    for (layout, batch), row in grid.items():
        lines.append(f"| {layout} | {batch} | " + " | ".join(row.get(c, "—") for c in columns) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", nargs="+", type=Path, required=True, help="the change's runs (OP.json)")
    p.add_argument("--old", nargs="+", type=Path, required=True, help="the runs of what it replaces")
    p.add_argument("--baseline", default="sdpa", help="the variant whose time over tunebook's is compared")
    p.add_argument("--moved", type=int, default=8, help="cells listed at each end")
    p.add_argument("--table", action="store_true", help="the per-cell markdown table")
    opts = p.parse_args(argv)
    if opts.moved < 0:
        p.error(f"--moved: expected 0 or more; found {opts.moved}")
    op, new_runs, new_left = load(opts.new, opts.baseline)
    old_op, old_runs, old_left = load(opts.old, opts.baseline)
    if op != old_op:
        raise SystemExit(f"--new is {op} and --old is {old_op}: compare one op's grids")
    new, old = cells(new_runs, opts.baseline), cells(old_runs, opts.baseline)
    common = [x for x in new if x in old]
    if not common:
        raise SystemExit("the two sides have no cell in common (other shapes, or no timed cells)")
    moves = sorted((new[x].ratio / old[x].ratio, x) for x in common)
    print(
        f"{op}: {len(common)} cells; geomean new/old of {opts.baseline}/tunebook "
        f"{geomean([m for m, _ in moves]):.3f}; range {moves[0][0]:.3f}-{moves[-1][0]:.3f}"
    )
    for name, side, runs in (("new", new, new_runs), ("old", old, old_runs)):
        print(f"{name}: {side_summary(op, side, runs, opts.baseline)}")
        spread = noise(runs, opts.baseline)
        if spread:
            print(f"{name}: second run over first {spread}: the noise")
    for name, left in (("new", new_left), ("old", old_left)):
        if left:
            print(f"{name}: rows left out: {left}")
    shown = moves if len(moves) <= 2 * opts.moved else moves[: opts.moved] + moves[len(moves) - opts.moved :]
    print(f"\nmoved most (new/old, {opts.baseline}/tunebook new and old, the cell with new's config):")
    for m, x in shown:
        print(f"{m:.3f}  {new[x].ratio:.3f} {old[x].ratio:.3f}  {short(new[x])}")
    if opts.table:
        print("\n" + "\n".join(table(op, new, old)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
