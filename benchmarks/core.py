"""Issue 2's measurements, side by side in one run (needs one CUDA GPU):

1. host time per call on a remembered key: torch.add, plain @triton.jit, triton.autotune,
   tunebook.autotune (a vector add, and a GEMM with 12 arguments);
2. new process, remembered key, warm compile cache: first call of a 4096^3 fp16 GEMM with
   a fixed-config jit, triton.autotune(cache_results=True), tunebook, and triton.autotune
   without a cache;
3. one config added to the 48-config list: first call in a new process for tunebook
   (benchmarks 1) and triton.autotune(cache_results=True) (benchmarks all 49).

    python benchmarks/core.py [--out DIR] [--hot-only]
    python benchmarks/core.py --interpret --out /tmp/core   # CPU mode, about half a minute

Prints tables last; writes every number to DIR/core.json (``--hot-only``: DIR/core_hot.json;
default $OUT or ./bench-out). ``--interpret`` runs every step on the CPU through Triton's
interpreter with a 32^3 float32 GEMM, the 4 small configs, one repeat and a few calls per
round: it checks the script, its timings are stand-ins. There, triton.autotune times with
tunebook's wall-clock timer (Triton's own needs a GPU) and runs without ``cache_results``
(Triton's results cache does not work under its interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness

# --------------------------------------------------------------------------- children


def first_call_configs(plus_one: bool) -> list[Any]:
    """The 48-config list (CPU mode: the 4 small configs), and with ``plus_one`` one more."""
    import triton

    from tunebook.demo import matmul

    if harness.interpreting():
        extra = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
        return matmul.small_configs() + ([triton.Config(extra, num_warps=2)] if plus_one else [])
    extra = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    return matmul.gemm_configs() + ([triton.Config(extra, num_stages=3, num_warps=8)] if plus_one else [])


def _gemm_variant(variant: str, configs: list[Any]) -> Any:
    import tunebook
    from tunebook.demo.matmul import _matmul_kernel

    if variant == "tunebook":
        return tunebook.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    if variant == "triton_cache":
        return harness.triton_autotune(configs, ["M", "N", "K"], cache_results=True)(_matmul_kernel)
    if variant == "triton":
        return harness.triton_autotune(configs, ["M", "N", "K"])(_matmul_kernel)
    raise ValueError(variant)


def child_first_call(variant: str, plus_one: bool, fixed: str | None) -> None:
    """A fresh process: time the first GEMM call after CUDA is initialised."""
    import torch

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, matmul

    configs = first_call_configs(plus_one)
    n_configs = len(configs)
    size, dtype = (32, torch.float32) if harness.interpreting() else (4096, torch.float16)
    g = torch.Generator(device=harness.device()).manual_seed(0)
    a = torch.randn(size, size, device=harness.device(), dtype=dtype, generator=g)
    b = torch.randn(size, size, device=harness.device(), dtype=dtype, generator=g)
    harness.synchronize()
    if variant == "jit":
        meta = json.loads(fixed or "{}")
        start = time.perf_counter()
        c = matmul(_matmul_kernel, a, b, **meta)
    else:
        kernel = _gemm_variant(variant, configs)
        start = time.perf_counter()
        c = matmul(kernel, a, b)
    harness.synchronize()
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

    cpu = harness.interpreting()
    n = 64 if cpu else 4096
    x, y, out = (torch.randn(n, device=harness.device()) for _ in range(3))
    add_configs = [triton.Config({"BLOCK": b}) for b in (512, 1024, 2048)]
    tb_add = tunebook.autotune(add_configs, key=["n"])(_add_kernel)
    tr_add = harness.triton_autotune(add_configs, ["n"])(_add_kernel)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    tb_add[grid](x, y, out, n)
    tr_add[grid](x, y, out, n)
    best = tb_add.best_config
    torch.testing.assert_close(out, x + y)

    m = 16 if cpu else 64
    dtype = torch.float32 if cpu else torch.float16
    a, b = (torch.randn(m, m, device=harness.device(), dtype=dtype) for _ in range(2))
    gemm_configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)
        for bm in (32, 64)
    ]
    tb_mm = tunebook.autotune(gemm_configs, key=["M", "N", "K"])(_matmul_kernel)
    tr_mm = harness.triton_autotune(gemm_configs, ["M", "N", "K"])(_matmul_kernel)
    matmul(tb_mm, a, b)
    matmul(tr_mm, a, b)
    # The same hits launched through Triton's JITFunction.run (the direct launch off): a hit's
    # launcher is built at its config's first call, so the switch is set around those.
    os.environ["TUNEBOOK_DIRECT_LAUNCH"] = "0"
    tb_add_run = tunebook.autotune(add_configs, key=["n"])(_add_kernel)
    tb_mm_run = tunebook.autotune(gemm_configs, key=["M", "N", "K"])(_matmul_kernel)
    for _ in range(2):
        tb_add_run[grid](x, y, out, n)
        matmul(tb_mm_run, a, b)
    del os.environ["TUNEBOOK_DIRECT_LAUNCH"]
    mm_best = {**tb_mm.best_config.kwargs, "num_warps": 4, "num_stages": 3}
    c = torch.empty(m, m, device=harness.device(), dtype=dtype)

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
        "add/tunebook via run": lambda: tb_add_run[grid](x, y, out, n),
        "gemm/jit": lambda: _matmul_kernel[mm_grid](*mm_args, **mm_best),
        "gemm/triton.autotune": lambda: tr_mm[mm_grid](*mm_args),
        "gemm/tunebook": lambda: tb_mm[mm_grid](*mm_args),
        "gemm/tunebook via run": lambda: tb_mm_run[mm_grid](*mm_args),
    }
    calls, rounds, warmup = (2, 1, 1) if cpu else (5000, 15, 500)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    harness.synchronize()

    def host_us_per_call(fn: Any) -> float:
        harness.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6

    # Host time is what is measured here, so no CUDA graph: it would take the host away.
    samples = harness.interleave(variants, rounds, host_us_per_call)
    harness.synchronize()
    ratios = {}
    for kind in ("add", "gemm"):
        tb, jit, tr = samples[f"{kind}/tunebook"], samples[f"{kind}/jit"], samples[f"{kind}/triton.autotune"]
        ratios[f"{kind}: tunebook/jit"] = harness.median_ratio(tb, jit)
        ratios[f"{kind}: tunebook/triton.autotune"] = harness.median_ratio(tb, tr)
        via_run = samples[f"{kind}/tunebook via run"]
        ratios[f"{kind}: tunebook via run/jit"] = harness.median_ratio(via_run, jit)
        ratios[f"{kind}: tunebook via run/triton.autotune"] = harness.median_ratio(via_run, tr)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    parser.add_argument("--child", nargs="*")
    parser.add_argument(
        "--repeats", type=harness.positive_int, help="new-process repeats (default 3; CPU mode 1)"
    )
    parser.add_argument("--hot-only", action="store_true", help="only measurement 1 (host time per call)")
    parser.add_argument("--interpret", action="store_true", help="CPU mode: Triton's interpreter, tiny sizes")
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "hot":
            child_hot_path()
        else:
            child_first_call(rest[0], rest[1] == "+1", rest[2] if len(rest) > 2 else None)
        return

    out = harness.out_dir(args.out)
    repeats = args.repeats or (1 if args.interpret else 3)
    work = Path(tempfile.mkdtemp(prefix="tunebook-bench-"))
    env = harness.child_env(interpret=args.interpret, scratch=work)
    results: dict[str, Any] = harness.platform_header(interpret=args.interpret)
    if args.interpret:
        results["cpu_mode"] = harness.CPU_TRITON_NOTE
    log = []

    def step(name: str, child_args: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = harness.run_child([__file__, "--child", *child_args], env=env, timeout=900)
        r["process_wall_s"] = time.perf_counter() - t0
        log.append({"step": name, **r})
        print(f"[{name}] {json.dumps({k: v for k, v in r.items() if k != 'samples'})}", flush=True)
        return r

    if args.hot_only:
        hot = step("hot path", ["hot"])
        (out / "core_hot.json").write_text(json.dumps({**results, "hot_path": hot}, indent=1))
        print(f"\n=== host time per call on a hit: {harness.header_line(results)}")
        print(hot_table(hot))
        return
    # Prepare: cold tuning fills the compile cache, the book, and Triton's results cache.
    base = "4" if args.interpret else "48"
    more = str(int(base) + 1)
    cold_tb = step(f"cold tune tunebook ({base})", ["first", "tunebook", "+0"])
    cold_tr = step(f"cold tune triton cache_results ({base})", ["first", "triton_cache", "+0"])
    fixed = json.dumps({**cold_tb["best"]})
    # 2. New processes, remembered key, warm compile cache.
    first: dict[str, list[float]] = {"jit": [], "triton_cache": [], "tunebook": []}
    bench_counts = []
    for _ in range(repeats):
        first["jit"].append(step("first call jit (fixed)", ["first", "jit", "+0", fixed])["seconds"])
        first["triton_cache"].append(
            step(f"first call triton cache ({base})", ["first", "triton_cache", "+0"])["seconds"]
        )
        r = step(f"first call tunebook ({base})", ["first", "tunebook", "+0"])
        first["tunebook"].append(r["seconds"])
        bench_counts.append(r["benchmarked"])
    nocache = step(f"first call triton.autotune no cache ({base})", ["first", "triton", "+0"])
    # 3. One more config, new process.
    book_copy = work / f"book-before-{more}"
    shutil.copytree(work / "book", book_copy)
    tb49 = step(f"add a config: tunebook ({more})", ["first", "tunebook", "+1"])
    tr49 = step(f"add a config: triton cache ({more})", ["first", "triton_cache", "+1"])
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
    (out / "core.json").write_text(json.dumps(results, indent=1))

    print(f"\n=== tunebook core benchmarks: {harness.header_line(results)}")
    if args.interpret:
        print(harness.CPU_TRITON_NOTE)
    print("host time per call on a hit (median of rounds, us; ratios: median of per-round ratios):")
    print(hot_table(hot))
    size = "32^3 float32" if args.interpret else "4096^3 fp16"
    print(f"\nnew process, remembered key, first call of a {size} GEMM (median of {repeats}):")
    rows: list[list[object]] = [
        ["fixed-config jit", med["jit"], None],
        ["triton.autotune(cache_results=True)", med["triton_cache"], None],
        ["tunebook", med["tunebook"], ", ".join(f"{n:g}" for n in bench_counts)],
        ["triton.autotune without a cache", nocache["seconds"], None],
    ]
    print(harness.table(rows, ("first call", "seconds", "configs benchmarked")))
    print(f"tunebook / fixed-config jit = {med['tunebook'] / med['jit']:.3f}")
    print(f"\none config added ({more}), new process:")
    rows = [
        ["tunebook", tb49["seconds"], f"{tb49['benchmarked']:g}"],
        ["triton.autotune(cache_results=True)", tr49["seconds"], f"{more} (its cache key is the list)"],
    ]
    print(harness.table(rows, ("", "seconds", "configs benchmarked")))
    print(
        f"\ncold tuning ({base} configs): tunebook {cold_tb['seconds']:.2f} s, triton cache_results "
        f"{cold_tr['seconds']:.2f} s"
    )


def hot_table(hot: dict[str, Any]) -> str:
    """BENCHMARKS.md's layout: a row per kernel, variants and ratios across."""
    us, ratios = hot["us_per_call"], hot["ratios"]
    rows = [
        [
            kind,
            us.get(f"{kind}/torch.add"),
            us[f"{kind}/jit"],
            us[f"{kind}/triton.autotune"],
            us[f"{kind}/tunebook"],
            ratios[f"{kind}: tunebook/jit"],
            ratios[f"{kind}: tunebook/triton.autotune"],
            us[f"{kind}/tunebook via run"],
            ratios[f"{kind}: tunebook via run/jit"],
            ratios[f"{kind}: tunebook via run/triton.autotune"],
        ]
        for kind in ("add", "gemm")
    ]
    columns = (
        "us per call",
        "torch.add",
        "jit",
        "triton.autotune",
        "tunebook",
        "tb / jit",
        "tb / triton",
        "tb via run",
        "via run / jit",
        "via run / triton",
    )
    return harness.table(rows, columns, floats=[".2f"] * 5 + [".3f"] * 2 + [".2f"] + [".3f"] * 2)


if __name__ == "__main__":
    main()
