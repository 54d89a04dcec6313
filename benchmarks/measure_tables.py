"""Measure every config of two large spaces on this GPU and write timing tables.

The tables (format: ``tunebook._search._table``) let search strategies be replayed offline:
tests/test_strategies.py loops over every table in tests/data/tables/.

* ``matmul`` — C = A @ B, fp16 in, fp32 accumulate, fp16 out; a 1128-config space
  (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) over 6 shapes from decode-sized to large.
* ``softmax`` — row-wise y = exp(x - max(x)) / sum(exp(x - max(x))), fp16, online (two passes
  over column tiles), so any row length works; a 584-config space (rows per program,
  column tile, num_warps, num_stages) over 6 shapes up to a 128256-wide vocabulary.

Every config is compiled first, in parallel, by a pool of processes that fill Triton's
on-disk cache (``JITFunction.warmup``); the measuring process then only loads binaries.
Each (config, shape) is checked against PyTorch once, then timed with
``triton.testing.do_bench`` (L2 flushed, median; p20/p80 kept as "spread"). A config that
cannot run (OutOfResources, compile error, wrong result) is recorded with ``ms: null`` and
the reason. Tables are written as each finishes; a ``--deadline`` skips whole tables
rather than leaving partial ones.

Usage (one H100/H200, Triton 3.6, torch 2.11; about 6-8 minutes with the defaults)::

    python benchmarks/measure_tables.py --out "$OUT"
    python benchmarks/measure_tables.py --max-configs 24 --shapes 2     # a one-minute smoke run
    python benchmarks/measure_tables.py --dry-run --out /tmp/tables     # CPU: spaces and files only

Tables go to ``--out`` (default $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _harness as harness  # first: it puts the checkout's src/ on sys.path
import torch
import triton
import triton.language as tl

from tunebook._search import Table, TableRow
from tunebook._space import Space

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N]: one BLOCK_M x BLOCK_N tile of C per program, programs
    ordered in groups of GROUP_M tile-rows so neighbouring programs reuse B tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_tile = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_tile, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_tile, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    c_tile = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_tile, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[i, j] = exp(x[i, j] - m_i) / d_i with m_i = max_j x[i, j], d_i = sum_j exp(x[i, j] - m_i).

    BLOCK_M rows per program. Pass 1 walks the row in BLOCK_N tiles keeping the running max
    m and the running sum d rescaled to it (d' = d * exp(m - m') + sum exp(x - m')); pass 2
    writes the normalized values.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = row_ok[:, None] & (c[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    for start in range(0, N, BLOCK_N):
        c = start + cols
        ok = row_ok[:, None] & (c[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.exp(x - m[:, None]) / d[:, None]
        tl.store(y_ptr + rows[:, None] * stride_ym + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class Bench:
    """One kernel to tabulate: its space, its shapes, and how to call and check it."""

    name: str
    space: Space
    shapes: list[dict[str, int]]
    kernel: Any
    scalar_args: Callable[[dict[str, int]], tuple[Any, ...]]  # the kernel's args, tensors as dtypes
    grid: Callable[[dict[str, int], dict[str, Any]], tuple[int, ...]]
    work: Callable[[dict[str, int]], tuple[float, str]]  # (amount per call, unit per second)


def _matmul_args(s: dict[str, int]) -> tuple[Any, ...]:
    m, n, k = s["M"], s["N"], s["K"]
    # Exactly the ints a contiguous call passes: Triton specializes on them (==1, %16).
    return (torch.float16, torch.float16, torch.float16, m, n, k, k, 1, n, 1, n, 1)


def _softmax_args(s: dict[str, int]) -> tuple[Any, ...]:
    return (torch.float16, torch.float16, s["M"], s["N"], s["N"], s["N"])


MATMUL = Bench(
    name="matmul",
    space=Space(
        BLOCK_M=[32, 64, 128, 256],
        BLOCK_N=[32, 64, 128, 256],
        BLOCK_K=[32, 64, 128],
        GROUP_M=[1, 8],
        num_warps=[2, 4, 8],
        num_stages=[2, 3, 4, 5],
        # Beyond 512 fp32 accumulators a thread the kernel spills hopelessly; not worth compiling.
        constraints=[lambda c: c["BLOCK_M"] * c["BLOCK_N"] <= 512 * 32 * c["num_warps"]],
    ),
    shapes=[
        {"M": 4096, "N": 4096, "K": 4096},
        {"M": 2048, "N": 14336, "K": 4096},
        {"M": 8192, "N": 8192, "K": 1024},
        {"M": 1024, "N": 1024, "K": 8192},
        {"M": 128, "N": 4096, "K": 4096},
        {"M": 16, "N": 8192, "K": 4096},
    ],
    kernel=_matmul_kernel,
    scalar_args=_matmul_args,
    grid=lambda s, c: (triton.cdiv(s["M"], c["BLOCK_M"]) * triton.cdiv(s["N"], c["BLOCK_N"]),),
    work=lambda s: (2.0 * s["M"] * s["N"] * s["K"] / 1e12, "TFLOP/s"),
)

SOFTMAX = Bench(
    name="softmax",
    space=Space(
        BLOCK_M=[1, 2, 4, 8, 16],
        BLOCK_N=[256, 512, 1024, 2048, 4096, 8192, 16384],
        num_warps=[1, 2, 4, 8, 16, 32],
        num_stages=[1, 2, 3, 4],
        constraints=[
            lambda c: c["BLOCK_M"] * c["BLOCK_N"] <= 16384,  # fp32 tile held in registers
            lambda c: c["BLOCK_M"] * c["BLOCK_N"] >= 32 * c["num_warps"],  # no idle threads
        ],
    ),
    shapes=[
        {"M": 4096, "N": 4096},
        {"M": 8192, "N": 1024},
        {"M": 1024, "N": 32768},
        {"M": 32768, "N": 256},
        {"M": 16384, "N": 8192},
        {"M": 512, "N": 128256},
    ],
    kernel=_softmax_kernel,
    scalar_args=_softmax_args,
    grid=lambda s, c: (triton.cdiv(s["M"], c["BLOCK_M"]),),
    # Reads x twice, writes y once: 3 fp16 passes over the matrix.
    work=lambda s: (3 * 2 * s["M"] * s["N"] / 1e9, "GB/s"),
)

BENCHES = {b.name: b for b in (MATMUL, SOFTMAX)}


def shape_text(shape: dict[str, int]) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def split(bench: Bench, cand: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta-parameters, Config options) of a candidate, as launch keywords."""
    cfg = bench.space.to_config(cand)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return dict(cfg.kwargs), options


