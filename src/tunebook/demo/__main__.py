"""Tune a GEMM in one process, run it again in a new one, show that nothing was re-benchmarked.

    python -m tunebook.demo [--book DIR]

Without --book the book is a temporary directory, removed when the demo ends.

On a machine without a GPU the kernels run in Triton's CPU interpreter
(TRITON_INTERPRET=1 is set for you); on a GPU they run as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        sys.exit(
            "The demo needs PyTorch: pip install torch (on a CPU-only machine: pip install torch==2.13.0)"
        )
    return bool(torch.cuda.is_available())


def _child() -> None:
    """One process: call the tuned GEMM once, report what it cost."""
    import torch

    import tunebook
    from tunebook.demo.matmul import _matmul_kernel, gemm_configs, matmul, small_configs

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        configs = gemm_configs(block_m=(64, 128), block_n=(64, 128), block_k=(64,), stages=(3, 4), warps=(4,))
        size, dtype, device = (2048, 2048, 2048), torch.float16, "cuda"
    else:
        configs, size, dtype, device = small_configs(), (64, 48, 32), torch.float32, "cpu"
    kernel = tunebook.autotune(configs, key=["M", "N", "K"])(_matmul_kernel)
    M, N, K = size
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    b = torch.randn(K, N, device=device, dtype=dtype, generator=g)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    c = matmul(kernel, a, b)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = (a.float() @ b.float()).to(dtype)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    error = float(((c.float() - ref.float()).norm() / ref.float().norm()).item())
    print(
        json.dumps(
            {
                **tunebook.stats(),
                "seconds": seconds,
                "configs": len(configs),
                "winner": " ".join(f"{k}={v}" for k, v in kernel.best_config.kwargs.items())
                + f" num_warps={kernel.best_config.num_warps} num_stages={kernel.best_config.num_stages}",
                "error": error,
                "correct": error < tol,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunebook.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--book", help="book directory to use (default: a new temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child()
        return 0
    if args.book is not None and not args.book.strip():  # an unset $BOOK: it read the current directory
        parser.error("--book: expected a directory; found an empty value")
    book = Path(args.book) if args.book is not None else None

    on_gpu = _has_gpu()
    if book is not None:
        from tunebook._writable import write_problem

        problem = write_problem(book)  # the second process must find what the first wrote
        if problem is not None:
            parser.error(
                f"--book: cannot write the book at {book} ({problem}), so the second process "
                "would have nothing to remember; pass a writable directory (created if missing), or "
                "leave --book out for a temporary one"
            )
    try:
        if book is not None:
            return _demo(book, on_gpu, kept=True)
        with tempfile.TemporaryDirectory(prefix="tunebook-demo-") as tmp:
            return _demo(Path(tmp), on_gpu, kept=False)
    except KeyboardInterrupt:  # Ctrl-C: one line (a temporary book is removed all the same)
        print("\npython -m tunebook.demo: interrupted", file=sys.stderr)
        return 130


def _demo(book: Path, on_gpu: bool, kept: bool) -> int:
    """Tune in one process, remember in a second; 0 when the second benchmarked nothing."""
    import triton

    env = dict(os.environ)
    if not on_gpu:
        env["TRITON_INTERPRET"] = "1"
    env["TUNEBOOK_DIR"] = str(book)
    # The demo shows tuning then remembering: a TUNEBOOK_MODE of the person's shell (serve,
    # off, a typo) made it report "UNEXPECTED" with no reason, or a child's traceback.
    env["TUNEBOOK_MODE"] = "tune"
    where = "GPU" if on_gpu else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    what = "" if kept else " (temporary: removed at the end; --book DIR keeps one)"
    print(f"tunebook demo on {where}; triton {triton.__version__}; book: {book}{what}")

    runs = []
    warned: list[str] = []  # the children's warnings (a book they could not write, ...)
    for label in ("process 1 (tunes)", "process 2 (remembers)"):
        print(f"  running {label} ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "tunebook.demo", "--child"], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            print(f"{label} failed (exit code {proc.returncode}); its error output is above.")
            return 1
        runs.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
        warned += [w for w in proc.stderr.splitlines() if "Warning: " in w and w not in warned]

    print()
    print(f"  {'':24}{'benchmarked':>14}{'first call':>13}  {'correct':8}winner")
    for label, r in runs:
        print(
            f"  {label:24}{r['benchmarked']:>6} of {r['configs']:<6}{r['seconds']:>11.3f} s  "
            f"{'yes' if r['correct'] else 'NO':8}{r['winner']}"
        )
    from tunebook._book import read_document
    from tunebook._book.pagedir import name_ids

    # A page: a directory with a file per key (book format 2), or an older page's one file;
    # named as tunebook names pages, so that a --book holding other files lists only its pages.
    named = [p for p in book.iterdir() if name_ids(p.name.removesuffix(".json"))] if book.is_dir() else []
    pages = sorted(p for p in named if p.is_dir() or p.suffix == ".json")
    print(f"\n  the book: {len(pages)} page(s) in {book}")
    for page in pages:
        doc = read_document(page)
        if doc is not None:
            measured = sum(len(e.results) for e in doc.entries.values())
            print(f"    {page.name}: {len(doc.entries)} key(s), {measured} measured config(s)")
    second = runs[1][1]
    ok = second["benchmarked"] == 0 and second["book_hits"] == 1 and all(r["correct"] for _, r in runs)
    print(
        "\n  "
        + (
            "OK: the second process benchmarked nothing and ran the remembered winner."
            if ok
            else "UNEXPECTED: see the table above" + ("; the processes warned:" if warned else ".")
        )
    )
    if not ok:  # the reason is usually in what the children warned about
        for line in warned:
            print(f"  {line.split('Warning: ', 1)[-1]}")
    if not kept:
        print(f"  (the temporary book {book} is removed now; run with --book DIR to keep it)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
