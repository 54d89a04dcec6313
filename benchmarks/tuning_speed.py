"""Issue 3, measurement 1: wall time to tune one new key of the 48-config GEMM list.

tunebook (parallel precompile + adaptive timing) against triton.autotune, each in a fresh
process, with a cold compile cache (a new TRITON_CACHE_DIR) and a warm one (the cache
the cold run filled; the book is empty, so the key is new). Then the quality check: the
two chosen configs timed side by side with do_bench (median of long runs, alternated).

    python benchmarks/tuning_speed.py [--out DIR] [--size 4096]

Needs one CUDA GPU. Prints a table last; writes DIR/tuning_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def child(variant: str, size: int) -> None:
    import torch
    import triton

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, gemm_configs, matmul

    configs = gemm_configs()
    if variant == "tunebook":
        kernel = tunebook.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    else:
        kernel = triton.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=torch.float16, generator=g)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16, generator=g)
    torch.cuda.synchronize()
    start = time.perf_counter()
    c = matmul(kernel, a, b)
    torch.cuda.synchronize()
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


def quality(configs_json: str, size: int) -> None:
    import torch
    from triton.testing import do_bench

    from tunebook.demo.matmul import _matmul_kernel, matmul

    chosen = json.loads(configs_json)
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    times: dict[str, list[float]] = {k: [] for k in chosen}
    for _ in range(5):
        for name, meta in chosen.items():
            times[name].append(do_bench(lambda m=meta: matmul(_matmul_kernel, a, b, **m), warmup=50, rep=300))
    print(json.dumps({k: statistics.median(v) for k, v in times.items()} | {"samples": times}))


def run(args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--warm-repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child is not None:
        if args.child[0] == "quality":
            quality(args.child[1], args.size)
        else:
            child(args.child[0], args.size)
        return

    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tunebook-speed-"))
    base_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base_env.pop("TRITON_INTERPRET", None)
    rows: dict[str, dict[str, list[float]]] = {v: {"cold": [], "warm": []} for v in ("tunebook", "triton")}
    log = []
    chosen = {}
    for variant in ("triton", "tunebook"):
        cache = work / f"cache-{variant}"
        for phase in ["cold"] + ["warm"] * args.warm_repeats:
            env = {
                **base_env,
                "TRITON_CACHE_DIR": str(cache),
                "TUNEBOOK_DIR": str(work / f"book-{variant}-{phase}-{len(log)}"),
            }
            r = run(["--size", str(args.size), "--child", variant], env)
            rows[variant][phase].append(r["seconds"])
            chosen[variant] = r["best"]
            log.append({"phase": phase, **r})
            print(
                f"[{variant} {phase}] {r['seconds']:.2f} s best={r['best']} "
                f"benchmarked={r['stats']['benchmarked']}",
                flush=True,
            )
    q = run(
        ["--size", str(args.size), "--child", "quality", json.dumps(chosen)],
        {**base_env, "TRITON_CACHE_DIR": str(work / "cache-tunebook")},
    )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "cpus": os.cpu_count(),
        "seconds": rows,
        "chosen": chosen,
        "kernel_ms": q,
        "log": log,
    }
    (args.out / "tuning_speed.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n=== tuning one new key, 48-config GEMM {args.size}^3 fp16: {result['gpu']} | triton "
        f"{result['triton']} | torch {result['torch']} | {result['date']} | {result['cpus']} CPUs"
    )
    for phase in ("cold", "warm"):
        tb, tr = statistics.median(rows["tunebook"][phase]), statistics.median(rows["triton"][phase])
        print(f"  {phase:5s} cache: tunebook {tb:6.2f} s   triton.autotune {tr:6.2f} s   ratio {tb / tr:.3f}")
    ratio = q["tunebook"] / q["triton"]
    print(
        f"  chosen config kernel time: tunebook {q['tunebook']:.4f} ms  triton {q['triton']:.4f} ms  "
        f"ratio {ratio:.4f}"
    )
    print(f"  tunebook chose {chosen['tunebook']}\n  triton chose   {chosen['triton']}")


if __name__ == "__main__":
    main()
