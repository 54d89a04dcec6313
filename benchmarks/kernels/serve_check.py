"""Does a fresh process answer every shipped key from the books, with zero benchmarking?

Calls every op of the pack on the shapes and token counts the shipped books were tuned
for (books/README.md), in ``TUNEBOOK_MODE=serve`` with an empty ``TUNEBOOK_DIR``, so only
the read-only books inside the package can answer; prints, per op, the calls made, the
configs benchmarked, the fallbacks and the keys answered from the book, then the calls the
books did not answer, each with its shape and token count (what to tune next; all of them
are in ``serve_check.json``). On the GPU the books were tuned on, benchmarked and fallbacks
must both be 0.

    python benchmarks/kernels/serve_check.py [--out DIR] [--dry-run]
    python benchmarks/kernels/serve_check.py --moe-shapes mixtral-8x7b-tp2 --tables VLLM_BOOK
    python benchmarks/kernels/serve_check.py --linear-models llama-3-8b,qwen2.5-7b   # more linear books

``--tables DIR`` adds a book of imported tables (``tunebook import --format vllm --kernel
vllm.fused_moe -o DIR ...``) as a read-only layer: fused_moe keys the shipped books lack are
then answered by this GPU's vLLM table, counted as "table answers" (keys). Such a launch is
also a fallback (its config was not measured here), so with tables the fallbacks column is
not 0: read the tables column and the calls not answered, each of which says how many of
its keys a table answered. A DIR holding no table of this GPU is an error.

``--dry-run`` runs the same calls on the CPU interpreter on tiny shapes (no shipped book
matches that platform: everything falls back; it checks the script, not the books).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from _timing import NO_GPU, results_dir, scratch_book

TOKENS = (1, 16, 256, 4096)
ELEMENTWISE_MODELS = "llama-3-8b,smollm2-135m"
# The attention ops at their own default token counts and shapes (tunebook.kernels._models:
# decode batches 1, 16, 64, 256 x contexts 512, 8k, 32k; prefill 8192 packed tokens; cache
# writes of 1 to 4096 tokens), by default on every head layout of the pack's models
# (Mixtral shares Llama-3-8B's); --attention-models narrows it to the layouts shipped.
ATTENTION_OPS = ("reshape_and_cache", "paged_attention_decode", "varlen_attention")
ATTENTION_MODELS = "llama-3-8b,llama-3-70b-tp4,llama-3-70b-tp8,qwen2.5-7b,smollm2-135m"
DRY_ATTENTION = {  # tiny shapes for the interpreter
    "reshape_and_cache": ({"n_kv": 1, "head_size": 16, "page": 16}, 3),
    "paged_attention_decode": ({"n_q": 2, "n_kv": 1, "head_size": 16, "page": 16, "context": 40}, 2),
    "varlen_attention": ({"n_q": 2, "n_kv": 1, "head_size": 16, "seqlen": 20, "prefix": 18}, 24),
}
# linear: the models whose projections the shipped books hold at TOKENS (--linear-models widens it)
LINEAR_MODELS = "llama-3-8b"
MOE_SHAPES = {  # experts, hidden, intermediate (per GPU), top-k
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "mixtral-8x7b-tp2": (8, 4096, 7168, 2),
}


def calls(
    dry_run: bool,
    device: str,
    attention_models: str = ATTENTION_MODELS,
    moe_shapes: str = "mixtral-8x7b",
    linear_models: str = LINEAR_MODELS,
) -> list[tuple[str, str, Any]]:
    """(op, what the call is, a no-argument call) for every shipped key."""
    import torch

    from tunebook.kernels import _models
    from tunebook.kernels.fused_moe import fused_moe
    from tunebook.kernels.linear import linear

    tokens = (1, 3) if dry_run else TOKENS
    models = _models.select_models("smollm2-135m" if dry_run else ELEMENTWISE_MODELS)
    out: list[tuple[str, str, Any]] = []
    for planned in _models.plan(("rms_norm", "silu_and_mul", "rotary_embedding"), models, tokens):
        work = planned.build(device)
        out.append((planned.op, _label(planned), lambda w=work: w.run(None)))
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    if dry_run:
        for m in tokens:
            x, w = randn(m, 24), randn(40, 24) * 24**-0.5
            out.append(("linear", f"M={m} N=40 K=24", lambda x=x, w=w: linear(x, w)))
    else:  # the tune command's shapes (tunebook.kernels._models), one call built at a time
        for planned in _models.plan(("linear",), _models.select_models(linear_models), tokens):
            label = f"M={planned.tokens} {dict(planned.shape)}"
            out.append(("linear", label, lambda p=planned: p.build(device).run(None)))
    moe = [(4, 24, 40, 2)] if dry_run else [MOE_SHAPES[name] for name in moe_shapes.split(",")]
    for e, h, inter, top_k in moe:
        for m in tokens:
            x, w13, w2 = randn(m, h), randn(e, 2 * inter, h) * h**-0.5, randn(e, h, inter) * inter**-0.5
            weights, ids = torch.topk(torch.randn(m, e, generator=g).softmax(-1), top_k)
            args = (x, w13, w2, weights.to(device), ids.to(device))
            label = f"M={m} E={e} hidden={h} inter={inter} top-{top_k}"
            out.append(("fused_moe", label, lambda a=args: fused_moe(*a)))
    # Built when called, one at a time: a decode workload's cache takes up to 8.6 GB.
    if dry_run:
        for op, (shape, n) in DRY_ATTENTION.items():
            out.append(
                (
                    op,
                    f"{shape} tokens={n}",
                    lambda op=op, shape=shape, n=n: _models.workload(
                        op, shape, n, torch.bfloat16, device
                    ).run(None),
                )
            )
    else:
        for planned in _models.plan(ATTENTION_OPS, _models.select_models(attention_models)):
            out.append((planned.op, _label(planned), lambda p=planned: p.build(device).run(None)))
    return out


def _label(planned: Any) -> str:
    return f"{dict(planned.shape)} tokens={planned.tokens} {str(planned.dtype).removeprefix('torch.')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes")
    p.add_argument("--attention-models", default=ATTENTION_MODELS, help="head layouts of the attention ops")
    p.add_argument("--linear-models", default=LINEAR_MODELS, help="models whose projections are called")
    p.add_argument(
        "--moe-shapes",
        default="mixtral-8x7b",
        help="comma-separated: " + ", ".join(MOE_SHAPES) + " (a dry run uses a tiny one)",
    )
    p.add_argument("--tables", type=Path, help="a book of imported tables (vllm.fused_moe), read-only")
    args = p.parse_args(argv)
    results_dir(p, args.out)
    os.environ["TUNEBOOK_MODE"] = "serve"
    os.environ["TUNEBOOK_DIR"] = scratch_book("tunebook-serve-check-")  # empty: books only
    os.environ.pop("TUNEBOOK_PATH", None)
    os.environ.pop("TUNEBOOK_REDIS_URL", None)
    os.environ.pop("TUNEBOOK_KERNELS_SHIPPED_BOOKS", None)  # the shipped books are what is checked
    unknown = [name for name in args.moe_shapes.split(",") if name not in MOE_SHAPES]
    if unknown:
        p.error(f"--moe-shapes: unknown {', '.join(unknown)}; choose from {', '.join(MOE_SHAPES)}")
    if args.tables is not None:
        os.environ["TUNEBOOK_PATH"] = str(args.tables.resolve())
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import tunebook
    from tunebook.kernels import _models  # after TRITON_INTERPRET: the ops are decorated on import

    for option, names in (
        ("--linear-models", args.linear_models),
        ("--attention-models", args.attention_models),
    ):
        try:
            _models.select_models(names)
        except ValueError as exc:
            p.error(f"{option}: {exc}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(NO_GPU)
    device = "cuda" if not args.dry_run else "cpu"
    tables_here = _tables_of_this_gpu(p, args.tables) if args.tables is not None else 0
    rows: dict[str, dict[str, Any]] = {}
    for op, label, call in calls(
        args.dry_run, device, args.attention_models, args.moe_shapes, args.linear_models
    ):
        before = tunebook.stats()
        call()
        after = tunebook.stats()
        row = rows.setdefault(
            op,
            {
                "op": op,
                "calls": 0,
                "benchmarked": 0,
                "fallbacks": 0,
                "book_hits": 0,
                "table_answers": 0,
                "not_answered": [],
            },
        )
        row["calls"] += 1
        for name in ("benchmarked", "fallbacks", "book_hits", "table_answers"):
            row[name] += int(after[name] - before[name])
        if after["fallbacks"] > before["fallbacks"] or after["benchmarked"] > before["benchmarked"]:
            row["not_answered"].append(label)  # which key a book lacks: what to tune next
            answered = int(after["table_answers"] - before["table_answers"])
            if answered:
                row["not_answered"][-1] += f" (imported tables answered {answered} of its keys)"
    if device == "cuda":
        torch.cuda.synchronize()
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "rows": list(rows.values()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_check.json").write_text(json.dumps(result, indent=1))
    layers = (
        f"books and {tables_here} imported table pages of this GPU"
        if args.tables is not None
        else "books only"
    )
    print(f"serve mode, {layers}, {result['device']}:")
    print(
        f"{'op':24s} {'calls':>6s} {'benchmarked':>12s} {'fallbacks':>10s} {'book hits':>10s} {'tables':>7s}"
    )
    for r in rows.values():
        counts = f"{r['calls']:6d} {r['benchmarked']:12d} {r['fallbacks']:10d} {r['book_hits']:10d}"
        counts += f" {r['table_answers']:7d}"
        print(f"{r['op']:24s} {counts}")
    missing = [(r["op"], label) for r in rows.values() for label in r["not_answered"]]
    if missing:
        print(f"not answered by the books ({len(missing)} calls; all listed in serve_check.json):")
        for op, label in missing[:20]:
            print(f"  {op} {label}")
    return 0


def _tables_of_this_gpu(parser: argparse.ArgumentParser, directory: Path) -> int:
    """How many pages of ``directory`` fused_moe would read as this GPU's tables; an error
    (naming what the directory holds) where there are none: a typo must not read as "the
    tables answer nothing"."""
    import tunebook
    from tunebook import _compat, _tables
    from tunebook.kernels.fused_moe import VLLM_TABLES

    reader = tunebook.Tables(VLLM_TABLES, key=lambda key: None, config=lambda entry: None)
    pages = _tables.load(reader, [directory]) if directory.is_dir() else []
    device = str(_compat.device_identity()["device"])
    here = [page for page in pages if _tables.same_device(page.device, device)]
    if not here:
        found = sorted({page.device for page in pages}) or ["nothing"]
        parser.error(
            f"--tables {directory}: no table imported as {VLLM_TABLES} for this GPU ({device}); found "
            f"{', '.join(found)}. Import vLLM's files with `tunebook import --format vllm --kernel "
            f"{VLLM_TABLES} -o {directory} FILES`"
        )
    return len(here)


if __name__ == "__main__":
    sys.exit(main())
