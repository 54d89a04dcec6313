"""What the benchmark scripts share: where results go, how a child process runs, which machine
a number came from, how short GPU work is timed, and how samples become numbers and a table.

A script in this folder imports it as ``import _harness as harness`` (``python
benchmarks/X.py`` puts this folder first on ``sys.path``). Importing it puts the checkout's
``src/`` first on ``sys.path`` too, so a script measures the tunebook next to it, installed or
not. Nothing here imports torch or triton before a function needs them: a script may still set
TRITON_INTERPRET after importing this module.

CPU mode: every script runs end to end on a CPU in seconds (tests/test_benchmarks.py runs each
one so); those that launch kernels do it through Triton's interpreter (TRITON_INTERPRET=1,
``--interpret``), with tiny sizes and one repeat. Their timings are wall-clock stand-ins, and
everything that records a timing here says so (``platform_header()["timings"]``,
``Timing.method``), so that no one mistakes one for a measurement.

    >>> percentiles([4.0, 1.0, 3.0, 2.0], (0, 50, 100))
    {'p0': 1.0, 'p50': 2.5, 'p100': 4.0}
    >>> median_ratio([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])
    2.0
    >>> print(table([("add", 1.5), ("gemm", 12.25)], ("kernel", "us per call")))
    | kernel | us per call |
    | ------ | ----------- |
    | add    |       1.500 |
    | gemm   |      12.250 |
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TESTS = ROOT / "tests"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

CPU_DEVICE_NAME = "cpu (TRITON_INTERPRET=1)"
STAND_IN = "wall-clock stand-in under TRITON_INTERPRET=1 (CPU): NOT a measurement"

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


# --------------------------------------------------------------------------- output and mode


def add_out_argument(parser: argparse.ArgumentParser, *, default: Path | None = None) -> None:
    """Declare ``--out DIR``: where the script writes its JSON; ``default`` when given, else
    ``$OUT``, else ``./bench-out``. Pass the parsed value through ``out_dir`` to create it."""
    fallback = default if default is not None else Path(os.environ.get("OUT", "bench-out"))
    parser.add_argument("--out", type=Path, default=fallback, help=f"output directory (default: {fallback})")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--repeats 0`` ran every step, then
    raised StatisticsError with nothing written)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number; found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more; found {value}")
    return value


def out_dir(path: Path) -> Path:
    """``path``, created with its parents if missing."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpreting() -> bool:
    """Whether this process runs Triton's CPU interpreter (TRITON_INTERPRET=1): CPU mode."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device() -> str:
    """Where tensors go: ``"cpu"`` in CPU mode, else ``"cuda"``."""
    return "cpu" if interpreting() else "cuda"


def synchronize() -> None:
    """Wait for the GPU's queued work; nothing to wait for in CPU mode."""
    if not interpreting():
        import torch

        torch.cuda.synchronize()


def triton_autotune(configs: list[Any], key: list[str], *, cache_results: bool = False) -> Any:
    """``triton.autotune(configs, key=key, cache_results=cache_results)``, the baseline most
    benchmarks compare with. In CPU mode it times with tunebook's wall-clock timer (Triton's
    own needs a GPU driver) and never caches results (Triton's results cache does not work
    under its interpreter), a substitution CPU_TRITON_NOTE states for the printed report."""
    import triton

    if not interpreting():
        return triton.autotune(configs, key=key, cache_results=cache_results)
    from tunebook._bench import wallclock_bench

    return triton.autotune(configs, key=key, do_bench=wallclock_bench)


CPU_TRITON_NOTE = (
    "CPU mode: triton.autotune times with tunebook's wall-clock timer and runs without "
    "cache_results, which Triton's interpreter does not support"
)


# --------------------------------------------------------------------------- child processes


def child_env(
    *, interpret: bool, scratch: Path | None = None, path: Sequence[Path] = (), **overrides: str | None
) -> dict[str, str]:
    """This process's environment, made explicit for a child benchmark process:

    * PYTHONPATH: the checkout's ``src/`` first, then ``path``, then what it was;
    * TRITON_INTERPRET: ``"1"`` when ``interpret``, else removed (never inherited by chance);
    * with ``scratch``: TUNEBOOK_DIR=``scratch/book`` and TRITON_CACHE_DIR=``scratch/triton-cache``,
      an empty book and compile cache of the run's own;
    * last, ``overrides``: a string sets the variable, None removes it.

    >>> env = child_env(interpret=True, TUNEBOOK_MODE="serve", TUNEBOOK_PATH=None)
    >>> env["TRITON_INTERPRET"], env["TUNEBOOK_MODE"], "TUNEBOOK_PATH" in env
    ('1', 'serve', False)
    >>> env["PYTHONPATH"].split(os.pathsep)[0] == str(SRC)
    True
    """
    env = dict(os.environ)
    inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *(str(p) for p in path), *inherited])
    if scratch is not None:
        env["TUNEBOOK_DIR"] = str(scratch / "book")
        env["TRITON_CACHE_DIR"] = str(scratch / "triton-cache")
    changes: dict[str, str | None] = {"TRITON_INTERPRET": "1" if interpret else None, **overrides}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class ChildFailed(RuntimeError):
    """A child process exited non-zero, ran out of time, or printed no JSON object last."""


