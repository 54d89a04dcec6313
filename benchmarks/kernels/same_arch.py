"""Another GPU's winners on this one: what tuning on this GPU buys over the shipped books.

On a GPU the shipped books were not tuned on but of their architecture and Triton release
(an H100 under books tuned on an H200), serve mode answers each key with the other GPU's
winner (``stats()["same_arch_answers"]``). How those answers run here is the question. In
one run, on this GPU:

1. **tune**: the documented one command for a GPU without a book, narrowed to the chosen
   ops, models and token counts: ``python -m tunebook.kernels tune --out OUT/book ...``
   (decode attention with its own batches and contexts). Resumable: keys already in
   ``OUT/book`` cost nothing, so a run stopped by a time limit is run again as it was;
2. **answers**: a fresh process in serve mode with the shipped books only (an empty
   ``TUNEBOOK_DIR``) calls every workload once and records the config each key was answered
   with, and how (the counters it moved: ``same_arch_answers``, ``fallbacks``, ...);
3. **time**: a fresh process in serve mode over ``OUT/book``, which must benchmark nothing
   and fall back nowhere, times per workload, interleaved as CUDA-graph replays: **tuned
   here** (the book's winner, as served), **answer** (step 2's config) and **hand-picked**
   (the op's fixed launch). ``linear`` reads another weight copy at every launch (cold
   weights, as in a forward pass). Ratios are medians of per-round ratios, > 1: tuned here
   is faster.

The table printed last, per op: keys, how many were answered with the config tuned here,
the geometric mean and worst of answer / tuned here, the keys where the answer is more than
5% slower, and hand-picked / tuned here. Raw results: ``OUT/answers.json``,
``OUT/same_arch.json``.

    python benchmarks/kernels/same_arch.py --out DIR --models llama-3-8b --tokens 1,16,256,4096
    python benchmarks/kernels/same_arch.py --out DIR --dry-run     # CPU, Triton's interpreter

``--dry-run`` runs it all on a CPU: Triton's interpreter, SmolLM2's shapes at one token (one
sequence of 512 for decode), a 2-config budget, the wall clock instead of CUDA graphs. No
CPU book ships, so step 2's answers are the ops' rules there: it checks the script, not a GPU.
"""

from __future__ import annotations

import argparse
import importlib
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

