"""Issue 3, measurement 2: how few configs each search strategy measures on real GPU tables.

Replays the recorded H200 timing tables in tests/data/tables/ (a 1128-config GEMM space and a
584-config softmax space, 6 shapes each; ``synthetic-*`` tables are left out) through
``tunebook._search.search``: the "measurement" is a look-up, so this runs on the CPU.

For every table, strategy (random, bayes, neighbors; exhaustive as the ground truth) and seed
(0, 1, 2) it records

* configs measured until the best found is <= 1.03x the table's best, as a fraction of the
  space (None when the strategy stopped first);
* the best-found / true-best ratio at equal budgets of 5% and 10% of the space;
* the strategy's own CPU time per proposal (driver + ask + tell, time.perf_counter);
* an *estimated* GPU wall time to reach 1.03x: configs x per-config cost measured by
  benchmarks/tuning_speed.py (48 configs of a 4096^3 GEMM: 3.59 s cold compile cache, 1.61 s
  warm), plus the strategy's CPU time.

Every strategy gets the same hints, those the book would give: the winners of the other
shapes' tables of the same kernel, nearest shape first. The same runs are repeated without
hints (a key the book knows nothing near), which shows the strategies themselves: with
hints, most tables are solved by the first hint whatever the strategy.

``bayes`` is the slow one (Optuna), so it stops once it has reached 1.03x *and* measured 10%
of the space (so the equal-budget ratios are exact), or at 30% of the space, whichever comes
first. The others run until they stop by themselves (random and exhaustive: the whole space).

    python benchmarks/strategies.py [--tables DIR] [--out DIR]
    python benchmarks/strategies.py --quick --out /tmp/strategies   # a few seconds

Prints a summary table last; writes OUT/strategies.json (every raw number) and
OUT/strategies.png (best-found ratio against configs measured); OUT defaults to
benchmarks/results, where the published run lives. About a minute on 2 cores. ``--quick``
checks the script end to end in seconds (seed 0, two tables a kernel, bayes stopped after
10 configs): its numbers are not the benchmark's, and its results say so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _harness as harness  # first: it puts the checkout's src/ on sys.path

from tunebook._search import Budget, Table, search

HERE = Path(__file__).resolve().parent

STRATEGIES = ("exhaustive", "random", "bayes", "neighbors")
CONDITIONS = ("no hints", "book hints")  # the brief's measurement is "book hints"
SEEDS = (0, 1, 2)
TARGET = 1.03
BUDGETS = (0.05, 0.10)
BAYES_CAP = 0.30
QUICK_BAYES_CONFIGS = 10
QUICK_NOTE = (
    "--quick: seed 0, two tables a kernel, bayes stopped after 10 configs; not the benchmark's numbers"
)
# Issue 3's goals for the model-based/local strategies.
GOAL_FRACTION = 0.10
GOAL_WORST = 1.08

# Per-config tuning cost from benchmarks/tuning_speed.py on an H200 (4096^3 GEMM, 48 configs
# compiled in parallel and timed): 3.59 s with a cold Triton cache, 1.61 s warm.
TUNED_CONFIGS = 48
COLD_SECONDS = 3.59
WARM_SECONDS = 1.61


def load_tables(folder: Path) -> dict[str, Table]:
    """The GPU-measured tables only: synthetic ones model a landscape, they don't measure one."""
    paths = sorted(p for p in folder.glob("*.json") if not p.name.startswith("synthetic-"))
    if not paths:
        raise SystemExit(f"no timing tables in {folder}; expected matmul-*.json, softmax-*.json")
    return {p.stem: Table.load(p) for p in paths}


def shape_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Sum of |log2| ratios over the numeric dims: M=4096 vs 8192 is as near as 16 vs 32."""
    dims = [k for k, v in a.items() if isinstance(v, int | float) and not isinstance(v, bool) and k in b]
    return sum(abs(math.log2(max(a[k], 1) / max(b[k], 1))) for k in dims)


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def book_hints(name: str, tables: dict[str, Table]) -> list[int]:
    """What the book would offer for this key: winners of the same kernel's other shapes,
    nearest shape first, as indices into this table's candidates."""
    table = tables[name]
    index = {_config_key(c): i for i, c in enumerate(table.candidates())}
    others = sorted(
        (shape_distance(table.shape, other.shape), other_name)
        for other_name, other in tables.items()
        if other_name != name and other.kernel == table.kernel
    )
    hints: list[int] = []
    for _, other_name in others:
        best, _ = tables[other_name].best()
        i = index.get(_config_key(tables[other_name].rows[best].config)) if best >= 0 else None
        if i is not None and i not in hints:
            hints.append(i)
    return hints


class _Enough(Exception):
    """Raised by the replay to end a search early once its stop rule is met."""