# ----------------------------------------------------------------------------- compiling


def _compile_one(job: tuple[str, int, dict[str, Any]]) -> tuple[int, str | None]:
    """In a pool worker: compile one config into Triton's cache; return (index, error)."""
    name, index, cand = job
    bench = BENCHES[name]
    meta, options = split(bench, cand)
    try:
        bench.kernel.warmup(*bench.scalar_args(bench.shapes[0]), grid=(1,), **meta, **options)
    except Exception as exc:  # any failure is data: recorded, never retried
        return index, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return index, None


def compile_all(jobs: list[tuple[str, int, dict[str, Any]]], workers: int) -> dict[tuple[str, int], str]:
    """Fill Triton's cache in parallel; the compile errors, keyed by (bench, index)."""
    errors: dict[tuple[str, int], str] = {}
    start = time.monotonic()
    ctx = multiprocessing.get_context("spawn")  # a forked CUDA context is unusable
    done = 0
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_one, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                name = futures[fut][0]
                index, error = fut.result()
                if error is not None:
                    errors[(name, index)] = error
                done += 1
                if done % 200 == 0 or done == len(jobs):
                    print(f"  compiled {done}/{len(jobs)} in {time.monotonic() - start:.0f}s", flush=True)
    except cf.process.BrokenProcessPool as exc:
        # A worker crashed (e.g. a compiler segfault): what is left compiles on first launch.
        print(f"  compile pool broke ({exc}); the rest compiles while measuring", flush=True)
    return errors


# ----------------------------------------------------------------------------- measuring


