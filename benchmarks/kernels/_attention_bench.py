"""The loop the attention benchmarks share (``paged_attention.py``, ``varlen_attention.py``).

For every workload (a head layout and a batch of sequences), in one run:

1. the op is built on fresh inputs (``tunebook.kernels._models``) and called once in
   ``--mode`` (default ``tune``: a key the book lacks is tuned now, into ``--book``; with
   the shipped books or an earlier run's book it is served, benchmarking nothing);
2. its output is checked against the first PyTorch baseline;
3. the variants are timed, rounds interleaved (``_timing``): **tunebook** (the tuned
   config), **hand-picked** (the same kernel with the launch a typical Triton attention
   kernel hard-codes: the op's ``hand_picked``) and the script's PyTorch baselines. Each
   variant is a CUDA graph of as many launches as fill about 2 ms of GPU time (1 to 50);
4. the script's metric (GB/s of KV read for decode, TFLOP/s for prefill) is reported per
   variant, with ratios to tunebook (median of per-round ratios; > 1: tunebook faster).

Results go to ``--out/<op>.json`` after every workload; a table prints last. ``--dry-run``
runs the same on a CPU under Triton's interpreter on tiny shapes, with a 2-config tuning
budget and the wall clock: it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import _timing
import torch
from _driver import Session, _config_dict, _max_error, _ratios, _record, check_options, how_decided

# A variant's PyTorch baselines: name -> a no-argument call returning the output.
Baselines = dict[str, Callable[[], Any]]


@dataclass(frozen=True)
class Job:
    """One workload to build: a shape of ``_models`` for the op, and its token count (the
    batch for decode, packed tokens for prefill)."""

    shape: dict[str, Any]
    tokens: int
    model: str


def parser(op: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results directory ($OUT)")
    p.add_argument("--models", default=None, help="comma-separated model names (their head layouts)")
    p.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16")
    p.add_argument("--book", default=None, help="writable book directory (default: OUT/book)")
    p.add_argument("--mode", choices=("tune", "serve"), default="tune", help="TUNEBOOK_MODE for the op")
    p.add_argument(
        "--max-configs", type=int, default=None, help="tuning budget per key (default: tunebook's)"
    )
    p.add_argument("--rounds", type=int, default=20, help="interleaved samples per variant")
    p.add_argument("--deadline", type=float, default=540, help="seconds; later workloads are skipped")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    return p


def finish_parse(
    p: argparse.ArgumentParser, opts: argparse.Namespace, int_lists: Sequence[str] = ()
) -> argparse.Namespace:
    check_options(p, opts, int_lists)
    if opts.dry_run:
        opts.rounds = 2
        opts.max_configs = opts.max_configs or 2
    return opts


def main(
    op: str,
    opts: argparse.Namespace,
    jobs: Callable[[Any], list[Job]],
    baselines: Callable[[Any], Baselines],
    metric: Callable[[Any, float], dict[str, float]],
    columns: Sequence[str],
) -> int:
    """Run the benchmark of ``op``. ``jobs(_models)`` lists the workloads; ``baselines(w)``
    gives the PyTorch variants of a workload (the first is the error check's reference);
    ``metric(w, us)`` turns a time into the script's measures; ``columns`` are the metric
    names the table shows."""
    session = Session(op, opts, _timing.WallTimer(1) if opts.dry_run else _timing.GraphTimer(10), None)
    from tunebook.kernels import _models

    def build(job: Job, dtype: Any) -> Any:
        w = _models.workload(op, job.shape, job.tokens, dtype, session.device)
        w.models = [job.model]
        return w

    dtypes = [_models.DTYPES[d] for d in opts.dtypes.split(",")]
    planned = [(j.shape, j.tokens, lambda j=j, d=d: build(j, d)) for d in dtypes for j in jobs(_models)]

    def measure(w: Any) -> dict[str, Any]:
        return _measure(w, opts, session.module, session.kernel, baselines, metric, session.copy_gbps)

    session.run(planned, measure, lambda row: _line(row, columns))
    return session.finish(lambda results: _summary(results, columns, session.copy_gbps))


def _launches(fn: Callable[[], Any], dry_run: bool) -> int:
    """Calls per CUDA graph (``_timing.graph_launches``); one on the CPU."""
    return 1 if dry_run else _timing.graph_launches(fn)


def _measure(
    w: Any,
    opts: argparse.Namespace,
    module: Any,
    kernel: Any,
    baselines: Callable[[Any], Baselines],
    metric: Callable[[Any, float], dict[str, float]],
    copy_gbps: float,
) -> dict[str, Any]:
    import tunebook

    before = tunebook.stats()
    t0 = time.perf_counter()
    outputs = w.run(None)  # tunes the key now if the book lacks it (tune mode)
    if not opts.dry_run:
        torch.cuda.synchronize()
    after = tunebook.stats()
    tuned = _config_dict(kernel.best_config)
    hand = module.hand_picked(w.key)
    base = baselines(w)
    reference_name, reference = next(iter(base.items()))
    error = _max_error(outputs, reference())
    variants: dict[str, Callable[[], object]] = {
        "tunebook": lambda: w.run(None),
        "hand-picked": lambda: w.run(hand),
        **base,
    }
    launches = _launches(variants["tunebook"], opts.dry_run)
    timer: _timing.Timer = _timing.WallTimer(1) if opts.dry_run else _timing.GraphTimer(launches)
    series, errors = _timing.interleaved(timer, variants, opts.rounds)
    timings = {name: {**s.summary(), **metric(w, s.median)} for name, s in series.items()}
    for t in timings.values():
        if "gbps" in t:
            t["of_copy"] = t["gbps"] / copy_gbps
    return {
        **_record(w, tuned, hand, before, after, t0),
        "flops": w.flops,
        f"max_rel_error_vs_{reference_name}": error,
        "max_rel_error": error,
        "launches_per_graph": launches,
        "timings": timings,
        "ratios": _ratios(series),
        "errors": errors,
        "samples_us": {name: s.us for name, s in series.items()},
    }


def _line(r: dict[str, Any], columns: Sequence[str]) -> str:
    parts = [f"{name} {v['median_us']:.2f}us" for name, v in r["timings"].items()]
    tb = r["timings"].get("tunebook", {})
    parts += [f"{c} {tb[c]:.3g}" for c in columns if c in tb]
    return ", ".join(parts) + f"; {how_decided(r)}; err {r['max_rel_error']:.1e}"


def _summary(results: list[dict[str, Any]], columns: Sequence[str], copy_gbps: float) -> str:
    names: list[str] = []
    for r in results:
        names += [n for n in r.get("timings", {}) if n not in names]
    header = ["workload", *(f"{n} us" for n in names), *(f"tb {c}" for c in columns)]
    header += [f"{n}/tb" for n in names if n != "tunebook"]
    rows = [header]
    for r in results:
        if "skipped" in r:
            rows.append(
                [f"{r['shape']} tokens={r['tokens']}", "skipped: " + r["skipped"]] + [""] * (len(header) - 2)
            )
            continue
        t, q = r["timings"], r["ratios"]
        tb = t.get("tunebook", {})
        row = [r["label"], *(f"{t[n]['median_us']:.2f}" if n in t else "-" for n in names)]
        row += [f"{tb[c]:.3g}" if c in tb else "-" for c in columns]
        for n in names:
            if n != "tunebook":
                value = q.get(f"{n}/tunebook")
                row.append(f"{value:.2f}x" if value is not None and math.isfinite(value) else "-")
        rows.append(row)
    notes = f"(ratios > 1: tunebook faster; device copy {copy_gbps:.0f} GB/s; medians of interleaved rounds)"
    return _timing.table(rows) + "\n" + notes
