"""Timing and command-line plumbing for the GEMM kernel benchmarks.

Timing: CUDA-graph replays, repeats interleaved across the variants compared.

A microsecond kernel timed one launch at a time measures the launch, and a median of five
measures the noise. So each variant's call is captured ``launches`` times in one CUDA graph
(as many as fill ``target_us`` of GPU time: ``_timing.graph_launches``);
a graph replay is timed with CUDA events and divided by ``launches``; the variants compared
at one point take turns (the order rotates every repeat), so clock and thermal drift hit
them alike; the result is the median and the p20/p80 spread of ``repeats`` replays.

A variant that cannot be captured (it synchronizes with the host, e.g. a per-expert PyTorch
loop) is marked ``graph=False`` and timed the same way from eager launches.
On a machine without a GPU (``--dry-run``) the wall clock times one call: only the plumbing
is checked there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _timing import NO_GPU, graph_launches, int_list, results_dir, scratch_book

# TODO(merge): the lead unifies this with benchmarks/kernels/_timing.py.


@dataclass(frozen=True)
class Variant:
    fn: Callable[[], Any]
    graph: bool = True


def _spread(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=5, method="inclusive") if len(ordered) > 1 else ordered * 4
    return {"us": statistics.median(ordered), "p20": q[0], "p80": q[3], "n": len(ordered)}


def _wallclock(variants: dict[str, Variant]) -> dict[str, dict[str, float]]:
    out = {}
    for name, v in variants.items():
        v.fn()
        samples = []
        for _ in range(2):
            t0 = time.perf_counter()
            v.fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        out[name] = _spread(samples)
    return out


def time_variants(
    variants: dict[str, Variant], *, repeats: int = 15, target_us: float = 2000.0, max_launches: int = 50
) -> dict[str, dict[str, float]]:
    """Per variant: {"us": median, "p20", "p80", "n", "launches"} in microseconds per call."""
    import torch

    if not torch.cuda.is_available():
        return _wallclock(variants)
    runners: dict[str, tuple[Callable[[], None], int]] = {}
    for name, v in variants.items():
        v.fn()  # compile (and tune, in tune mode) before anything is captured or timed
        torch.cuda.synchronize()
        if v.graph:
            launches = graph_launches(v.fn, sample_us=target_us, most=max_launches)
        else:  # eager replays pay the host's time a call too: size them by it
            launches = max(1, min(max_launches, int(target_us / max(_host_us(v.fn), 1.0))))
        runners[name] = (
            _graph_runner(v.fn, launches) if v.graph else _eager_runner(v.fn, launches),
            launches,
        )
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run, launches = runners[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / launches)
    return {name: {**_spread(samples[name]), "launches": runners[name][1]} for name in names}


def _host_us(fn: Callable[[], Any], calls: int = 3) -> float:
    """A call's time from the host, the fastest of ``calls``: one call alone can carry a
    one-time cost (a served linear()'s second call took 3.3 ms on an H200, its third 0.1 ms;
    BENCHMARKS.md 5a, twenty-third session)."""
    import torch

    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e6)
    return best


def _graph_runner(fn: Callable[[], Any], launches: int) -> Callable[[], None]:
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm the caching allocator on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return graph.replay


def _eager_runner(fn: Callable[[], Any], launches: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(launches):
            fn()

    return run


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table, the last thing a benchmark prints."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def common_parser(
    doc: str | None, stem: str, m_values: list[int], tune_m: list[int]
) -> argparse.ArgumentParser:
    """The options both GEMM benchmarks take; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help=f"directory for {stem}-<device>.json")
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes: checks the plumbing")
    p.add_argument("--m", default=",".join(map(str, m_values)), help="batch sizes (tokens)")
    p.add_argument("--book-dir", type=Path, help="TUNEBOOK_DIR: where the book is read and written")
    p.add_argument(
        "--tune", action="store_true", help="tune the --tune-m batch sizes of every shape, then stop"
    )
    p.add_argument("--tune-m", default=",".join(map(str, tune_m)))
    p.add_argument("--mode", default="serve", choices=["serve", "tune"], help="TUNEBOOK_MODE when measuring")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--no-shipped-books",
        action="store_true",
        help="leave the package's books out: every key is tuned (or served) from --book-dir alone",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The options both GEMM benchmarks take, checked before anything is measured: a list or
    an --out they would trip over at the end of a run, after every row was timed."""
    int_list(p, "--m", args.m)
    int_list(p, "--tune-m", args.tune_m)
    if args.repeats < 1:
        p.error(f"--repeats: expected 1 or more; found {args.repeats}")
    if args.out is not None:
        results_dir(p, args.out)
    if args.book_dir is not None and args.book_dir.exists() and not args.book_dir.is_dir():
        p.error(f"--book-dir {args.book_dir}: not a directory")
    return args


def setup_env(args: argparse.Namespace) -> None:
    """Before triton is imported: the interpreter for a dry run, the book, the mode."""
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        # The interpreter times ~0.1 s a config: a dry run tunes a token amount.
        os.environ.setdefault("TUNEBOOK_KERNELS_MAX_CONFIGS", "2")
    if args.book_dir:
        os.environ["TUNEBOOK_DIR"] = str(args.book_dir)
    elif args.dry_run and not os.environ.get("TUNEBOOK_DIR"):  # tiny keys: not for the user's book
        os.environ["TUNEBOOK_DIR"] = scratch_book("tunebook-bench-dry-")
    if args.dry_run:
        os.environ.pop("TUNEBOOK_REDIS_URL", None)  # nor for a fleet's
    os.environ["TUNEBOOK_MODE"] = "tune" if args.tune else args.mode
    if args.no_shipped_books:
        os.environ["TUNEBOOK_KERNELS_SHIPPED_BOOKS"] = "0"  # read when the op modules are imported
        for name in ("TUNEBOOK_PATH", "TUNEBOOK_REDIS_URL"):  # --book-dir alone
            os.environ.pop(name, None)


def write_result(args: argparse.Namespace, stem: str, result: dict[str, Any]) -> None:
    if not args.out:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].replace(" ", "_")
    path = args.out / f"{stem}{'-tune' if args.tune else ''}-{slug}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def start(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Set the environment up, then: the torch device to measure on, and the result's header."""
    setup_env(args)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(NO_GPU)
    device = "cuda" if not args.dry_run else "cpu"
    return device, {
        "device": device_name(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
