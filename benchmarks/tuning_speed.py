"""Issue 3, measurement 1: wall time to tune one new key of the 48-config GEMM list.

tunebook (parallel precompile + adaptive timing) against triton.autotune, each in a fresh
process, with a cold compile cache (a new TRITON_CACHE_DIR) and a warm one (the cache
the cold run filled; the book is empty, so the key is new). Then the quality check: the
two chosen configs timed side by side with do_bench (median of long runs, alternated).

    python benchmarks/tuning_speed.py [--out DIR] [--size 4096]
    python benchmarks/tuning_speed.py --interpret --out /tmp/speed   # CPU mode, ~15 s

Needs one CUDA GPU. Prints a table last; writes DIR/tuning_speed.json (default $OUT or
./bench-out). ``--interpret`` runs the same flow on the CPU through Triton's interpreter (a
32^3 float32 GEMM, the 4 small configs, one warm repeat, one quality round): it checks the
script, its timings are stand-ins. There, triton.autotune times with tunebook's wall-clock
timer, since Triton's own needs a GPU (``harness.triton_autotune``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness


def child(variant: str, size: int) -> None:
    import torch

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, gemm_configs, matmul, small_configs

    cpu = harness.interpreting()
    configs = small_configs() if cpu else gemm_configs()
    if variant == "tunebook":
        kernel = tunebook.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    else:
        kernel = harness.triton_autotune(configs, ["M", "N", "K"])(_matmul_kernel)
    dtype = torch.float32 if cpu else torch.float16
    g = torch.Generator(device=harness.device()).manual_seed(0)
    a = torch.randn(size, size, device=harness.device(), dtype=dtype, generator=g)
    b = torch.randn(size, size, device=harness.device(), dtype=dtype, generator=g)
    harness.synchronize()
    start = time.perf_counter()
    c = matmul(kernel, a, b)
    harness.synchronize()
    seconds = time.perf_counter() - start
    ref = a.float() @ b.float()
    best = kernel.best_config
    print(
        json.dumps(
            {
                "variant": variant,
                "seconds": seconds,
                "rel_err": float(((c.float() - ref).norm() / ref.norm()).item()),
                "best": {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages},
                "stats": tunebook.stats(),
            }
        )
    )


def quality(configs_json: str, size: int, rounds: int) -> None:
    """The two chosen configs timed side by side, rounds alternated (A, B, A, B, ...)."""
    import torch

    from tunebook.demo.matmul import _matmul_kernel, matmul

    chosen = json.loads(configs_json)
    dtype = torch.float32 if harness.interpreting() else torch.float16
    a = torch.randn(size, size, device=harness.device(), dtype=dtype)
    b = torch.randn(size, size, device=harness.device(), dtype=dtype)
    calls = {name: (lambda m=meta: matmul(_matmul_kernel, a, b, **m)) for name, meta in chosen.items()}
    # do_bench's default "mean", as this benchmark has always measured it.
    timing = harness.do_bench_times(calls, rounds=rounds, warmup_ms=50, rep_ms=300, return_mode="mean")
    print(json.dumps(timing.medians() | {"samples": timing.ms, "timer": timing.method}))


def main() -> None:
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    parser.add_argument("--size", type=int, help="M = N = K (default 4096; CPU mode 32)")
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--warm-repeats", type=harness.positive_int, help="default 2; CPU mode 1")
    parser.add_argument("--interpret", action="store_true", help="CPU mode: Triton's interpreter, tiny sizes")
    args = parser.parse_args()
    size = args.size or (32 if args.interpret else 4096)
    if args.child is not None:
        if args.child[0] == "quality":
            quality(args.child[1], size, int(args.child[2]))
        else:
            child(args.child[0], size)
        return

    header = harness.platform_header(interpret=args.interpret)  # before any child: no GPU is one line
    out = harness.out_dir(args.out)
    warm_repeats = args.warm_repeats or (1 if args.interpret else 2)
    work = Path(tempfile.mkdtemp(prefix="tunebook-speed-"))
    base_env = harness.child_env(interpret=args.interpret)
    rows: dict[str, dict[str, list[float]]] = {v: {"cold": [], "warm": []} for v in ("tunebook", "triton")}
    log: list[dict[str, Any]] = []
    chosen = {}
    for variant in ("triton", "tunebook"):
        cache = work / f"cache-{variant}"
        for phase in ["cold"] + ["warm"] * warm_repeats:
            env = {
                **base_env,
                "TRITON_CACHE_DIR": str(cache),
                "TUNEBOOK_DIR": str(work / f"book-{variant}-{phase}-{len(log)}"),
            }
            r = harness.run_child([__file__, "--size", str(size), "--child", variant], env=env)
            rows[variant][phase].append(r["seconds"])
            chosen[variant] = r["best"]
            log.append({"phase": phase, **r})
            print(
                f"[{variant} {phase}] {r['seconds']:.2f} s best={r['best']} "
                f"benchmarked={r['stats']['benchmarked']}",
                flush=True,
            )
    quality_rounds = 1 if args.interpret else 5
    q = harness.run_child(
        [__file__, "--size", str(size), "--child", "quality", json.dumps(chosen), str(quality_rounds)],
        env={**base_env, "TRITON_CACHE_DIR": str(work / "cache-tunebook")},
    )
    result: dict[str, Any] = {
        **header,
        "size": size,
        "cpus": os.cpu_count(),
        "seconds": rows,
        "chosen": chosen,
        "kernel_ms": q,
        "log": log,
    }
    if args.interpret:
        result["cpu_mode"] = harness.CPU_TRITON_NOTE
    (out / "tuning_speed.json").write_text(json.dumps(result, indent=1))
    what = f"{size}^3 float32, 4 small configs" if args.interpret else f"{size}^3 fp16, 48 configs"
    print(
        f"\n=== tuning one new key of a GEMM ({what}), {result['cpus']} CPUs: {harness.header_line(result)}"
    )
    table = []
    for phase in ("cold", "warm"):
        tb, tr = statistics.median(rows["tunebook"][phase]), statistics.median(rows["triton"][phase])
        table.append([f"{phase} compile cache", tb, tr, tb / tr])
    print(harness.table(table, ("wall time to tune, s", "tunebook", "triton.autotune", "ratio")))
    print(
        f"chosen config kernel time ({q['timer']}): tunebook {q['tunebook']:.4f} ms, triton "
        f"{q['triton']:.4f} ms, ratio {q['tunebook'] / q['triton']:.4f}"
    )
    print(f"tunebook chose {chosen['tunebook']}\ntriton chose   {chosen['triton']}")


if __name__ == "__main__":
    main()
