"""Issue 2's measurements, side by side in one run (needs one CUDA GPU):

1. host time per call on a remembered key: torch.add, plain @triton.jit, triton.autotune,
   tunebook.autotune (a vector add, and a GEMM with 12 arguments);
2. new process, remembered key, warm compile cache: first call of a 4096^3 fp16 GEMM with
   a fixed-config jit, triton.autotune(cache_results=True), tunebook, and triton.autotune
   without a cache;
3. one config added to the 48-config list: first call in a new process for tunebook
   (benchmarks 1) and triton.autotune(cache_results=True) (benchmarks all 49).

    python benchmarks/core.py [--out DIR]

Prints a table last; writes every number to DIR/core.json (default $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SIZE = 4096


# --------------------------------------------------------------------------- children


def _gemm_variant(variant: str, configs: list):
    import triton

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel

    if variant == "tunebook":
        return tunebook.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    if variant == "triton_cache":
        return triton.autotune(configs, key=["M", "N", "K"], cache_results=True)(_matmul_kernel)
    if variant == "triton":
        return triton.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    raise ValueError(variant)


def child_first_call(variant: str, n_configs: int, fixed: str | None) -> None:
    """A fresh process: time the first GEMM call after CUDA is initialised."""
    import torch
    import triton  # noqa: F401

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, gemm_configs, matmul

    configs = gemm_configs()
    if n_configs == 49:
        configs.append(
            __import__("triton").Config(
                {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8
            )
        )
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.float16, generator=g)
    b = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.float16, generator=g)
    torch.cuda.synchronize()
    if variant == "jit":
        meta = json.loads(fixed or "{}")
        start = time.perf_counter()
        c = matmul(_matmul_kernel, a, b, **meta)
    else:
        kernel = _gemm_variant(variant, configs)
        start = time.perf_counter()
        c = matmul(kernel, a, b)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = a.float() @ b.float()
    err = float(((c.float() - ref).norm() / ref.norm()).item())
    out = {"variant": variant, "configs": n_configs, "seconds": seconds, "rel_err": err, **tunebook.stats()}
    if variant != "jit":
        best = kernel.best_config
        out["best"] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        out["bench_time"] = getattr(kernel, "bench_time", None)
    print(json.dumps(out))


def child_hot_path() -> None:
    """Host time per call on a remembered key, every variant interleaved round by round."""
    import torch
    import triton
    import triton.language as tl

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, matmul

    @triton.jit
    def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(
            out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask
        )

    n = 4096
    x, y, out = (torch.randn(n, device="cuda") for _ in range(3))
    add_configs = [triton.Config({"BLOCK": b}) for b in (512, 1024, 2048)]
    tb_add = tunebook.autotune(add_configs, key=["n"])(_add_kernel)
    tr_add = triton.autotune(add_configs, key=["n"])(_add_kernel)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    tb_add[grid](x, y, out, n)
    tr_add[grid](x, y, out, n)
    best = tb_add.best_config
    torch.testing.assert_close(out, x + y)

    m = 64
    a, b = (torch.randn(m, m, device="cuda", dtype=torch.float16) for _ in range(2))
    gemm_configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)
        for bm in (32, 64)
    ]
    tb_mm = tunebook.autotune(gemm_configs, key=["M", "N", "K"])(_matmul_kernel)
    tr_mm = triton.autotune(gemm_configs, key=["M", "N", "K"])(_matmul_kernel)
    matmul(tb_mm, a, b)
    matmul(tr_mm, a, b)
    mm_best = {**tb_mm.best_config.kwargs, "num_warps": 4, "num_stages": 3}
    c = torch.empty(m, m, device="cuda", dtype=torch.float16)

    def mm_grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)

    mm_args = (a, b, c, m, m, m, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    variants = {
        "add/torch.add": lambda: torch.add(x, y, out=out),
        "add/jit": lambda: _add_kernel[grid](
            x, y, out, n, BLOCK=best.kwargs["BLOCK"], num_warps=best.num_warps, num_stages=best.num_stages
        ),
        "add/triton.autotune": lambda: tr_add[grid](x, y, out, n),
        "add/tunebook": lambda: tb_add[grid](x, y, out, n),
        "gemm/jit": lambda: _matmul_kernel[mm_grid](*mm_args, **mm_best),
        "gemm/triton.autotune": lambda: tr_mm[mm_grid](*mm_args),
        "gemm/tunebook": lambda: tb_mm[mm_grid](*mm_args),
    }
    calls, rounds = 5000, 15
    for fn in variants.values():
        for _ in range(500):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            samples[name].append((t1 - t0) / calls * 1e6)
    torch.cuda.synchronize()
    ratios = {}
    for kind in ("add", "gemm"):
        tb, jit, tr = samples[f"{kind}/tunebook"], samples[f"{kind}/jit"], samples[f"{kind}/triton.autotune"]
        ratios[f"{kind}: tunebook/jit"] = statistics.median(t / j for t, j in zip(tb, jit))
        ratios[f"{kind}: tunebook/triton.autotune"] = statistics.median(t / r for t, r in zip(tb, tr))
    print(
        json.dumps(
            {
                "us_per_call": {k: statistics.median(v) for k, v in samples.items()},
                "samples": samples,
                "ratios": ratios,
                "stats": tunebook.stats(),
            }
        )
    )


# --------------------------------------------------------------------------- driver


def run_child(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hot-only", action="store_true", help="only measurement 1 (host time per call)")
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "hot":
            child_hot_path()
        else:
            child_first_call(rest[0], int(rest[1]), rest[2] if len(rest) > 2 else None)
        return

    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tunebook-bench-"))
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TRITON_CACHE_DIR": str(work / "triton-cache"),
        "TUNEBOOK_DIR": str(work / "book"),
    }
    env.pop("TRITON_INTERPRET", None)
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    log = []

    def step(name: str, child_args: list[str], run_env: dict[str, str] | None = None) -> dict:
        t0 = time.perf_counter()
        r = run_child(["--child", *child_args], run_env or env)
        r["process_wall_s"] = time.perf_counter() - t0
        log.append({"step": name, **r})
        print(f"[{name}] {json.dumps({k: v for k, v in r.items() if k != 'samples'})}", flush=True)
        return r

    if args.hot_only:
        hot = step("hot path", ["hot"])
        (args.out / "core_hot.json").write_text(json.dumps({**results, "hot_path": hot}, indent=1))
        print("\n=== host time per call on a hit:", results["gpu"], "| triton", results["triton"])
        for k, v in hot["us_per_call"].items():
            print(f"  {k:28s} {v:7.2f} us")
        for k, v in hot["ratios"].items():
            print(f"  ratio {k:36s} {v:5.3f}")
        return
    # Prepare: cold tuning fills the compile cache, the book, and Triton's results cache.
    cold_tb = step("cold tune tunebook (48)", ["first", "tunebook", "48"])
    cold_tr = step("cold tune triton cache_results (48)", ["first", "triton_cache", "48"])
    fixed = json.dumps({**cold_tb["best"]})
    # 2. New processes, remembered key, warm compile cache.
    first: dict[str, list[float]] = {"jit": [], "triton_cache": [], "tunebook": []}
    bench_counts = []
    for _ in range(args.repeats):
        first["jit"].append(step("first call jit (fixed)", ["first", "jit", "48", fixed])["seconds"])
        first["triton_cache"].append(
            step("first call triton cache (48)", ["first", "triton_cache", "48"])["seconds"]
        )
        r = step("first call tunebook (48)", ["first", "tunebook", "48"])
        first["tunebook"].append(r["seconds"])
        bench_counts.append(r["benchmarked"])
    nocache = step("first call triton.autotune no cache (48)", ["first", "triton", "48"])
    # 3. One more config, new process.
    book_copy = work / "book-before-49"
    shutil.copytree(work / "book", book_copy)
    tb49 = step("add a config: tunebook (49)", ["first", "tunebook", "49"])
    tr49 = step("add a config: triton cache (49)", ["first", "triton_cache", "49"])
    # 1. Host time per call.
    hot = step("hot path", ["hot"])

    med = {k: statistics.median(v) for k, v in first.items()}
    results.update(
        {
            "cold_tune_s": {"tunebook": cold_tb["seconds"], "triton_cache": cold_tr["seconds"]},
            "first_call_s": first,
            "first_call_median_s": med,
            "first_call_tunebook_benchmarked": bench_counts,
            "first_call_triton_nocache_s": nocache["seconds"],
            "add_config": {
                "tunebook_s": tb49["seconds"],
                "tunebook_benchmarked": tb49["benchmarked"],
                "triton_cache_s": tr49["seconds"],
            },
            "hot_path": hot,
            "log": log,
        }
    )
    (args.out / "core.json").write_text(json.dumps(results, indent=1))

    print(
        "\n=== tunebook core benchmarks:",
        results["gpu"],
        "| triton",
        results["triton"],
        "| torch",
        results["torch"],
        "|",
        results["date"],
    )
    print("host time per call on a hit (median of rounds, us):")
    for k, v in hot["us_per_call"].items():
        print(f"  {k:28s} {v:7.2f}")
    for k, v in hot["ratios"].items():
        print(f"  ratio {k:36s} {v:5.3f}")
    print(f"new process, remembered key, first call of a 4096^3 fp16 GEMM (median of {args.repeats}, s):")
    for k, v in med.items():
        print(f"  {k:28s} {v:7.3f}")
    print(f"  triton.autotune no cache     {nocache['seconds']:7.3f}")
    ratio = med["tunebook"] / med["jit"]
    print(f"  ratio tunebook/jit           {ratio:7.3f}   tunebook benchmarked: {bench_counts}")
    print("one config added (49), new process:")
    print(f"  tunebook                     {tb49['seconds']:7.3f} s  benchmarked {tb49['benchmarked']}")
    print(
        f"  triton cache_results         {tr49['seconds']:7.3f} s  benchmarked 49 (its cache key is the list)"
    )
    print(
        f"cold tuning (48 configs): tunebook {cold_tb['seconds']:.2f} s, triton cache_results "
        f"{cold_tr['seconds']:.2f} s"
    )


if __name__ == "__main__":
    main()
