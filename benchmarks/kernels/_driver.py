"""The loop the kernel-pack benchmarks share; each script supplies its op's PyTorch reference.

For every (shape, token count, dtype) of the op over the chosen models
(``tunebook.kernels._models``), in one run:

1. the op is called once in ``--mode`` (default ``tune``: a key the book lacks is tuned
   now, into ``--book``; with the shipped books or an earlier run's book it is served);
2. its output is checked against the PyTorch reference;
3. four variants are timed, interleaved (``_timing``): **tunebook** (the op with its tuned
   config), **hand-picked** (the same kernel with the config Liger-Kernel's rule picks:
   one row per program, the whole row in one block), **eager** (the PyTorch reference)
   and **compile** (``torch.compile`` of the reference, dynamic in the token count, the way
   vLLM compiles);
4. achieved bandwidth (the bytes the op must move / time) is reported, and its ratio to a
   device-to-device copy measured at the start of the same run.

Results go to ``--out/<op>.json`` after every workload (a deadline or a crash leaves what
was measured); a table prints last. ``--dry-run`` runs it all on a CPU under Triton's
interpreter, on SmolLM2's shapes at 1 and 3 tokens, with a 2-config tuning budget and the
wall clock instead of CUDA graphs (no torch.compile): it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _timing
import torch

ROOT = Path(__file__).resolve().parents[2]
# Found, not imported: tunebook imports triton, which must see TRITON_INTERPRET first.
if importlib.util.find_spec("tunebook") is None:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))

# (function of tensors, the tensors): what the eager and compiled variants run.
Reference = tuple[Callable[..., Any], tuple[torch.Tensor, ...]]


def _parse(op: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Benchmark tunebook.kernels.{op} (see benchmarks/kernels/)."
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results directory ($OUT)")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    parser.add_argument(
        "--tokens", default=None, help="comma-separated token counts (default: 1,2,4,...,8192)"
    )
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--book", default=None, help="writable book directory (default: OUT/book)")
    parser.add_argument("--mode", choices=("tune", "serve"), default="tune", help="TUNEBOOK_MODE for the op")
    parser.add_argument(
        "--max-configs", type=int, default=None, help="tuning budget per key (default: tunebook's)"
    )
    parser.add_argument("--launches", type=int, default=50, help="calls captured per CUDA graph")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved samples per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--deadline", type=float, default=540, help="seconds; later workloads are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    opts = parser.parse_args(argv)
    check_options(parser, opts, int_lists=("tokens",))
    if opts.dry_run:
        opts.models = opts.models or "smollm2-135m"
        opts.tokens = opts.tokens or "1,3"
        opts.launches, opts.rounds, opts.no_compile = 2, 3, True
        opts.max_configs = opts.max_configs or 2
    return opts


def check_options(
    parser: argparse.ArgumentParser, opts: argparse.Namespace, int_lists: Sequence[str] = ()
) -> None:
    """What a run would trip over only after the device copy was measured, or at its end, said
    now in one line: its lists and counts, and where it writes and reads. Checked as given,
    dry run or not (a dry run then narrows them to tiny shapes). Model and dtype names are
    checked once the pack is imported (``check_names``): importing it reads the settings
    ``_setup_env`` makes."""
    for name in int_lists:
        if getattr(opts, name, None):
            _timing.int_list(parser, "--" + name.replace("_", "-"), getattr(opts, name))
    for name in ("rounds", "launches", "max_configs"):
        value = getattr(opts, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected 1 or more; found {value}")
    _timing.results_dir(parser, Path(opts.out))
    book = Path(opts.book) if opts.book else None
    if book is not None and book.exists() and not book.is_dir():
        parser.error(f"--book {book}: not a directory")
    if opts.mode == "serve" and book is not None and not book.is_dir():
        parser.error(
            f"--book {book}: no such book; serve mode reads one (every key would be served by its "
            "op's fallback config): give the directory the tuning wrote"
        )


def check_names(opts: argparse.Namespace) -> None:
    """The model and dtype names, before anything is measured (one line)."""
    from tunebook.kernels import _models

    unknown = [d for d in opts.dtypes.split(",") if d not in _models.DTYPES]
    if unknown:
        known = ", ".join(_models.DTYPES)
        raise SystemExit(f"error: --dtypes: unknown {', '.join(map(repr, unknown))}; known: {known}")
    try:
        _models.select_models(opts.models)
    except ValueError as exc:
        raise SystemExit(f"error: --models: {exc}") from None


def how_decided(r: dict[str, Any]) -> str:
    """How a row's key was decided, for its line: a serve-mode fallback said as such."""
    tuning = r["tuning"]
    if tuning["fallback"]:
        return "fallback (no book entry)"
    return "book" if tuning["from_book"] else f"{tuning['configs_benchmarked']} configs tuned"