def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float = 600,
    cwd: Path | None = None,
    echo_stderr: bool = False,
) -> dict[str, Any]:
    """Run ``python *argv`` (a script and its arguments, or ``-c CODE``) and return the JSON
    object printed on the last line of its stdout.

    Raises ChildFailed naming the command, with the exit status and both streams, when the
    child exits non-zero, runs past ``timeout`` seconds (it is killed), or its last stdout
    line is not a JSON object. With ``echo_stderr`` the child's stderr goes straight to this
    process's stdout as it is written (a long child's progress shows live, in order, and a run
    cut short still shows how far it got); the error then carries stdout only.

    >>> run_child(["-c", "import json; print('noise'); print(json.dumps({'ok': 1}))"], env=os.environ)
    {'ok': 1}
    """
    command = [sys.executable, *argv]
    shown = " ".join(command)[:300]
    try:
        proc = subprocess.run(
            command,
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=sys.stdout if echo_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(
            f"child `{shown}` ran past {timeout:.0f} s and was killed{_streams(exc.stdout, exc.stderr)}"
        ) from None
    if proc.returncode != 0:
        raise ChildFailed(
            f"child `{shown}` failed (exit {proc.returncode}){_streams(proc.stdout, proc.stderr)}"
        )
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise ChildFailed(
            f"child `{shown}` exited 0 but its last stdout line is not a JSON object"
            f"{_streams(proc.stdout, proc.stderr)}"
        )
    return result


def _streams(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    def text(stream: str | bytes | None) -> str:
        return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""

    err = "(printed above)" if stderr is None else text(stderr)
    return f"\n--- stdout ---\n{text(stdout)}\n--- stderr ---\n{err}"


# --------------------------------------------------------------------------- where numbers come from


def platform_header(*, interpret: bool, cpu_flag: str = "--interpret") -> dict[str, str]:
    """Where a result came from, the first fields of every results file: ``date``, ``gpu``
    (the device name, or "cpu (TRITON_INTERPRET=1)"), ``triton``, ``torch``, ``python``,
    ``cuda`` (torch's CUDA runtime, "none" on a CPU build) and ``timings`` ("measured", or
    the CPU-mode warning). With ``interpret`` it never touches CUDA; without it, no GPU is
    one line naming the script's CPU mode, ``cpu_flag`` (it was torch's "not compiled with
    CUDA" traceback)."""
    import torch
    import triton

    if not interpret and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU: run with {cpu_flag} to check the script on a CPU")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": CPU_DEVICE_NAME if interpret else torch.cuda.get_device_name(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "timings": STAND_IN if interpret else "measured",
    }


def header_line(header: Mapping[str, Any]) -> str:
    """One line for the top of a printed report, with the CPU-mode warning when it applies."""
    line = (
        f"{header['gpu']} | triton {header['triton']} | torch {header['torch']} | python "
        f"{header['python']} | CUDA {header['cuda']} | {header['date']}"
    )
    return line if header["timings"] == "measured" else f"{line}\n!!! timings: {header['timings']}"


# --------------------------------------------------------------------------- samples to numbers


def percentiles(samples: Iterable[float], qs: Iterable[float] = (10, 50, 90)) -> dict[str, float]:
    """The ``q``-th percentile of ``samples`` for each ``q`` in 0..100, keyed ``"p<q>"``, by
    linear interpolation between the nearest ranks (numpy's default): ``p50`` is the median,
    ``p0`` the minimum, ``p100`` the maximum. Raises ValueError for no samples."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentiles of no samples: expected at least one")
    out = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        pos = q / 100 * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{q:g}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return out


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: samples of one round share the machine's state,
    so each ratio cancels the drift between rounds. Raises ValueError if lengths differ."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples: expected two equal, non-empty lists, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def table(
    rows: Iterable[Sequence[object]], columns: Sequence[str], *, floats: str | Sequence[str] = ".3f"
) -> str:
    """A fixed-width text table that is also a Markdown table: a header line, a rule, a line
    per row. Floats are written with ``floats`` (one format, or one a column), None as "-",
    anything else with ``str`` and its "|" escaped; a column of numbers (and Nones) is
    right-aligned, any other left-aligned. Raises ValueError for a row of the wrong length."""
    formats = [floats] * len(columns) if isinstance(floats, str) else list(floats)
    if len(formats) != len(columns):
        raise ValueError(f"table: {len(formats)} float formats for {len(columns)} columns")
    values = [list(row) for row in rows]
    for row in values:
        if len(row) != len(columns):
            raise ValueError(f"table row {row!r} has {len(row)} cells, expected {len(columns)}")
    cells = [[_cell(v, f) for v, f in zip(row, formats)] for row in values]
    numeric = [
        all(isinstance(row[i], int | float | None) and not isinstance(row[i], bool) for row in values)
        for i in range(len(columns))
    ]
    widths = [max(3, len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(parts: Iterable[str]) -> str:
        return "| " + " | ".join(parts) + " |"

    out = [line(c.ljust(w) for c, w in zip(columns, widths)), line("-" * w for w in widths)]
    out += [line(t.rjust(w) if n else t.ljust(w) for t, n, w in zip(r, numeric, widths)) for r in cells]
    return "\n".join(out)


def _cell(value: object, floats: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, floats)
    return str(value).replace("|", "\\|")


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Samples of the variants compared, every one kept, and how they were taken."""

    ms: dict[Any, list[float]]  # per variant, one sample per round, in round order
    method: str  # what a sample is; STAND_IN in CPU mode

    def medians(self) -> dict[Any, float]:
        return {k: statistics.median(v) for k, v in self.ms.items()}


def interleave(
    variants: Mapping[K, V], rounds: int, measure: Callable[[V], float], *, alternate: bool = False
) -> dict[K, list[float]]:
    """``measure`` each variant once per round, variants in turn: A, B, C, A, B, C, ... (with
    ``alternate``, every other round backwards: A, B, C, C, B, A, ..., so no variant always
    follows the same one). Drift over the run (clocks, heat, other tenants) then reaches every
    variant alike and paired ratios cancel it, which one block of runs per variant cannot.
    Returns each variant's samples in round order.

    >>> order = []
    >>> interleave({"A": 1, "B": 2}, 2, lambda v: order.append(v) or v, alternate=True)
    {'A': [1, 1], 'B': [2, 2]}
    >>> order
    [1, 2, 2, 1]
    """
    samples: dict[K, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[::-1] if alternate and r % 2 else names:
            samples[name].append(measure(variants[name]))
    return samples


def do_bench_times(
    variants: Mapping[K, Callable[[], object]],
    *,
    rounds: int,
    warmup_ms: float,
    rep_ms: float,
    return_mode: str = "median",
    alternate: bool = False,
) -> Timing:
    """Milliseconds per call from ``triton.testing.do_bench`` (CUDA events, L2 flushed between
    calls), ``rounds`` interleaved rounds; fit for work of a tenth of a millisecond and more.
    In CPU mode each sample is instead the wall-clock time of one call after one warm-up call,
    and ``method`` says it is a stand-in."""
    if interpreting():
        return _stand_in(variants, rounds, calls=1, warmup=1, alternate=alternate)
    from triton.testing import do_bench

    def measure(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode=return_mode))

    method = f"triton.testing.do_bench ({return_mode}, warmup {warmup_ms:g} ms, rep {rep_ms:g} ms)"
    return Timing(interleave(variants, rounds, measure, alternate=alternate), method)


def time_launches(
    variants: Mapping[K, Callable[[], object]],
    *,
    rounds: int = 15,
    launches: int = 100,
    warmup: int = 3,
    alternate: bool = False,
) -> Timing:
    """Milliseconds per launch of short GPU work (microseconds a call), timed the way such work
    must be: each variant called ``warmup`` times (it compiles, and an autotuner settles on its
    key: a miss cannot be captured), then ``launches`` calls captured once in a CUDA graph, so
    that host overhead and launch gaps are out of the picture; each sample is one replay timed
    by CUDA events, divided by ``launches``; rounds interleaved across the variants
    (``interleave``). Every sample is returned: never one median of a handful of runs.

    In CPU mode (or without CUDA) there are no graphs or events: a sample is the wall-clock time
    of ``launches`` plain calls, and ``method`` says it is a stand-in.
    """
    import torch

    if interpreting() or not torch.cuda.is_available():
        return _stand_in(variants, rounds, calls=launches, warmup=warmup, alternate=alternate)
    graphs = {name: _capture(fn, launches, warmup) for name, fn in variants.items()}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay(graph: Any) -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / launches

    samples = interleave(graphs, rounds, replay, alternate=alternate)
    return Timing(samples, f"cuda-graph: {launches} launches a replay, timed by CUDA events")


def _capture(fn: Callable[[], object], launches: int, warmup: int) -> Any:
    import torch

    # Warm up on a side stream, as torch.cuda.graphs asks: lazy initialisation must not be captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()  # the first replay uploads the graph: not a sample
    torch.cuda.synchronize()
    return graph


def _stand_in(
    variants: Mapping[K, Callable[[], object]], rounds: int, *, calls: int, warmup: int, alternate: bool
) -> Timing:
    for fn in variants.values():
        for _ in range(warmup):
            fn()

    def wall_ms(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls

    return Timing(interleave(variants, rounds, wall_ms, alternate=alternate), STAND_IN)
