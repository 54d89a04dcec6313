"""Timing microsecond kernels: CUDA-graph replays, variants interleaved, medians with spread.

A decode-time kernel runs for 2-30 us; timed one launch at a time, launch overhead and
clock noise are as large as the kernel (DESIGN.md: one RMSNorm config read 5.1-14.1 us
across five samples on an H200). So:

* each variant's ``launches`` calls are captured in one CUDA graph, and a sample is one
  replay timed with CUDA events, divided by ``launches``: the GPU time per call, with no
  host launch cost (as in a server that replays CUDA graphs);
* samples of all variants are interleaved (A, B, C, A, B, C, ...) for ``rounds`` rounds, so
  clock and thermal drift hit every variant alike;
* each variant reports its median and its p20/p80 over rounds; a ratio between two
  variants is the median of the per-round ratios.

The L2 cache is not flushed between launches. In a server an op's activations were written
by the kernel just before it, so small ones are L2-resident there as here. A layer's
weights and its KV cache were last read a whole step earlier, before every other layer's,
and are not: where they are smaller than L2 (50 MB on an H200; a decode call over a few MB
of cache, a 4096 x 4096 weight), every variant of a run, the baselines too, reads them from
L2 here. Ratios then compare like with like; the absolute times and shares of copy
bandwidth of such calls are better than a server sees. Inputs larger than L2 stream from
HBM either way.

Without a GPU (``--dry-run`` under ``TRITON_INTERPRET=1``) the same code runs with a
wall-clock timer and no graphs, so the scripts are checked end to end on a CPU.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Series:
    """Per-call times of one variant, one sample per round (microseconds)."""

    us: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.us)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.us)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    def summary(self) -> dict[str, float]:
        return {"median_us": self.median, "p20_us": self.quantile(0.2), "p80_us": self.quantile(0.8)}


PROBE_LAUNCHES = 10  # a graph of this many calls sizes the timed graphs


def graph_launches(fn: Callable[[], object], sample_us: float = 2000.0, most: int = 50) -> int:
    """Calls to capture in each timed CUDA graph of ``fn``: about ``sample_us`` of GPU work,
    1 to ``most``, sized from the GPU time a call takes in a probe graph of
    ``PROBE_LAUNCHES``. One host-timed call is the wrong yardstick: it counts Python's time
    (0.1-0.5 ms for a 5-15 us decode call) and any one-time cost (a served ``linear()``'s
    second call took 3.3 ms), gave such calls graphs of 1-15 launches, and the replay's own
    cost (about 5 us on an H200) was then added to every variant's time a call
    (BENCHMARKS.md 5a and 5b, twenty-third session)."""
    from tunebook._short import graph_sampler, launches_for

    sample = graph_sampler(fn, PROBE_LAUNCHES)
    return launches_for(min(sample() for _ in range(3)), sample_us=sample_us, lo=1, hi=most)


def ratio(a: Series, b: Series) -> float:
    """Median over rounds of a's time / b's time (paired: same round, adjacent samples)."""
    return statistics.median(x / y for x, y in zip(a.us, b.us))


class GraphTimer:
    """Times a callable as replays of a CUDA graph holding ``launches`` calls of it (the
    sampler tunebook's short-kernel policy uses: ``tunebook._short.graph_sampler``)."""

    def __init__(self, launches: int = 50) -> None:
        self.launches = launches

    def prepare(self, fn: Callable[[], object]) -> Callable[[], float]:
        """Warm ``fn`` up, capture it; returns a sampler giving one per-call time in us."""
        from tunebook._short import graph_sampler

        return graph_sampler(fn, self.launches)

    def settle(self) -> None:
        """Wait for the GPU: a fault shows here, at the call that caused it."""
        torch.cuda.synchronize()


class WallTimer:
    """The CPU stand-in (Triton's interpreter): ``launches`` calls on the host clock."""

    def __init__(self, launches: int = 2) -> None:
        self.launches = launches

    def prepare(self, fn: Callable[[], object]) -> Callable[[], float]:
        from tunebook._short import wall_sampler

        return wall_sampler(fn, self.launches)

    def settle(self) -> None:
        """Nothing to wait for on the host."""


Timer = GraphTimer | WallTimer


def _reason(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:300]


def interleaved(
    timer: Timer, variants: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, Series], dict[str, str]]:
    """Sample every variant once per round, in turn. Returns the series and, for variants
    that could not be captured (e.g. torch.compile failing on this PyTorch), the reason."""
    samplers: dict[str, Callable[[], float]] = {}
    errors: dict[str, str] = {}
    # Every variant runs once, each waited for, before any is captured: a kernel's scratch
    # buffer that one variant grows would otherwise move under the graph an earlier variant
    # captured. A variant that fails here is left out, not captured later.
    for name, fn in variants.items():
        try:
            fn()
            timer.settle()
        except Exception as exc:
            errors[name] = _reason(exc)
    for name, fn in variants.items():
        if name in errors:
            continue
        try:
            samplers[name] = timer.prepare(fn)
        except Exception as exc:
            errors[name] = _reason(exc)
    series = {name: Series() for name in samplers}
    for _ in range(rounds):
        for name, sample in samplers.items():
            series[name].us.append(sample())
    return series, errors


def copy_bandwidth(timer: Timer, nbytes: int, rounds: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second), as a
    kernel running on the GPU's multiprocessors achieves it: the ceiling an elementwise op can
    reach. (``dst.copy_(src)`` of contiguous tensors is a cudaMemcpy, served by the copy
    engines: 2.77 TB/s on an H200 of 2026-11-30, well under what the SMs move.)"""
    device = "cuda" if isinstance(timer, GraphTimer) else "cpu"
    series, _ = interleaved(timer, {"copy": sm_copy(nbytes, device)}, rounds)
    return 2 * nbytes / (series["copy"].median * 1e-6) / 1e9


def sm_copy(nbytes: int, device: Any) -> Callable[[], torch.Tensor]:
    """A copy of ``nbytes`` (as many written) by an elementwise kernel on the GPU's
    multiprocessors, not ``copy_``'s copy engines (``copy_bandwidth`` says why)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return lambda: torch.mul(src, 1.0, out=dst)


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def geomean(values: Iterable[float]) -> float:
    """The geometric mean of the finite positive ``values`` (a variant that failed has none);
    NaN when there are none."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in finite)) if finite else math.nan


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


NO_GPU = "no CUDA GPU: run with --dry-run to check the script on a CPU"


def results_dir(parser: argparse.ArgumentParser, out: Path) -> None:
    """Make the results directory ``--out`` names now, or the parser's one-line error: a run
    that cannot write its results must not run first (some wrote them only at their end)."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: a file, not a directory (the results go into a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot make the results directory ({exc.strerror or exc})")


def scratch_book(prefix: str) -> str:
    """A temporary book directory for this run, removed when it exits: a dry run's or a
    check's keys belong in no user's book."""
    book = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, book, True)
    return book


def int_list(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4], or the parser's one-line error naming ``option``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{option}: expected comma-separated whole numbers; found {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{option}: every value must be 1 or more; found {text!r}")
    return values


def study_out(doc: str | None, takes_out: bool = True) -> str | None:
    """A study script's command line: its docstring for --help and, with ``takes_out``, the
    directory its results go to (made here). It read ``sys.argv[1]`` as that directory, so
    ``--help`` made a directory named "--help" and ran."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if takes_out:
        parser.add_argument("out", help="the directory its results are written to")
    opts = parser.parse_args()
    if not takes_out:
        return None
    os.makedirs(opts.out, exist_ok=True)
    return str(opts.out)
