"""``python -m tunebook.kernels tune``: tune the pack's books for this GPU.

    python -m tunebook.kernels tune --out src/tunebook/kernels/books     # every op, model, token count
    python -m tunebook.kernels tune --out DIR --ops rms_norm --models llama-3-8b --tokens 1,64,8192
    python -m tunebook.kernels tune --out DIR --dry-run                  # list the keys, tune nothing
    python -m tunebook.kernels tune --out DIR --ops fused_moe --vllm-tables VLLM_CONFIGS_DIR

Each (op shape, token count, dtype) of the models in ``tunebook.kernels._models`` is called
once in ``tune`` mode with ``TUNEBOOK_DIR=--out``: every key the book lacks is tuned and
written there as it is measured, so an interrupted run resumes where it stopped. Copy the
resulting files into ``src/tunebook/kernels/books/`` to ship them. Token counts default to
each op's own: 1..8192 for the elementwise ops and the GEMMs (``linear``: each model's q/k/v,
attention-output and MLP projections; ``fused_moe``: Mixtral's experts at TP 1 and 2),
1, 16, 256 and 4096 for the cache write,
batch sizes 1, 16, 64 and 256 for decode attention (its context lengths, 512, 8192 and
32768, are part of its shapes; ``--contexts`` sets others), 8192 packed tokens for prefill
attention. The paged cache has 16-token blocks, as in the shipped books; ``--block-size``
tunes decode attention and prefill over a cached prefix for a server whose blocks differ
(the block size is part of their keys; the cache write's key has none):

    python -m tunebook.kernels tune --out DIR --ops paged_attention_decode,varlen_attention \
        --models llama-3-8b --block-size 64 --contexts 1024,4096
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Paged caches' blocks run from 1 token to 256 (vLLM's backends); past this, a benchmark
# shape's cache is mostly padding.
MOST_BLOCK_TOKENS = 1024


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tunebook.kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="tune the pack's kernels over model shapes into a book directory")
    tune.add_argument("--out", required=True, help="book directory to write (becomes TUNEBOOK_DIR)")
    tune.add_argument("--ops", default=None, help="comma-separated ops (default: all of them)")
    tune.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    tune.add_argument(
        "--tokens",
        default=None,
        help="comma-separated token counts (decode: batch sizes; default: each op's own)",
    )
    tune.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32 (default: bf16)")
    tune.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="your server's KV-cache block size (tokens a block), part of the keys of decode attention "
        "and of prefill over a cached prefix (default: 16, vLLM's, the block size of the shipped books)",
    )
    tune.add_argument(
        "--contexts",
        default=None,
        help="comma-separated context lengths for decode attention (default: 512,8192,32768)",
    )
    tune.add_argument(
        "--max-configs", type=int, default=None, help="configs measured per key (default: tunebook's, 10%%)"
    )
    tune.add_argument(
        "--no-shipped-books",
        action="store_true",
        help="tune every key into --out from nothing: the package's books, TUNEBOOK_PATH's and a "
        "fleet's Redis book are left out (as TUNEBOOK_KERNELS_SHIPPED_BOOKS=0 with both unset)",
    )
    tune.add_argument(
        "--vllm-tables",
        nargs="+",
        default=None,
        metavar="PATH",
        help="vLLM fused-MoE config files, or directories of them (vllm's fused_moe/configs), "
        "imported into --out before tuning: fused_moe measures this GPU's entry for each key first "
        "(other GPUs' entries too, as hints), and serve mode answers from this GPU's table "
        "(needs tunebook[cli])",
    )
    tune.add_argument("--dry-run", action="store_true", help="list the keys, tune nothing")
    args = parser.parse_args(argv)
    if args.max_configs is not None and args.max_configs < 1:
        parser.error(f"--max-configs: expected a positive integer; found {args.max_configs}")
    args.token_counts = _counts(parser, "--tokens", args.tokens, "token counts")  # None: each op's own
    args.context_lengths = _counts(parser, "--contexts", args.contexts, "context lengths")
    if args.block_size is not None and not 1 <= args.block_size <= MOST_BLOCK_TOKENS:
        parser.error(
            f"--block-size: expected 1 to {MOST_BLOCK_TOKENS} tokens a block; found {args.block_size}"
        )
    if not args.dry_run:
        from .._writable import writable_fix, write_problem

        problem = write_problem(Path(args.out))  # before tuning: its results need somewhere to go
        if problem:
            parser.error(
                f"--out: cannot write the book at {args.out} ({problem}), so tuning results would be "
                f"lost; {writable_fix(Path(args.out), 'choose a writable directory')}"
            )
    return args


def _counts(parser: argparse.ArgumentParser, flag: str, text: str | None, what: str) -> list[int] | None:
    """``"1,64"`` -> ``[1, 64]``; None where the flag is not given; a parser error (exit 2)
    for anything but positive integers."""
    if not text:
        return None
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers; found {text!r}")
    if any(n < 1 for n in counts):
        parser.error(f"{flag}: expected positive {what}; found {text}")
    return counts


def _check_cache_flags(args: argparse.Namespace, ops: Sequence[str]) -> None:
    """--contexts and --block-size apply to some ops only: given without one of them, they
    would change nothing, silently."""
    if args.context_lengths and "paged_attention_decode" not in ops:
        raise ValueError(
            "--contexts sets decode attention's context lengths, and --ops has no paged_attention_decode"
        )
    if args.block_size and not {"paged_attention_decode", "varlen_attention"} & set(ops):
        raise ValueError(
            "--block-size is part of the keys of paged_attention_decode and varlen_attention (over a "
            "cached prefix), and --ops has neither"
        )


def _import_tables(paths: Sequence[str], out: str, dry_run: bool) -> None:
    """``tunebook import --format vllm --kernel vllm.fused_moe --skip-unsupported`` into ``out``
    (with ``dry_run``, only the count of files it would read)."""
    from .._optional import require

    require("click", feature="--vllm-tables (importing vLLM's tables)", extra="cli")
    from ..cli.import_vllm import command, table_files
    from .fused_moe import VLLM_TABLES

    try:
        files = table_files([Path(p) for p in paths])
    except ValueError as exc:
        raise ValueError(f"--vllm-tables: {exc}") from None
    if dry_run:
        print(f"would import {len(files)} vLLM table file(s) into {out}")
        return
    command.main(
        ["--format", "vllm", "--kernel", VLLM_TABLES, "-o", out, "--skip-unsupported", *map(str, files)],
        prog_name="tunebook import",
        standalone_mode=False,
    )


def _budget_now() -> int | None:
    """The budget the pack's kernels were decorated with (the environment they saw)."""
    from . import _common

    return _common.max_configs()