def make_inputs(bench: Bench, shape: dict[str, int]) -> tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]:
    """(kernel args, output tensor, reference result) on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    if bench.name == "matmul":
        m, n, k = shape["M"], shape["N"], shape["K"]
        a = torch.randn((m, k), device="cuda", dtype=torch.float16, generator=gen)
        b = torch.randn((k, n), device="cuda", dtype=torch.float16, generator=gen)
        c = torch.empty((m, n), device="cuda", dtype=torch.float16)
        strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
        args = (a, b, c, m, n, k, *strides)
        return args, c, torch.matmul(a, b)
    m, n = shape["M"], shape["N"]
    x = torch.randn((m, n), device="cuda", dtype=torch.float16, generator=gen) * 4
    y = torch.empty_like(x)
    return (x, y, m, n, x.stride(0), y.stride(0)), y, torch.softmax(x.float(), dim=-1).to(torch.float16)


def _close(bench: Bench, out: torch.Tensor, ref: torch.Tensor, shape: dict[str, int]) -> str | None:
    # fp16 GEMM: the error grows with sqrt(K); softmax values are in [0, 1].
    tol = 0.02 * math.sqrt(shape["K"]) if bench.name == "matmul" else 2e-3
    err = (out.float() - ref.float()).abs().max().item()
    return None if err <= tol else f"wrong result: max abs error {err:.3g} > {tol:.3g}"


def measure_table(
    bench: Bench,
    shape: dict[str, int],
    cands: list[dict[str, Any]],
    compile_errors: dict[int, str],
    warmup: int,
    rep: int,
) -> list[TableRow]:
    from triton.testing import do_bench

    args, out, ref = make_inputs(bench, shape)
    rows = []
    for i, cand in enumerate(cands):
        if i in compile_errors:
            rows.append(TableRow(cand, None, compile_errors[i]))
            continue
        meta, options = split(bench, cand)
        grid = bench.grid(shape, meta)

        def call(
            meta: dict[str, Any] = meta,
            options: dict[str, Any] = options,
            grid: Any = grid,
            args: tuple[Any, ...] = args,
        ) -> None:
            bench.kernel[grid](*args, **meta, **options)

        try:
            out.zero_()
            call()
            torch.cuda.synchronize()
            wrong = _close(bench, out, ref, shape)
            if wrong:
                rows.append(TableRow(cand, None, wrong))
                continue
            med, p20, p80 = do_bench(call, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            spread = (round(float(p20), 6), round(float(p80), 6))
            rows.append(TableRow(cand, round(float(med), 6), None, spread))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            rows.append(TableRow(cand, None, f"{type(exc).__name__}: {text[0] if text else ''}"[:300]))
            try:
                torch.cuda.synchronize()
            except Exception:  # the context is gone (illegal address): nothing after this is real
                lost = f"CUDA context lost while measuring {bench.name} {shape} {cand}: {exc}"
                raise SystemExit(lost) from exc
    del args, out, ref
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_out_argument(parser)
    parser.add_argument("--kernels", default="matmul,softmax", help="comma-separated: matmul,softmax")
    parser.add_argument("--shapes", type=int, default=6, help="first N shapes of each kernel")
    parser.add_argument("--max-configs", type=int, default=0, help="a seeded sample of N configs (0: all)")
    parser.add_argument("--warmup", type=int, default=3, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=10, help="do_bench repetition time, ms")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 8, help="compile processes")
    parser.add_argument("--deadline", type=float, default=480, help="seconds; later tables are skipped")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: enumerate and write empty tables")
    opts = parser.parse_args(argv)
    start = time.monotonic()
    out = harness.out_dir(opts.out)
    benches = [BENCHES[name] for name in opts.kernels.split(",")]

    if opts.dry_run:
        platform = {"backend": "dry-run", "device": "none", "arch": "", "triton": triton.__version__}
    else:
        from tunebook._fingerprint import platform_fingerprint

        platform = platform_fingerprint(
            f"triton.testing.do_bench median, L2 flushed, warmup={opts.warmup}ms rep={opts.rep}ms"
        )
    cands = {}
    for bench in benches:
        chosen = (
            bench.space.sample(opts.max_configs, seed=0)
            if opts.max_configs
            else bench.space.candidates(platform)
        )
        cands[bench.name] = chosen
        print(f"{bench.name}: {len(chosen)} configs of {bench.space!r}", flush=True)

    compile_errors: dict[tuple[str, int], str] = {}
    if not opts.dry_run:
        jobs = [(b.name, i, c) for b in benches for i, c in enumerate(cands[b.name])]
        print(f"compiling {len(jobs)} configs with {opts.workers} processes", flush=True)
        compile_errors = compile_all(jobs, opts.workers)
        failed = len(compile_errors)
        print(f"compiled in {time.monotonic() - start:.0f}s; {failed} failed to compile", flush=True)

    # Interleave kernels so that a deadline leaves tables of both.
    order = [(b, s) for k in range(opts.shapes) for b in benches if k < len(b.shapes) for s in [b.shapes[k]]]
    summary: list[list[object]] = []
    last_cost: dict[str, float] = {}
    for bench, shape in order:
        elapsed = time.monotonic() - start
        if elapsed + last_cost.get(bench.name, 0.0) > opts.deadline:
            summary.append([bench.name, shape_text(shape), None, None, None, None, "skipped: deadline"])
            continue
        t0 = time.monotonic()
        errs = {i: e for (n, i), e in compile_errors.items() if n == bench.name}
        if opts.dry_run:
            rows = [TableRow(c, None, "dry run: not measured") for c in cands[bench.name]]
        else:
            rows = measure_table(bench, shape, cands[bench.name], errs, opts.warmup, opts.rep)
        table = Table(
            kernel=bench.name,
            shape={**shape, "dtype": "float16"},
            platform=platform,
            rows=tuple(rows),
            space={k: list(v) for k, v in bench.space.params.items()},
        )
        slug = "".join(ch if ch.isalnum() else "-" for ch in str(platform.get("device", "gpu"))).strip("-")
        path = out / f"{bench.name}-{shape_text(shape)}-{slug}.json"
        table.dump(path)
        last_cost[bench.name] = time.monotonic() - t0
        best, ms = table.best()
        failed = sum(r.ms is None for r in rows)
        amount, unit = bench.work(shape)
        rate = f"{amount / (ms / 1e3):.0f} {unit}" if math.isfinite(ms) else None
        best_cfg = ",".join(f"{k}={v}" for k, v in rows[best].config.items()) if best >= 0 else None
        best_ms = ms if math.isfinite(ms) else None
        summary.append([bench.name, shape_text(shape), len(rows), failed, best_ms, rate, best_cfg])
        print(
            f"  {path.name}: {len(rows)} configs, {failed} failed, best {ms:.4f} ms "
            f"({last_cost[bench.name]:.0f}s)",
            flush=True,
        )

    print(f"\nsummary ({time.monotonic() - start:.0f}s in all, tables in {out}):")
    columns = ("kernel", "shape", "configs", "failed", "best ms", "rate", "best config")
    print(harness.table(summary, columns, floats=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