def _setup_env(opts: argparse.Namespace) -> None:
    """Everything read when triton and the pack are imported: set before importing them."""
    if opts.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit(_timing.NO_GPU)
    os.environ["TUNEBOOK_DIR"] = str(Path(opts.book or Path(opts.out) / "book").resolve())
    os.environ["TUNEBOOK_MODE"] = opts.mode
    if opts.max_configs is not None:
        os.environ["TUNEBOOK_KERNELS_MAX_CONFIGS"] = str(opts.max_configs)


def _config_dict(config: Any) -> dict[str, Any]:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _max_error(actual: Any, expected: Any) -> float:
    """Largest |actual - expected| relative to the reference's largest magnitude."""
    pairs = zip(actual, expected) if isinstance(actual, tuple | list) else [(actual, expected)]
    worst = 0.0
    for a, b in pairs:
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale if a.numel() else 0.0)
    return worst


def _compiled(fn: Callable[..., Any], cache: dict[Any, Any]) -> Callable[..., Any]:
    if fn not in cache:
        cache[fn] = torch.compile(fn)
    return cache[fn]


class Session:
    """One benchmark run of an op, shared by the pack's benchmark loops: the environment set
    before Triton is imported, the op's module and kernel, the copy ceiling measured first,
    the results file (rewritten after every workload, so a deadline or a crash leaves what
    was measured), the deadline, and the header and the closing table."""

    def __init__(
        self, op: str, opts: argparse.Namespace, timer: _timing.Timer, argv: Sequence[str] | None
    ) -> None:
        _setup_env(opts)
        import triton

        self.op, self.opts = op, opts
        check_names(opts)
        self.module = importlib.import_module(f"tunebook.kernels.{op}")
        self.kernel = getattr(self.module, f"_{op}_kernel")
        self.out_dir = Path(opts.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.device = "cpu" if opts.dry_run else "cuda"
        rounds = max(opts.rounds // 3, 3)
        self.copy_gbps = _timing.copy_bandwidth(timer, (16 if opts.dry_run else 1024) << 20, rounds)
        self.meta: dict[str, Any] = {
            "op": op,
            "device": "cpu (Triton interpreter)" if opts.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "mode": opts.mode,
            "book": os.environ["TUNEBOOK_DIR"],
            "rounds": opts.rounds,
            "copy_gbps": self.copy_gbps,
            "argv": list(argv if argv is not None else sys.argv[1:]),
        }
        self.results: list[dict[str, Any]] = []
        device, book = self.meta["device"], self.meta["book"]
        print(f"{op}: {device}, device copy {self.copy_gbps:.0f} GB/s; book {book}", flush=True)

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.op}.json"

    def run(
        self,
        jobs: Sequence[tuple[dict[str, Any], int, Callable[[], Any]]],
        measure: Callable[[Any], dict[str, Any]],
        line: Callable[[dict[str, Any]], str],
    ) -> None:
        """Measure each ``(shape, tokens, build)`` job's workload (built one at a time: the
        largest take gigabytes) until the deadline, which skips the rest."""
        last_cost = 0.0
        for shape, tokens, build in jobs:
            if time.monotonic() - self.start + last_cost > self.opts.deadline:
                self.results.append({"shape": dict(shape), "tokens": tokens, "skipped": "deadline"})
                continue
            t0 = time.monotonic()
            w = build()
            self.results.append(measure(w))
            del w
            print(
                f"  {self.results[-1]['label']}: {line(self.results[-1])} ({time.monotonic() - t0:.1f}s)",
                flush=True,
            )
            last_cost = time.monotonic() - t0
            _write(self.path, self.meta, self.results)
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def finish(self, summary: Callable[[list[dict[str, Any]]], str]) -> int:
        import tunebook

        self.meta["seconds"] = time.monotonic() - self.start
        self.meta["stats"] = tunebook.stats()
        _write(self.path, self.meta, self.results)
        print(f"\n{self.op} on {self.meta['device']} ({self.meta['seconds']:.0f}s; {self.path}):")
        print(summary(self.results))
        return 0


def main(op: str, reference: Callable[[Any], Reference], argv: Sequence[str] | None = None) -> int:
    """Run the benchmark of ``op``; ``reference(workload)`` gives its PyTorch reference."""
    opts = _parse(op, argv)
    timer: _timing.Timer = (
        _timing.WallTimer(opts.launches) if opts.dry_run else _timing.GraphTimer(opts.launches)
    )
    session = Session(op, opts, timer, argv)
    from tunebook.kernels import _models

    session.meta["launches_per_graph"] = opts.launches
    if not opts.no_compile:
        # Dynamo recompiles a function whose token count changed once with that dimension
        # dynamic (automatic dynamic shapes), as vLLM compiles: one graph per (shape, dtype)
        # and a static 1-token one. Several shapes and dtypes pass dynamo's default limit of 8.
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = 4096
    models = _models.select_models(opts.models)
    tokens = [int(t) for t in opts.tokens.split(",")] if opts.tokens else None  # None: the op's own
    dtypes = [_models.DTYPES[d] for d in opts.dtypes.split(",")]
    compiled: dict[Any, Any] = {}
    jobs = [
        (dict(job.shape), job.tokens, lambda job=job: job.build(session.device))
        for job in _models.plan([op], models, tokens, dtypes)
    ]

    def measure(w: Any) -> dict[str, Any]:
        return _measure(
            w, opts, timer, session.module, session.kernel, reference, compiled, session.copy_gbps
        )

    session.run(jobs, measure, _line)
    return session.finish(lambda results: _summary(results, session.copy_gbps))


def _measure(
    w: Any,
    opts: argparse.Namespace,
    timer: _timing.Timer,
    module: Any,
    kernel: Any,
    reference: Callable[[Any], Reference],
    compiled: dict[Any, Any],
    copy_gbps: float,
) -> dict[str, Any]:
    import tunebook

    def sync() -> None:
        if torch.cuda.is_available() and not opts.dry_run:
            torch.cuda.synchronize()

    before = tunebook.stats()
    t0 = time.perf_counter()
    outputs = w.run(None)  # tunes the key now if the book lacks it (tune mode)
    sync()
    after = tunebook.stats()
    tuned = _config_dict(kernel.best_config)
    hand = module.hand_picked(w.key)
    fn, tensors = reference(w)
    error = _max_error(outputs, fn(*tensors))
    variants: dict[str, Callable[[], object]] = {
        "tunebook": lambda: w.run(None),
        "hand-picked": lambda: w.run(hand),
        "eager": lambda: fn(*tensors),
    }
    if not opts.no_compile:
        compiled_fn = _compiled(fn, compiled)
        variants["compile"] = lambda: compiled_fn(*tensors)
    series, errors = _timing.interleaved(timer, variants, opts.rounds)
    timings = {
        name: {
            **s.summary(),
            "gbps": _timing.gbps(w.bytes, s.median),
            "of_copy": _timing.gbps(w.bytes, s.median) / copy_gbps,
        }
        for name, s in series.items()
    }
    return {
        **_record(w, tuned, hand, before, after, t0),
        "max_rel_error_vs_eager": error,
        "timings": timings,
        "ratios": _ratios(series),
        "errors": errors,
        "samples_us": {name: s.us for name, s in series.items()},
    }


def _record(
    w: Any, tuned: dict[str, Any], hand: Any, before: dict[str, Any], after: dict[str, Any], t0: float
) -> dict[str, Any]:
    """A result's description: the workload, both configs, and how the key was decided
    (``before``/``after``: tunebook.stats() around the first call, made at ``t0``)."""
    return {
        "label": w.label,
        "op": w.op,
        "shape": w.shape,
        "tokens": w.tokens,
        "dtype": str(w.dtype).removeprefix("torch."),
        "models": w.models,
        "bytes": w.bytes,
        "tuned_config": tuned,
        "hand_picked_config": hand,
        "tuning": {
            "configs_benchmarked": after["benchmarked"] - before["benchmarked"],
            "from_book": after["book_hits"] > before["book_hits"],
            "fallback": after["fallbacks"] > before["fallbacks"],
            "seconds": time.perf_counter() - t0,
        },
    }


def _ratios(series: dict[str, _timing.Series]) -> dict[str, float]:
    """Each variant's time over tunebook's (median of per-round ratios)."""
    if "tunebook" not in series:
        return {}
    tb = series["tunebook"]
    return {f"{n}/tunebook": _timing.ratio(s, tb) for n, s in series.items() if n != "tunebook"}


def _line(r: dict[str, Any]) -> str:
    t = r["timings"]
    parts = [f"{name} {v['median_us']:.2f}us" for name, v in t.items()]
    return ", ".join(parts) + f"; {how_decided(r)}; err {r['max_rel_error_vs_eager']:.1e}"


def _summary(results: list[dict[str, Any]], copy_gbps: float) -> str:
    header = ["workload", "tunebook us", "hand us", "eager us", "compile us", "tb GB/s", "tb %copy",
              "hand/tb", "eager/tb", "compile/tb"]  # fmt: skip
    rows = [header]
    for r in results:
        if "skipped" in r:
            rows.append([f"{r['shape']} tokens={r['tokens']}", "skipped: " + r["skipped"]] + [""] * 8)
            continue
        t, q = r["timings"], r["ratios"]

        def us(name: str, t: dict[str, Any] = t) -> str:
            return f"{t[name]['median_us']:.2f}" if name in t else "-"

        def x(name: str, q: dict[str, float] = q) -> str:
            value = q.get(f"{name}/tunebook")
            return f"{value:.2f}x" if value is not None and math.isfinite(value) else "-"

        tb = t.get("tunebook")
        rows.append([
            r["label"], us("tunebook"), us("hand-picked"), us("eager"), us("compile"),
            f"{tb['gbps']:.0f}" if tb else "-", f"{100 * tb['of_copy']:.0f}%" if tb else "-",
            x("hand-picked"), x("eager"), x("compile"),
        ])  # fmt: skip
    notes = f"(ratios > 1: tunebook faster; device copy {copy_gbps:.0f} GB/s; medians of interleaved rounds)"
    return _timing.table(rows) + "\n" + notes


def _write(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    text = json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)