class Replay:
    """A ``measure`` that looks timings up in a table, keeps the best-found trace, times
    itself (so its cost can be taken out of the strategy's), and may end the search early."""

    def __init__(self, table: Table, stop: Callable[[list[float]], bool] | None = None) -> None:
        self.timings = table.timings()
        self.true_best = table.best()[1]
        self.stop = stop
        self.best_ms = math.inf
        self.ratios: list[float] = []  # best found / true best after each measured config
        self.seconds = 0.0
        self.proposed = 0  # includes a batch asked for and then not measured (the early stop)

    def __call__(self, batch: list[int]) -> dict[int, float]:
        start = time.perf_counter()
        self.proposed += len(batch)
        try:
            # Checked before a batch, so every batch the strategy asked for is fully told.
            if self.stop is not None and self.stop(self.ratios):
                raise _Enough
            out = {}
            for i in batch:
                out[i] = self.timings[i]
                self.best_ms = min(self.best_ms, out[i])
                self.ratios.append(self.best_ms / self.true_best)
            return out
        finally:
            self.seconds += time.perf_counter() - start


def reached_at(ratios: Sequence[float]) -> int | None:
    """Configs measured until the best found was within TARGET of the true best."""
    return next((k + 1 for k, r in enumerate(ratios) if r <= TARGET), None)


def ratio_at(ratios: Sequence[float], configs: int) -> float:
    """Best-found ratio after ``configs`` measurements; a search that stopped earlier keeps
    what it had (a converged ``neighbors`` would propose nothing more)."""
    if not ratios:
        return math.inf
    return ratios[min(configs, len(ratios)) - 1]


def run_one(
    table: Table, strategy: str, seed: int, hints: list[int], bayes_cap: int | None = None
) -> dict[str, Any]:
    n = len(table.rows)
    floor = math.ceil(max(BUDGETS) * n)
    budget = Budget()
    stop: Callable[[list[float]], bool] | None = None
    if strategy == "bayes":
        budget = Budget(max_configs=bayes_cap or math.ceil(BAYES_CAP * n))
        stop = lambda ratios: len(ratios) >= floor and reached_at(ratios) is not None  # noqa: E731
    replay = Replay(table, stop)
    start = time.perf_counter()
    try:
        result = search(table.candidates(), replay, strategy=strategy, budget=budget, hints=hints, seed=seed)
        stopped = result.stopped
        if result.best_ms != replay.best_ms:
            raise AssertionError(f"replay and search disagree on the best ({strategy}, seed {seed})")
    except _Enough:
        stopped = "reached"
    cpu = time.perf_counter() - start - replay.seconds
    measured = len(replay.ratios)
    reach = reached_at(replay.ratios)
    reached_best = next((k + 1 for k, r in enumerate(replay.ratios) if r <= 1.0), None)
    per_proposal = cpu / max(replay.proposed, 1)
    return {
        "strategy": strategy,
        "seed": seed,
        "measured": measured,
        "stopped": stopped,
        "configs_to_target": reach,
        "fraction_to_target": None if reach is None else reach / n,
        "ratio_at": {f"{b:.2f}": ratio_at(replay.ratios, math.ceil(b * n)) for b in BUDGETS},
        "final_ratio": replay.ratios[-1] if replay.ratios else math.inf,
        "cpu_s_per_proposal": per_proposal,
        "est_gpu_s_to_target": None
        if reach is None
        else {
            "cold": reach * (COLD_SECONDS / TUNED_CONFIGS + per_proposal),
            "warm": reach * (WARM_SECONDS / TUNED_CONFIGS + per_proposal),
        },
        # Up to the first config that found the true best: the ratio is 1.0 from there on.
        "trace": [round(r, 5) for r in replay.ratios[: (reached_best or measured)]],
    }


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summarize(runs: list[dict[str, Any]], sizes: dict[str, int], condition: str) -> list[dict[str, Any]]:
    """Per kernel and strategy, over shapes and seeds. A run that never reached 1.03x counts
    as having needed the whole space: measuring everything is what it would fall back to."""
    rows = []
    for kernel in sorted(sizes):
        random_ratios: dict[str, float] = {}
        for strategy in ("random", "exhaustive", "bayes", "neighbors"):
            mine = [
                r
                for r in runs
                if r["kernel"] == kernel and r["strategy"] == strategy and r["condition"] == condition
            ]
            fracs = [r["fraction_to_target"] or 1.0 for r in mine]
            at = {b: [r["ratio_at"][b] for r in mine] for b in mine[0]["ratio_at"]}
            row: dict[str, Any] = {
                "condition": condition,
                "kernel": kernel,
                "space": sizes[kernel],
                "strategy": strategy,
                "runs": len(mine),
                "reached": sum(r["configs_to_target"] is not None for r in mine),
                "fraction_geomean": geomean(fracs),
                "fraction_worst": max(fracs),
                **{f"ratio_at_{b}_geomean": geomean(v) for b, v in at.items()},
                **{f"ratio_at_{b}_worst": max(v) for b, v in at.items()},
                "cpu_ms_per_proposal": 1e3 * statistics.fmean(r["cpu_s_per_proposal"] for r in mine),
            }
            for cache, seconds in (("cold", COLD_SECONDS), ("warm", WARM_SECONDS)):
                # Same fallback as the fraction: a run that never got there measures everything.
                per_config = seconds / TUNED_CONFIGS
                row[f"est_gpu_s_{cache}_geomean"] = geomean(
                    [
                        (r["configs_to_target"] or sizes[kernel]) * (per_config + r["cpu_s_per_proposal"])
                        for r in mine
                    ]
                )
            if strategy == "random":
                random_ratios = {b: row[f"ratio_at_{b}_geomean"] for b in at}
            elif strategy in ("bayes", "neighbors"):
                row["targets"] = {
                    "fraction_le_10pct": row["fraction_geomean"] <= GOAL_FRACTION,
                    "worst_ratio_at_10pct_le_1.08": row["ratio_at_0.10_worst"] <= GOAL_WORST,
                    **{f"beats_random_at_{b}": row[f"ratio_at_{b}_geomean"] < random_ratios[b] for b in at},
                }
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], shapes: int, seeds: int) -> None:
    print(
        f"\n{rows[0]['condition']}: geometric means (gm) and worst cases over {shapes} shapes x {seeds} seeds"
    )
    print("targets: <=10% / @10% worst<=1.08 / beats random @5% / @10%")
    lines = []
    for r in rows:
        targets = r.get("targets")
        lines.append(
            [
                r["kernel"],
                r["strategy"],
                f"{r['reached']}/{r['runs']}",
                100 * r["fraction_geomean"],
                100 * r["fraction_worst"],
                r["ratio_at_0.05_geomean"],
                r["ratio_at_0.10_geomean"],
                r["ratio_at_0.10_worst"],
                r["cpu_ms_per_proposal"],
                r["est_gpu_s_cold_geomean"],
                r["est_gpu_s_warm_geomean"],
                " / ".join("yes" if ok else "NO" for ok in targets.values()) if targets else "",
            ]
        )
    columns = (
        "kernel",
        "strategy",
        "reached",
        "% to 1.03 gm",
        "worst %",
        "@5% gm",
        "@10% gm",
        "@10% worst",
        "cpu ms/prop",
        "est s cold",
        "est s warm",
        "targets",
    )
    print(harness.table(lines, columns, floats=[""] * 3 + [".1f", ".0f"] + [".3f"] * 3 + [".2f"] * 4))


