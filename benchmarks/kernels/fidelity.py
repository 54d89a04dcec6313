"""Fidelity of tuning on microsecond kernels: is the winner really the fastest?

For every key of the pack's elementwise ops (rms_norm, silu_and_mul, rotary_embedding) at
the shipped shapes (``tunebook.kernels._models``), in one run:

1. **tune**, once per timer, each in its own process and its own empty book (the shipped
   books are left out, so every key is tuned here): ``cuda-graph`` (the timer the shipped
   books were tuned with: the baseline) and ``short`` (``TUNEBOOK_TIMER=short``, the
   short-kernel policy, timer id ``cuda-graph-interleaved``). Each writes the winner and
   every candidate it measured successfully, per key, to ``OUT/tuned-<timer>.json``;
2. **re-time**, in a FRESH process: per key, every candidate either tuning measured, as
   CUDA-graph replays of many launches, interleaved over ``--rounds`` rounds
   (``_timing.interleaved``); the best re-timed candidate is the reference;
3. report, per timer, the share of keys whose winner re-times within 3% of the best
   (target: at least 95% for the policy), the worst and the geometric mean of winner/best.

A tuning process that hits the device's time limit can be run again with the same
``--out``: keys in its book are served from it, not tuned again. ``--combine DIR ...``
prints one table over several runs' ``fidelity.json`` (e.g. one run per op).

    python benchmarks/kernels/fidelity.py --out DIR                       # all three ops (see BENCHMARKS)
    python benchmarks/kernels/fidelity.py --out DIR --ops rms_norm        # one op
    python benchmarks/kernels/fidelity.py --combine DIR1 DIR2 DIR3        # one table over runs
    python benchmarks/kernels/fidelity.py --out DIR --dry-run             # CPU, Triton's interpreter

``--dry-run`` runs it all on a CPU: Triton's interpreter, SmolLM2's shapes at one token, a
3-config budget, the wall clock instead of CUDA graphs, and every kernel counted as short
(the policy's rule runs for real on the interpreter's timings). It checks the script, not
fidelity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _timing
from _driver import ROOT, _config_dict, _write

OPS = ("rms_norm", "silu_and_mul", "rotary_embedding")
TIMERS = {"cuda-graph": "", "short": "short"}  # name -> TUNEBOOK_TIMER
WITHIN = 0.03  # a winner within 3% of the best re-timed candidate counts as right
TARGET = 0.95


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fidelity of tuning with and without the short-kernel policy.")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results directory ($OUT)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    p.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default: 1..8192)")
    p.add_argument("--timers", default=",".join(TIMERS), help="comma-separated, of cuda-graph, short")
    p.add_argument("--rounds", type=int, default=40, help="interleaved re-timing rounds per candidate")
    p.add_argument("--sample-us", type=float, default=500.0, help="GPU time per re-timing sample")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR", help="one table over runs")
    p.add_argument("--phase", choices=("tune", "retime"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--timer", choices=tuple(TIMERS), default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.dry_run:
        opts.models = opts.models or "smollm2-135m"
        opts.tokens = opts.tokens or "1"
        opts.rounds = min(opts.rounds, 3)
    return opts


def _plan(opts: argparse.Namespace) -> list[Any]:
    from tunebook.kernels import _models

    tokens = [int(t) for t in opts.tokens.split(",")] if opts.tokens else None
    models = _models.select_models(opts.models)
    return _models.plan(opts.ops.split(","), models, tokens, [_models.DTYPES["bf16"]])


def _device(opts: argparse.Namespace) -> str:
    return "cpu" if opts.dry_run else "cuda"


# ------------------------------------------------------------------ phase 1: tune


def tune(opts: argparse.Namespace) -> int:
    """Tune every key with ``opts.timer`` into OUT/book-<timer>; winners and candidates to
    OUT/tuned-<timer>.json (rewritten after every key)."""
    import importlib

    out = Path(opts.out)
    path = out / f"tuned-{opts.timer}.json"
    if path.exists() and not json.loads(path.read_text())["meta"].get("read_only_books") == []:
        # a run from before the shipped books were left out: its book holds their results
        raise SystemExit(
            f"fidelity: {out} holds a tuning that read other books (shipped or TUNEBOOK_PATH's); "
            "resuming it would count their winners as tuned here: use a new --out"
        )
    meta = {"timer": opts.timer, "book": os.environ["TUNEBOOK_DIR"], "started": time.strftime("%F %T")}
    rows: list[dict[str, Any]] = []
    for job in _plan(opts):
        kernel = getattr(importlib.import_module(f"tunebook.kernels.{job.op}"), f"_{job.op}_kernel")
        # every layer the kernel reads, but its own book: must be none (a tuning from nothing)
        book = kernel.page().book
        meta["read_only_books"] = [str(d) for d in book.directories()[1:]] + (
            ["redis"] if book.shared else []
        )
        w = job.build(_device(opts))
        t0 = time.perf_counter()
        w.run(None)
        candidates = [
            {"config": _config_dict(c), "tuned_us": ms[0] * 1e3}
            for c, ms in (kernel.configs_timings or {}).items()
            if math.isfinite(ms[0])
        ]
        rows.append({
            "label": w.label,
            "timer_id": kernel.identity().platform["timer"],
            "winner": _config_dict(kernel.best_config),
            "candidates": candidates,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        print(
            f"  [{opts.timer}] {w.label}: {len(candidates)} candidates ({rows[-1]['seconds']:.1f}s)",
            flush=True,
        )
        _write(path, meta, rows)
    _write(path, meta, rows)
    return 0


# ------------------------------------------------------------------ phase 2: re-time


def retime(opts: argparse.Namespace) -> int:
    """Re-time every tuned candidate of every key, interleaved; OUT/fidelity.json."""
    from tunebook import _short

    out = Path(opts.out)
    tuned = {
        name: {r["label"]: r for r in json.loads((out / f"tuned-{name}.json").read_text())["results"]}
        for name in opts.timers.split(",")
    }
    results: list[dict[str, Any]] = []
    for job in _plan(opts):
        w = job.build(_device(opts))
        rows = {name: by_label[w.label] for name, by_label in tuned.items() if w.label in by_label}
        if not rows:
            continue
        configs: dict[str, dict[str, Any]] = {}
        for row in rows.values():
            for c in row["candidates"]:
                configs.setdefault(json.dumps(c["config"], sort_keys=True), c["config"])
        fastest = min(c["tuned_us"] for row in rows.values() for c in row["candidates"])
        launches = 1 if opts.dry_run else _short.launches_for(fastest, opts.sample_us)
        timer: _timing.Timer = _timing.WallTimer(launches) if opts.dry_run else _timing.GraphTimer(launches)
        variants = {cid: (lambda c=c, w=w: w.run(c)) for cid, c in configs.items()}
        series, errors = _timing.interleaved(timer, variants, opts.rounds)
        medians = {cid: s.median for cid, s in series.items()}
        best = min(medians.values())
        verdicts = {}
        for name, row in rows.items():
            mine = medians.get(json.dumps(row["winner"], sort_keys=True), math.inf)
            verdicts[name] = {"winner_us": mine, "ratio": mine / best, "within": mine <= best * (1 + WITHIN)}
        results.append({
            "label": w.label, "best_us": best, "candidates": len(configs), "launches": launches,
            "timers": verdicts, "errors": errors, "medians_us": medians,
        })  # fmt: skip
        line = ", ".join(f"{n} {v['ratio']:.3f}" for n, v in verdicts.items())
        print(f"  {w.label}: best {best:.2f}us of {len(configs)}; winner/best {line}", flush=True)
        _write(out / "fidelity.json", {"rounds": opts.rounds, "within": WITHIN}, results)
        del w
    _write(out / "fidelity.json", {"rounds": opts.rounds, "within": WITHIN}, results)
    print(summary(results))
    return 0


def summary(results: list[dict[str, Any]]) -> str:
    """Per timer: keys, share within 3% of the best, worst and geometric-mean winner/best."""
    rows = [["timer", "keys", f"within {WITHIN:.0%}", "share", "worst", "geomean"]]
    names = sorted({n for r in results for n in r["timers"]})
    for name in names:
        ratios = [r["timers"][name]["ratio"] for r in results if name in r["timers"]]
        ok = sum(r["timers"][name]["within"] for r in results if name in r["timers"])
        geo = _timing.geomean(ratios)
        share = ok / len(ratios) if ratios else math.nan
        rows.append([name, str(len(ratios)), str(ok), f"{share:.1%}", f"{max(ratios):.3f}", f"{geo:.4f}"])
    return _timing.table(rows) + f"\n(target: {TARGET:.0%} of keys within {WITHIN:.0%} for the policy)"


# ------------------------------------------------------------------ the run


def _child(opts: argparse.Namespace, phase: str, timer: str | None, argv: list[str]) -> None:
    # the shipped books left out: every key is tuned in this run, by each timer
    env = {**os.environ, "TUNEBOOK_MODE": "tune", "TUNEBOOK_KERNELS_SHIPPED_BOOKS": "0"}
    for name in ("TUNEBOOK_TIMER", "TUNEBOOK_PATH", "TUNEBOOK_REDIS_URL"):  # each timer's own book alone
        env.pop(name, None)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if opts.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["TUNEBOOK_KERNELS_MAX_CONFIGS"] = "3"
        env["TUNEBOOK_SHORT_KERNEL_US"] = "1e9"  # every interpreted call counts as short
    if timer is not None:
        env["TUNEBOOK_DIR"] = str((Path(opts.out) / f"book-{timer}").resolve())
        if TIMERS[timer]:
            env["TUNEBOOK_TIMER"] = TIMERS[timer]
    args = [sys.executable, __file__, *argv, "--phase", phase] + (["--timer", timer] if timer else [])
    proc = subprocess.run(args, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"fidelity: the {phase} phase{f' ({timer})' if timer else ''} exited {proc.returncode}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parse(argv)
    if opts.combine:
        by_label: dict[str, dict[str, Any]] = {}
        for d in opts.combine:
            for r in json.loads((Path(d) / "fidelity.json").read_text())["results"]:
                if r["label"] in by_label:
                    print(
                        f"fidelity: {r['label']} is in more than one run; the one in {d} counts",
                        file=sys.stderr,
                    )
                by_label[r["label"]] = r
        print(summary(list(by_label.values())))
        return 0
    if opts.phase == "tune":
        return tune(opts)
    if opts.phase == "retime":
        return retime(opts)
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit(_timing.NO_GPU)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for timer in opts.timers.split(","):
        print(f"fidelity: tuning with {timer}", flush=True)
        _child(opts, "tune", timer, argv)
    print("fidelity: re-timing in a fresh process", flush=True)
    _child(opts, "retime", None, argv)
    print(f"fidelity: {time.monotonic() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