def _interpreter_flags() -> list[str]:
    """This interpreter's own options (``-X dev``, ``-W ...``, ``-u``) for the re-exec: what
    ``sys.orig_argv`` holds before ``-m``."""
    orig = list(getattr(sys, "orig_argv", []))
    return orig[1 : orig.index("-m")] if "-m" in orig else []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["TUNEBOOK_DIR"] = os.path.abspath(args.out)
    os.environ["TUNEBOOK_MODE"] = "tune"
    if args.no_shipped_books:  # read when each kernel's book is first opened: set here in time
        os.environ["TUNEBOOK_KERNELS_SHIPPED_BOOKS"] = "0"
        for name in ("TUNEBOOK_PATH", "TUNEBOOK_REDIS_URL"):
            os.environ.pop(name, None)
    if args.max_configs is not None and args.max_configs != _budget_now():
        # The budget is fixed when the kernels are decorated, and `python -m` imported the
        # package (and decorated them) before this ran: start again with it set.
        os.environ["TUNEBOOK_KERNELS_MAX_CONFIGS"] = str(args.max_configs)
        if argv is not None:  # called in-process: exec would replace the caller's process
            print(
                "error: --max-configs must be set before the pack is imported: run `python -m "
                "tunebook.kernels tune ...`, or set TUNEBOOK_KERNELS_MAX_CONFIGS before importing it",
                file=sys.stderr,
            )
            return 2
        os.execv(
            sys.executable, [sys.executable, *_interpreter_flags(), "-m", "tunebook.kernels", *sys.argv[1:]]
        )

    import torch

    import tunebook

    from .._compat import interpreting
    from . import _models

    try:
        unknown = [d for d in args.dtypes.split(",") if d not in _models.DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) {', '.join(unknown)}; known: {', '.join(_models.DTYPES)}")
        dtypes = [_models.DTYPES[d] for d in args.dtypes.split(",")]
        ops = args.ops.split(",") if args.ops else list(_models.OPS)
        _check_cache_flags(args, ops)
        jobs = _models.plan(
            ops,
            _models.select_models(args.models),
            args.token_counts,
            dtypes,
            block_size=args.block_size or _models.PAGE,
            contexts=args.context_lengths,
        )
        if not jobs and not args.vllm_tables:  # with tables alone, the import is the job
            why = f"--ops {','.join(ops)} has no shape on these models at these token counts"
            if "paged_attention_decode" in ops:
                why += (
                    f" (decode attention takes at most {_models.DECODE_MAX_TOKENS:,} cached tokens a call, "
                    "sequences x context in whole blocks: lower --contexts, --tokens or --block-size)"
                )
            raise ValueError(f"no calls to tune: {why}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreting() and not args.dry_run:
        print("error: no GPU; set TRITON_INTERPRET=1 to tune for Triton's CPU interpreter", file=sys.stderr)
        return 2
    if args.vllm_tables:
        try:
            _import_tables(args.vllm_tables, os.environ["TUNEBOOK_DIR"], args.dry_run)
        except Exception as exc:  # a bad path or file, or click missing: said, nothing tuned
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from . import _common

    budget = _common.max_configs()
    shipped = "used" if _common.shipped_books() else "left out"
    per_key = f"{budget} configs a key" if budget else "tunebook's default"
    print(
        f"{len(jobs)} calls on {device} into {os.environ['TUNEBOOK_DIR']} "
        f"(shipped books: {shipped}; budget: {per_key})",
        flush=True,
    )
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        if args.dry_run:
            print(f"  {job.op} {dict(job.shape)} tokens={job.tokens} {job.dtype}  ({', '.join(job.models)})")
            continue
        w = job.build(device)  # one at a time: the largest inputs take ~0.5 GB
        before = tunebook.stats()["benchmarked"]
        w.run(None)
        if device == "cuda":
            torch.cuda.synchronize()
        measured = tunebook.stats()["benchmarked"] - before
        elapsed = time.perf_counter() - start
        print(f"[{i}/{len(jobs)} {elapsed:7.1f}s] {w.label}: {measured} configs measured", flush=True)
        del w
    if args.dry_run:
        return 0
    stats = tunebook.stats()
    print(
        f"done: {stats['benchmarked']} configs measured, {stats['book_hits']} keys already in the book, "
        f"{stats['tuning_seconds']:.1f} s tuning"
    )
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # inside the try: Python's own flush at exit would raise outside it
        sys.exit(code)
    except BrokenPipeError:  # `--dry-run | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush too
        sys.exit(0)
