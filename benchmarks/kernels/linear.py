"""Benchmark and book-tuning driver for tunebook.kernels.linear (bf16), on LLM layer shapes.

Variants at every (layer, M): ``tunebook`` (the book's config; serve mode by default),
``rule`` (the serve-mode default rule, what runs without a book), ``fixed`` (the Triton
tutorial's hand-picked 128x256x64 tile, GROUP_M=8, 3 stages, 8 warps) and ``cublas``
(``torch.nn.functional.linear``). Reported: microseconds per call (median, p20, p80 of CUDA
graph replays interleaved across variants), TFLOP/s and the ratio to cuBLAS. Each launch in
a graph reads its own copy of the weight (up to 256 MB of copies), so decode shapes are
measured with cold weights, as a forward pass meets them.

    python benchmarks/kernels/linear.py --book-dir books/ --tune              # tune the book keys
    python benchmarks/kernels/linear.py --book-dir books/ --out results/      # then measure
    python benchmarks/kernels/linear.py --dry-run --out /tmp/lin              # CPU, tiny shapes

``--tune`` tunes ``--tune-m`` batch sizes (default 1, 16, 128, 2048) of every layer into
``--book-dir`` (TUNEBOOK_MODE=tune); later sizes of a layer start from the winners of the
sizes already tuned (the ``neighbors`` strategy), so they cost a fraction of the first.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from _gemm_timing import (
    Variant,
    check_args,
    common_parser,
    print_table,
    start,
    time_variants,
    write_result,
)
from _model_names import OLD_NAMES

# The models are the pack's (tunebook.kernels._models, the names `python -m tunebook.kernels
# tune --models` takes), their layers as (name, N, K): q/k/v fused, o, gate/up fused, down.
# They are read once the environment is set (importing the pack imports triton).
DEFAULT_MODELS = "llama-3-8b,llama-3-70b-tp4,llama-3-70b-tp8,qwen2.5-7b,smollm2-135m"  # the dense ones
DRY_MODELS = {"tiny": [("qkv", 40, 24), ("down", 24, 72)]}
M_VALUES = [2**i for i in range(14)]  # 1 .. 8192
TUNE_M = [1, 16, 128, 2048]
FIXED = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3)
COPY_BYTES = 256 << 20
VARIANTS = ("tunebook", "rule", "fixed", "cublas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, "linear", M_VALUES, TUNE_M)
    p.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="comma-separated model names of `python -m tunebook.kernels tune --models` "
        f"(default: {DEFAULT_MODELS})",
    )
    return check_args(p, p.parse_args(argv))


def model_layers(names: str) -> dict[str, list[tuple[str, int, int]]]:
    """{model: [(layer, N, K), ...]} of the pack's models named in ``names`` (comma-separated)."""
    from tunebook.kernels import _models

    try:
        models = _models.select_models(",".join(OLD_NAMES.get(n, n) for n in names.split(",")))
    except ValueError as exc:
        sys.exit(f"error: --models: {exc}")
    return {
        m.name: [(s["layer"], s["N"], s["K"]) for s in map(dict, _models.shapes("linear", (m,)))]
        for m in models
    }


def layers(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    chosen = model_layers(args.models)  # checked in a dry run too: a typo shows before a GPU run
    models = DRY_MODELS if args.dry_run else chosen
    return [(model, name, n, k) for model, shapes in models.items() for name, n, k in shapes]


def make_inputs(M: int, N: int, K: int, copies: int, device: str) -> tuple[Any, list[Any]]:
    import torch

    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    ws = [torch.randn(N, K, device=device, dtype=torch.bfloat16) * K**-0.5 for _ in range(copies)]
    return x, ws


def cycling(ws: list[Any], call: Any) -> Any:
    """A call that reads the next weight copy each time (the copies defeat the L2 cache)."""
    state = {"i": 0}

    def run() -> Any:
        w = ws[state["i"] % len(ws)]
        state["i"] += 1
        return call(w)

    return run


def tune(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """The book-tuning driver: every layer at each --tune-m, smallest M first (hints flow up)."""

    import tunebook
    from tunebook.kernels.linear import linear

    done = []
    for m in sorted(int(v) for v in args.tune_m.split(",")):
        for model, name, n, k in layers(args):
            x, ws = make_inputs(m, n, k, 1, device)
            before, t0 = tunebook.stats(), time.perf_counter()
            linear(x, ws[0])
            after = tunebook.stats()
            row = {"model": model, "layer": name, "M": m, "N": n, "K": k}
            row["benchmarked"] = after["benchmarked"] - before["benchmarked"]
            row["seconds"] = round(time.perf_counter() - t0, 2)
            done.append(row)
            print(
                f"tuned {model}/{name} M={m}: {row['benchmarked']} configs in {row['seconds']} s", flush=True
            )
    return done


def measure(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    import tunebook
    from tunebook.kernels._linear_tma import MIN_M, default_linear_tma_config
    from tunebook.kernels.linear import default_linear_config, linear

    rows = []
    ms = [int(v) for v in args.m.split(",")] if not args.dry_run else [1, 3]
    for model, name, n, k in layers(args):
        copies = 1 if args.dry_run else max(1, min(64, math.ceil(COPY_BYTES / (n * k * 2))))
        for m in ms:
            x, ws = make_inputs(m, n, k, copies, device)
            # What serve mode launches without a book: the TMA kernel's rule from MIN_M rows.
            rule = default_linear_config(m, n, k) if m < MIN_M else default_linear_tma_config()
            fallbacks = tunebook.stats()["fallbacks"]
            variants = {
                "tunebook": Variant(cycling(ws, lambda w, x=x: linear(x, w))),
                "rule": Variant(cycling(ws, lambda w, x=x, c=rule: linear(x, w, config=c))),
                "fixed": Variant(cycling(ws, lambda w, x=x: linear(x, w, config=FIXED))),
                "cublas": Variant(cycling(ws, lambda w, x=x: F.linear(x, w))),
            }
            ref = F.linear(x.float(), ws[0].float())
            err = (linear(x, ws[0]).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            served_from_book = tunebook.stats()["fallbacks"] == fallbacks
            timings = time_variants(variants, repeats=2 if args.dry_run else args.repeats)
            flops = 2.0 * m * n * k
            row = {"model": model, "layer": name, "M": m, "N": n, "K": k, "rel_err": err}
            row["from_book"] = served_from_book
            for v, t in timings.items():
                row[v] = {**t, "tflops": flops / (t["us"] * 1e-6) / 1e12}
            row["vs_cublas"] = timings["cublas"]["us"] / timings["tunebook"]["us"]
            rows.append(row)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, result = start(args)
    if args.tune:
        result["tuned"] = table = tune(args, device)
        columns = ["model", "layer", "M", "N", "K", "benchmarked", "seconds"]
    else:
        result["rows"] = rows = measure(args, device)
        table = [
            {"model": r["model"], "layer": r["layer"], "M": r["M"]}
            | {f"{v}_us": f"{r[v]['us']:.1f}" for v in VARIANTS}
            | {"TFLOP/s": f"{r['tunebook']['tflops']:.1f}", "x cuBLAS": f"{r['vs_cublas']:.2f}"}
            for r in rows
        ]
        columns = ["model", "layer", "M", *(f"{v}_us" for v in VARIANTS), "TFLOP/s", "x cuBLAS"]
    write_result(args, "linear", result)
    print("microseconds per call" if not args.tune else "tuning")
    print_table(table, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
