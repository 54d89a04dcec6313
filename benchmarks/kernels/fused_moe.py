"""Benchmark and book-tuning driver for tunebook.kernels.fused_moe (bf16), Mixtral-8x7B shapes.

Variants at every batch size M (tokens), on the same inputs (softmax top-2 of random logits):

* ``tunebook``      — the book's configs for both GEMMs (serve mode by default);
* ``vllm-default``  — vLLM's default rule (``vllm_default_config``) on our kernel;
* ``vllm:<GPU>``    — each vLLM shipped table for this (E, N) found in ``--vllm-configs DIR``
  (files ``E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json`` as in vLLM's wheel), the
  entry of the nearest M, run on our kernel: how well other GPUs' tuning transfers (summed
  up per table after the main table: geometric mean, worst and best of its time over the
  book's, and the batch sizes where it loses more than 5%). An entry this GPU's Triton cannot
  build is left out of that row and named in the result's ``failed``;
* ``torch``         — a per-expert PyTorch loop (cuBLAS GEMMs; eager: it syncs with the host);
* ``align``         — the alignment step alone (part of every kernel variant's time);
* with ``--mix GPU``: ``tunebook-explicit`` (the book's two configs passed as ``config=``,
  aligned as vLLM aligns), ``tunebook-g1+GPU-g2`` and ``GPU-g1+tunebook-g2`` (one GEMM's
  config from the book, the other's from GPU's vLLM table): which GEMM's pick, or the
  alignment, makes the difference between the book and that table inside the whole op.

Microseconds per call are medians (and p20/p80) of CUDA-graph replays interleaved across the
variants; TFLOP/s counts the useful FLOPs, 2*M*k*3*H*I.

    python benchmarks/kernels/fused_moe.py --book-dir books/ --tune           # tune the book keys
    python benchmarks/kernels/fused_moe.py --book-dir books/ --vllm-configs vllm_configs/ --out results/
    python benchmarks/kernels/fused_moe.py --dry-run --out /tmp/moe           # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
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

# name -> (E, H, I, top_k); I is the per-GPU shard of the intermediate size (vLLM's N).
SHAPES = {"mixtral-8x7b": (8, 4096, 14336, 2), "mixtral-8x7b-tp2": (8, 4096, 7168, 2)}
DRY_SHAPES = {"tiny": (4, 24, 40, 2)}
M_VALUES = [2**i for i in range(14)]
TUNE_M = [1, 16, 128, 1024, 4096]
TABLE_NAME = re.compile(r"^E=(\d+),N=(\d+),device_name=([^,]+?)(,dtype=[^,]+)?(,block_shape=.*)?\.json$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, "fused_moe", M_VALUES, TUNE_M)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--vllm-configs", type=Path, help="a directory of vLLM fused-MoE config JSON files")
    p.add_argument("--torch-max-m", type=int, default=8192, help="skip the PyTorch loop above this M")
    p.add_argument("--mix", metavar="GPU", help="time the book's GEMM configs mixed with GPU's table too")
    args = check_args(p, p.parse_args(argv))
    if args.vllm_configs is not None and not args.vllm_configs.is_dir():
        p.error(f"--vllm-configs {args.vllm_configs}: no such directory")
    if args.mix and args.vllm_configs is None and not args.dry_run:
        p.error("--mix GPU mixes in a table of --vllm-configs DIR: give that directory too")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    return args


def load_vllm_tables(directory: Path) -> dict[tuple[int, int], dict[str, dict[int, dict[str, Any]]]]:
    """{(E, N): {device_name: {M: config}}} from vLLM's unquantized (16-bit) table files."""
    tables: dict[tuple[int, int], dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(directory.glob("*.json")):
        match = TABLE_NAME.match(path.name)
        if not match or match.group(4) or match.group(5):  # fp8/int8 and block-quantized tables
            continue
        entries = json.loads(path.read_text())
        table = {int(m): cfg for m, cfg in entries.items() if m.isdigit()}
        key = (int(match.group(1)), int(match.group(2)))
        tables.setdefault(key, {})[match.group(3)] = table
    return tables


def nearest_entry(table: dict[int, dict[str, Any]], m: int) -> dict[str, Any]:
    """vLLM's lookup: the entry of the batch size nearest to ``m``."""
    return table[min(table, key=lambda k: abs(k - m))]


def check_vllm_rule(shapes: dict[str, tuple[int, int, int, int]], ms: list[int]) -> dict[str, Any]:
    """Where vllm is importable, compare ``vllm_default_config`` with vLLM's own rule."""
    from tunebook.kernels.fused_moe import vllm_default_config

    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config
    except Exception as exc:  # vllm is not a dependency: usually absent
        return {"checked": False, "why": f"{type(exc).__name__}: {exc}"[:200]}
    differ = []
    for E, H, inter, k in shapes.values():
        for m in ms:
            ours, theirs = vllm_default_config(m, E, inter, H, k), get_default_config(m, E, inter, H, k, None)
            if any(theirs.get(key, value) != value for key, value in ours.items()):
                differ.append({"M": m, "E": E, "N": inter, "K": H, "ours": ours, "vllm": theirs})
    return {"checked": True, "differ": differ}


def make_inputs(T: int, E: int, H: int, inter: int, k: int, device: str) -> tuple[Any, ...]:
    import torch

    dt = torch.bfloat16
    x = torch.randn(T, H, device=device, dtype=dt)
    w13 = torch.randn(E, 2 * inter, H, device=device, dtype=dt) * H**-0.5
    w2 = torch.randn(E, H, inter, device=device, dtype=dt) * inter**-0.5
    tw, ti = torch.topk(torch.randn(T, E, device=device).softmax(-1), k)
    return x, w13, w2, tw, ti.to(torch.int32)


def torch_moe(x: Any, w13: Any, w2: Any, tw: Any, ti: Any) -> Any:
    """The PyTorch reference: per expert, gather its tokens, two cuBLAS GEMMs, scatter-add."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = (ti == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, tok, y.float() * tw[tok, slot, None])
    return out.to(x.dtype)


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int, int, int]]:
    return DRY_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",")}


def tune(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """The book-tuning driver: both GEMMs of every shape at each --tune-m, smallest M first."""
    import tunebook
    from tunebook.kernels.fused_moe import fused_moe

    done = []
    for m in sorted(int(v) for v in args.tune_m.split(",")):
        for name, (E, H, inter, k) in shapes(args).items():
            before, t0 = tunebook.stats(), time.perf_counter()
            fused_moe(*make_inputs(m, E, H, inter, k, device))
            row = {"shape": name, "M": m, "E": E, "H": H, "I": inter, "top_k": k}
            row["benchmarked"] = tunebook.stats()["benchmarked"] - before["benchmarked"]
            row["seconds"] = round(time.perf_counter() - t0, 2)
            done.append(row)
            print(f"tuned {name} M={m}: {row['benchmarked']} configs in {row['seconds']} s", flush=True)
    return done


def variants_for(args, m, E, H, inter, k, inputs, tables) -> dict[str, Any]:
    from tunebook.kernels._moe_align import _moe_align_torch
    from tunebook.kernels.fused_moe import fused_moe, moe_align, moe_align_size, vllm_default_config

    x, w13, w2, tw, ti = inputs
    default = vllm_default_config(m, E, inter, H, k)
    align = moe_align_size(m)
    out: dict[str, Any] = {
        "tunebook": Variant(lambda: fused_moe(x, w13, w2, tw, ti)),
        "vllm-default": Variant(lambda: fused_moe(x, w13, w2, tw, ti, config=default)),
        # the alignment step alone: what fused_moe runs, and its PyTorch version
        "align": Variant(lambda: moe_align(ti, E, align)),
        "align-torch": Variant(lambda: _moe_align_torch(ti, E, align)),
    }
    for device, table in sorted(tables.get((E, inter), {}).items()):
        cfg = nearest_entry(table, m)
        out[f"vllm:{device}"] = Variant(lambda c=cfg: fused_moe(x, w13, w2, tw, ti, config=c))
    mixed = tables.get((E, inter), {}).get(args.mix) if args.mix else None
    if mixed is not None:
        theirs = nearest_entry(mixed, m)
        g1, g2 = book_configs(lambda: fused_moe(x, w13, w2, tw, ti))
        pairs = {"tunebook-explicit": (g1, g2), f"tunebook-g1+{args.mix}-g2": (g1, theirs)}
        pairs[f"{args.mix}-g1+tunebook-g2"] = (theirs, g2)
        for name, pair in pairs.items():
            out[name] = Variant(lambda p=pair: fused_moe(x, w13, w2, tw, ti, config=p))
    if m <= args.torch_max_m:
        out["torch"] = Variant(lambda: torch_moe(x, w13, w2, tw, ti), graph=False)
    return out


def book_configs(call: Any) -> tuple[dict[str, int], dict[str, int]]:
    """The two GEMM configs ``call`` launches (the book's), as vLLM table entries."""
    import importlib

    moe = importlib.import_module("tunebook.kernels.fused_moe")  # the module: the package exports the op
    call()
    return tuple(  # type: ignore[return-value]
        {**k.best_config.kwargs, "num_warps": k.best_config.num_warps, "num_stages": k.best_config.num_stages}
        for k in (moe._moe_gemm1_kernel, moe._moe_gemm2_kernel)
    )


def measure(args: argparse.Namespace, device: str, tables: dict) -> list[dict[str, Any]]:
    import torch

    import tunebook
    from tunebook.kernels.fused_moe import fused_moe

    rows = []
    ms = [1, 3] if args.dry_run else [int(v) for v in args.m.split(",")]
    for name, (E, H, inter, k) in shapes(args).items():
        for m in ms:
            inputs = make_inputs(m, E, H, inter, k, device)
            fallbacks = tunebook.stats()["fallbacks"]
            ref = torch_moe(*inputs).float()
            err = (fused_moe(*inputs).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            row: dict[str, Any] = {
                "shape": name,
                "M": m,
                "E": E,
                "H": H,
                "I": inter,
                "top_k": k,
                "rel_err": err,
            }
            row["from_book"] = tunebook.stats()["fallbacks"] == fallbacks
            variants = variants_for(args, m, E, H, inter, k, inputs, tables)
            row["failed"] = drop_failing(variants)
            timings = time_variants(variants, repeats=2 if args.dry_run else args.repeats)
            flops = 2.0 * m * k * 3 * H * inter
            for v, t in timings.items():
                row[v] = {**t, "tflops": flops / (t["us"] * 1e-6) / 1e12}
            row["vs_vllm_default"] = timings["vllm-default"]["us"] / timings["tunebook"]["us"]
            rows.append(row)
            # one line a row as it lands: a run cut short by a time limit still says something
            us = {v: round(t["us"], 1) for v, t in timings.items()}
            print(name, m, us, row["failed"] or "", flush=True)
            del inputs
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def drop_failing(variants: dict[str, Any]) -> dict[str, str]:
    """Run each variant once; one that raises (another GPU's table entry this GPU's Triton
    cannot compile, e.g. a ROCm ``num_stages=0``) is dropped and its error returned, so one
    foreign config does not end the run."""
    failed = {}
    for name, variant in list(variants.items()):
        if not name.startswith("vllm:"):
            continue
        try:
            variant.fn()
        except Exception as exc:  # reported in the result, never silently
            failed[name] = f"{type(exc).__name__}: {exc}"[:300]
            del variants[name]
    return failed


def portability(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape and vLLM table: its time over the book's at every batch size measured, as
    the geometric mean, the worst, and the share of batch sizes where it loses more than 5%
    (> 1 means the table's config is slower than the book's on this GPU)."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        for table in sorted({v for r in mine for v in r if v.startswith("vllm:")}):
            ratios = [r[table]["us"] / r["tunebook"]["us"] for r in mine if table in r]
            if not ratios:
                continue
            out.append(
                {
                    "shape": shape,
                    "table": table.removeprefix("vllm:"),
                    "batches": len(ratios),
                    "geomean": round(statistics.geometric_mean(ratios), 3),
                    "worst": round(max(ratios), 3),
                    "best": round(min(ratios), 3),
                    "lose >5%": f"{sum(x > 1.05 for x in ratios)}/{len(ratios)}",
                }
            )
    return out


def dry_tables(directory: Path) -> Path:
    """A made-up vLLM table for the tiny dry-run shape, so the loader runs too."""
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "num_warps": 4}
    (directory / "E=4,N=40,device_name=FAKE_GPU.json").write_text(
        json.dumps({"1": cfg, "64": {**cfg, "BLOCK_SIZE_M": 64}, "triton_version": "3.6.0"})
    )
    (directory / "E=4,N=40,device_name=FAKE_GPU,dtype=fp8_w8a8.json").write_text("{}")
    return directory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, result = start(args)
    if args.tune:
        result["tuned"] = rows = tune(args, device)
        columns = ["shape", "M", "benchmarked", "seconds"]
        table_rows = rows
    else:
        table_dir = args.vllm_configs
        if args.dry_run and table_dir is None:
            table_dir = dry_tables(Path(tempfile.mkdtemp()))
        tables = load_vllm_tables(table_dir) if table_dir else {}
        if table_dir is not None and not tables:
            raise SystemExit(f"error: --vllm-configs {table_dir}: no 16-bit vLLM fused-MoE table in it")
        gpus = sorted({gpu for by_gpu in tables.values() for gpu in by_gpu})
        if args.mix and args.mix not in gpus:
            found = ", ".join(gpus)
            raise SystemExit(f"error: --mix {args.mix}: no table of that GPU in {table_dir}; found: {found}")
        ms = [1, 3] if args.dry_run else [int(v) for v in args.m.split(",")]
        result["vllm_rule_check"] = check_vllm_rule(shapes(args), ms)
        result["rows"] = rows = measure(args, device, tables)
        timed = {v for r in rows for v in r if isinstance(r[v], dict) and "us" in r[v]}
        names = sorted(timed, key=_variant_order)
        table_rows = [
            {"shape": r["shape"], "M": r["M"], **{v: f"{r[v]['us']:.1f}" for v in names if v in r}}
            | {"x vllm-default": f"{r['vs_vllm_default']:.2f}"}
            for r in rows
        ]
        columns = ["shape", "M", *names, "x vllm-default"]
        result["portability"] = portability(rows)
    write_result(args, "fused_moe", result)
    print("microseconds per call" if not args.tune else "tuning")
    print_table(table_rows, columns)
    if result.get("portability"):
        print("vLLM tables on this GPU, time / the book's (> 1: the table is slower)")
        print_table(result["portability"], list(result["portability"][0]))
    return 0


def _variant_order(name: str) -> tuple[int, str]:
    first = ["tunebook", "vllm-default", "torch", "align", "align-torch"]
    return (first.index(name), name) if name in first else (len(first), name)


if __name__ == "__main__":
    sys.exit(main())