def plot(runs: list[dict[str, Any]], sizes: dict[str, int], path: Path, shapes: int, seeds: int) -> None:
    """One panel per kernel (columns) and hint condition (rows)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or a GPU box
    import matplotlib.pyplot as plt
    import numpy as np

    # Distinct dashes too: with hints most medians sit on 1.0 together.
    styles = {
        "random": ("tab:gray", "-", 3.5),
        "bayes": ("tab:blue", "--", 2.2),
        "neighbors": ("tab:orange", "-", 1.6),
    }
    kernels = sorted(sizes)
    conditions = CONDITIONS[::-1]
    fig, axes = plt.subplots(
        len(conditions), len(kernels), figsize=(6.5 * len(kernels), 4.4 * len(conditions)), squeeze=False
    )
    panels = [
        (ax, c, k)
        for row, c in zip(axes, conditions, strict=True)
        for ax, k in zip(row, kernels, strict=True)
    ]
    for ax, condition, kernel in panels:
        n = sizes[kernel]
        width = math.ceil(BAYES_CAP * n)
        x = np.arange(1, width + 1)
        for strategy, (color, dash, lw) in styles.items():
            traces = [
                r["trace"]
                for r in runs
                if r["kernel"] == kernel and r["strategy"] == strategy and r["condition"] == condition
            ]
            # A search that stopped keeps its best: the line shows what a user would have.
            grid = np.array([[ratio_at(t, int(k)) for k in x] for t in traces])
            ax.fill_between(x, grid.min(axis=0), grid.max(axis=0), color=color, alpha=0.13, lw=0)
            ax.plot(x, np.median(grid, axis=0), color=color, ls=dash, lw=lw, label=f"{strategy}: median")
        ax.axhline(TARGET, color="black", ls="--", lw=1, label=f"{TARGET}x the best")
        for b in BUDGETS:
            ax.axvline(math.ceil(b * n), color="black", ls=":", lw=0.9)
            ax.text(
                math.ceil(b * n), 0.98, f" {b:.0%}", fontsize=10, va="top", transform=ax.get_xaxis_transform()
            )
        ax.set_xscale("log")
        ax.set_xlim(1, width)
        ax.set_ylim(0.99, 1.6)
        ax.set_title(f"{kernel} ({n} configs), {condition}")
        hinted = "; the first 3-5 are the hints" if condition == "book hints" else ""
        ax.set_xlabel(f"configs measured (log scale{hinted})")
        ax.set_ylabel("best found / true best")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, frameon=False)
    fig.suptitle(
        f"Search strategies replayed on NVIDIA H200 timing tables ({shapes} shapes x {seeds} seeds a panel)\n"
        "line: median; band: min-max; a search that stopped keeps its best (bayes stops at 1.03x after 10%)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", type=Path, default=harness.TESTS / "data" / "tables")
    harness.add_out_argument(parser, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few seconds: see the module docstring")
    args = parser.parse_args(argv)
    tables = load_tables(args.tables)
    seeds: tuple[int, ...] = SEEDS
    bayes_cap: int | None = None
    if args.quick:
        kernels = {t.kernel for t in tables.values()}
        kept = {n for k in kernels for n in sorted(n for n, t in tables.items() if t.kernel == k)[:2]}
        tables = {n: t for n, t in tables.items() if n in kept}
        seeds, bayes_cap = (0,), QUICK_BAYES_CONFIGS
    sizes = {t.kernel: len(t.rows) for t in tables.values()}
    shapes = max(sum(t.kernel == k for t in tables.values()) for k in sizes)

    runs: list[dict[str, Any]] = []
    for condition in CONDITIONS:
        for name, table in tables.items():
            hints = book_hints(name, tables) if condition == "book hints" else []
            for strategy in STRATEGIES:
                for seed in seeds:
                    run = run_one(table, strategy, seed, hints, bayes_cap)
                    runs.append(
                        {
                            "condition": condition,
                            "table": name,
                            "kernel": table.kernel,
                            "shape": table.shape,
                            "hints": hints,
                            **run,
                        }
                    )
                    print(
                        f"{condition:<10} {name:<38} {strategy:<10} seed {seed}: 1.03x after "
                        f"{run['configs_to_target'] or '-':>4} configs, @10% {run['ratio_at']['0.10']:.3f}, "
                        f"{run['measured']} measured ({run['stopped']}), "
                        f"{1e3 * run['cpu_s_per_proposal']:.2f} ms/proposal",
                        flush=True,
                    )

    summaries = {c: summarize(runs, sizes, c) for c in CONDITIONS}
    out = harness.out_dir(args.out)
    platform = next(iter(tables.values())).platform
    doc = {
        "benchmark": "issue 3, measurement 2: search strategies replayed on measured timing tables",
        "command": "python benchmarks/strategies.py" + (" --quick" if args.quick else ""),
        **({"quick": QUICK_NOTE} if args.quick else {}),
        "platform_of_tables": platform,
        "target_ratio": TARGET,
        "budgets": BUDGETS,
        "bayes_stop": f"reached {TARGET}x and >= {max(BUDGETS):.0%} of the space measured, "
        f"or {BAYES_CAP:.0%} of it",
        "per_config_cost_estimate": {
            "source": "benchmarks/tuning_speed.py on an H200: 48 configs of a 4096^3 GEMM tuned in "
            f"{COLD_SECONDS} s (cold compile cache), {WARM_SECONDS} s (warm)",
            "cold_s": COLD_SECONDS / TUNED_CONFIGS,
            "warm_s": WARM_SECONDS / TUNED_CONFIGS,
        },
        "tables": {
            name: {
                "kernel": t.kernel,
                "shape": t.shape,
                "configs": len(t.rows),
                "failed": sum(r.ms is None for r in t.rows),
                "best_ms": t.best()[1],
                "best_config": t.rows[t.best()[0]].config,
            }
            for name, t in tables.items()
        },
        "summary": summaries,
        "runs": runs,
    }
    # One run per line: the traces would otherwise put a number on every line (about 1 MB).
    head = json.dumps({**doc, "runs": []}, indent=1)[: -len('"runs": []\n}')]
    runs_text = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in runs)
    (out / "strategies.json").write_text(f'{head}"runs": [\n{runs_text}\n ]\n}}\n', encoding="utf-8")
    plot(runs, sizes, out / "strategies.png", shapes, len(seeds))
    print(f"\nwrote {out / 'strategies.json'} and {out / 'strategies.png'}\n")
    if args.quick:
        print(f"!!! {QUICK_NOTE}")
    for condition in CONDITIONS:  # the brief's measurement, "book hints", last
        print_table(summaries[condition], shapes, len(seeds))


if __name__ == "__main__":
    main()