OPS = ("rms_norm", "silu_and_mul", "rotary_embedding", "linear", "paged_attention_decode")
DECODE = "paged_attention_decode"  # its "tokens" are batch sizes, with context lengths beside
SLOWER = 0.05  # an answer more than 5% slower than the config tuned here counts as a loss
COLD_BYTES = 256 << 20  # weight copies a linear variant cycles through (an H100's L2 is 50 MB)
STATS = ("benchmarked", "fallbacks", "book_hits", "same_arch_answers", "upgrade_answers", "table_answers")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Another GPU's shipped winners against tuning on this one.")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results directory ($OUT)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    p.add_argument("--models", default="llama-3-8b", help="comma-separated model names")
    p.add_argument("--tokens", default="1,16,256,4096", help="token counts of the ops but decode")
    p.add_argument("--batches", default="1,16,64,256", help="decode attention's batch sizes")
    p.add_argument("--contexts", default="512,8192,32768", help="decode attention's context lengths")
    p.add_argument("--max-configs", type=int, default=None, help="tuning budget a key (default: the pack's)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved samples a variant")
    p.add_argument("--sample-us", type=float, default=2000.0, help="GPU time a sample (launches per graph)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    p.add_argument("--phase", choices=("answers", "time"), default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    for name in ("tokens", "batches", "contexts"):
        _timing.int_list(p, f"--{name}", getattr(opts, name))
    unknown = [op for op in opts.ops.split(",") if op not in OPS]
    if unknown:
        p.error(f"--ops: unknown {', '.join(unknown)}; known: {', '.join(OPS)}")
    if opts.dry_run:
        opts.models, opts.tokens, opts.batches, opts.contexts = "smollm2-135m", "1", "1", "512"
        opts.rounds = min(opts.rounds, 3)
        opts.max_configs = opts.max_configs or 2
    return opts


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _plan(opts: argparse.Namespace) -> list[Any]:
    from tunebook.kernels import _models

    models = _models.select_models(opts.models)
    ops = opts.ops.split(",")
    bf16 = [_models.DTYPES["bf16"]]
    jobs = _models.plan([op for op in ops if op != DECODE], models, _ints(opts.tokens), bf16)
    if DECODE in ops:
        jobs += _models.plan([DECODE], models, _ints(opts.batches), bf16, contexts=_ints(opts.contexts))
    return jobs


def _device(opts: argparse.Namespace) -> str:
    return "cpu" if opts.dry_run else "cuda"


def _served(w: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """Call ``w`` once through its autotuners: the config the call launched and the counters
    it moved. Every kernel of the pack forgets its last config first, so the one left set is
    the one this call launched (``linear`` has two kernels: the call's M picks one)."""
    import tunebook
    from tunebook.kernels import _common

    kernels = _common.kernels()
    for kernel in kernels:
        kernel.best_config = None
    before = tunebook.stats()
    w.run(None)
    after = tunebook.stats()
    launched = [k for k in kernels if k.best_config is not None]
    if len(launched) != 1:
        raise SystemExit(f"same_arch: {w.label} launched {len(launched)} autotuned kernels; expected one")
    moved = {name: after[name] - before[name] for name in STATS if after[name] != before[name]}
    return _config_dict(launched[0].best_config), moved


def _hand_picked(w: Any) -> dict[str, Any]:
    """The op's fixed launch: its ``hand_picked`` rule, or for ``linear`` the Triton
    tutorial's config that benchmarks/kernels/linear.py times as "fixed"."""
    if w.op == "linear":
        from linear import FIXED

        return dict(FIXED)
    return dict(importlib.import_module(f"tunebook.kernels.{w.op}").hand_picked(w.key))


def _at(w: Any) -> Any:
    """config -> a call of ``w`` at that config (None: as the book serves it)."""
    return lambda config: lambda: w.run(config)


def _cold_weights(w: Any, opts: argparse.Namespace) -> Any:
    """``linear``'s calls at ``config``, each reading the next of enough weight copies to
    outgrow the L2 cache, as a forward pass reads each layer's weight once (one weight read
    again and again stays in L2, and a decode-sized GEMM then times 2x faster than it
    serves). The copies are made once a workload."""
    from tunebook.kernels.linear import linear

    t = w.tensors
    weight = t["weight"]
    copies = 1 if opts.dry_run else max(1, min(64, math.ceil(COLD_BYTES / weight.nbytes)))
    weights = [weight, *(weight.clone() for _ in range(copies - 1))]

    def run(config: dict[str, Any] | None) -> Any:
        turn = [0]

        def call() -> Any:
            turn[0] += 1
            return linear(t["x"], weights[turn[0] % copies], t.get("bias"), out=t["out"], config=config)

        return call

    return run


# --------------------------------------------------------- phase 2: the shipped books' answers


def answers(opts: argparse.Namespace) -> int:
    import tunebook

    rows = []
    for job in _plan(opts):
        w = job.build(_device(opts))
        config, moved = _served(w)
        rows.append({"label": w.label, "config": config, "how": moved})
        print(f"  answer {w.label}: {config} ({', '.join(moved) or 'a hit'})", flush=True)
        del w
    meta = {"book": os.environ["TUNEBOOK_DIR"], "stats": tunebook.stats()}
    _write(Path(opts.out) / "answers.json", meta, rows)
    return 0


# ----------------------------------------------------------------------- phase 3: time


def timed(opts: argparse.Namespace) -> int:
    import torch
    import triton

    import tunebook

    out = Path(opts.out)
    answered = {r["label"]: r for r in json.loads((out / "answers.json").read_text())["results"]}
    meta = {
        "device": "cpu (Triton interpreter)" if opts.dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "book": os.environ["TUNEBOOK_DIR"],
        "rounds": opts.rounds,
        "argv": opts.argv,
    }
    results: list[dict[str, Any]] = []
    for job in _plan(opts):
        w = job.build(_device(opts))
        tuned, moved = _served(w)
        answer = answered[w.label]["config"]
        hand = _hand_picked(w)
        at = _cold_weights(w, opts) if w.op == "linear" else _at(w)
        variants = {"tuned here": at(None), "answer": at(answer), "hand-picked": at(hand)}
        launches = 1 if opts.dry_run else _timing.graph_launches(variants["tuned here"], opts.sample_us)
        timer: _timing.Timer = _timing.WallTimer(launches) if opts.dry_run else _timing.GraphTimer(launches)
        series, errors = _timing.interleaved(timer, variants, opts.rounds)
        base = series.get("tuned here")
        ratios = {
            f"{name}/tuned here": _timing.ratio(s, base)
            for name, s in series.items()
            if base is not None and name != "tuned here"
        }
        results.append({
            "label": w.label, "op": w.op, "tuned": tuned, "served_how": moved, "answer": answer,
            "answer_how": answered[w.label]["how"], "same_config": tuned == answer, "hand_picked": hand,
            "launches": launches, "medians_us": {n: s.median for n, s in series.items()},
            "ratios": ratios, "errors": errors,
        })  # fmt: skip
        shown = ", ".join(f"{n} {r:.3f}" for n, r in ratios.items())
        print(f"  {w.label}: {shown}{' (same config)' if tuned == answer else ''}", flush=True)
        _write(out / "same_arch.json", meta, results)
        del w
    meta["stats"] = tunebook.stats()
    _write(out / "same_arch.json", meta, results)
    print(summary(results, meta["stats"]))
    return 0


def summary(results: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """Per op: keys, answers equal to the config tuned here, answer / tuned here (geomean,
    worst, keys past SLOWER), hand-picked / tuned here (geomean)."""
    head = ["op", "keys", "same config", "answer/tuned", "worst", f">{SLOWER:.0%} slower", "hand/tuned"]
    rows = [head]
    for op in dict.fromkeys(r["op"] for r in results):
        mine = [r for r in results if r["op"] == op]
        ans = [r["ratios"].get("answer/tuned here", math.nan) for r in mine]
        hand = [r["ratios"].get("hand-picked/tuned here", math.nan) for r in mine]
        rows.append([
            op, str(len(mine)), str(sum(r["same_config"] for r in mine)), f"{_timing.geomean(ans):.3f}",
            f"{max((a for a in ans if math.isfinite(a)), default=math.nan):.3f}",
            str(sum(a > 1 + SLOWER for a in ans)), f"{_timing.geomean(hand):.3f}",
        ])  # fmt: skip
    served = f"timing process: benchmarked {stats['benchmarked']}, fallbacks {stats['fallbacks']}"
    return _timing.table(rows) + f"\n(> 1: tuned here is faster; {served})"


# --------------------------------------------------------------------------- the run


def _child(opts: argparse.Namespace, args: list[str], book: Path, mode: str) -> None:
    env = {**os.environ, "TUNEBOOK_DIR": str(book.resolve()), "TUNEBOOK_MODE": mode}
    for name in ("TUNEBOOK_PATH", "TUNEBOOK_REDIS_URL", "TUNEBOOK_TIMER"):  # the shipped books alone
        env.pop(name, None)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if opts.dry_run:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, *args], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"same_arch: {' '.join(args[:4])} ... exited {proc.returncode}")


def _tune(opts: argparse.Namespace, book: Path) -> None:
    """The pack's own tune command: the ops but decode at --tokens, decode at its batches."""
    ops = opts.ops.split(",")
    common = ["-m", "tunebook.kernels", "tune", "--out", str(book), "--models", opts.models]
    if opts.max_configs:
        common += ["--max-configs", str(opts.max_configs)]
    others = [op for op in ops if op != DECODE]
    if others:
        _child(opts, [*common, "--ops", ",".join(others), "--tokens", opts.tokens], book, "tune")
    if DECODE in ops:
        decode = ["--ops", DECODE, "--tokens", opts.batches, "--contexts", opts.contexts]
        _child(opts, [*common, *decode], book, "tune")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parse(argv)
    opts.argv = argv
    if opts.phase == "answers":
        return answers(opts)
    if opts.phase == "time":
        return timed(opts)
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit(_timing.NO_GPU)
    out = Path(opts.out)
    (out / "no-book").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print("same_arch: tuning on this GPU (the pack's tune command)", flush=True)
    _tune(opts, out / "book")
    tuned_s = time.monotonic() - start
    print(f"same_arch: tuned in {tuned_s:.0f}s; the shipped books' answers, in a fresh process", flush=True)
    me = [__file__, *argv]
    _child(opts, [*me, "--phase", "answers"], out / "no-book", "serve")
    print("same_arch: timing, in a fresh process serving the book tuned here", flush=True)
    _child(opts, [*me, "--phase", "time"], out / "book", "serve")
    print(f"same_arch: {time.monotonic() - start:.0f}s in all ({tuned_s:.0f}s tuning)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
