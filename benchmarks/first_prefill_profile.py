"""Where a fresh process's first prefill goes: cProfile of the Triton-only engine's first
request (one token: the prefill only), on SmolLM2-135M's shapes (``--model``) with random
weights, in ``serve`` mode with the shipped books (``--ops triton``) or with fixed configs
(``--ops fixed``). Issue 14's first token: run each twice, the second with Triton's compile
cache warm.

    python benchmarks/first_prefill_profile.py --ops triton --out DIR
    python benchmarks/first_prefill_profile.py --ops fixed --out DIR
    python benchmarks/first_prefill_profile.py --interpret --layers 1 --prompt 2 --out DIR  # CPU

Prints the first prefill's seconds, then the top entries by cumulative and by own time, and
tunebook's own frames by cumulative time; writes DIR/first_prefill_profile-<ops>.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import _harness as harness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_out_argument(p)
    p.add_argument("--ops", choices=("triton", "fixed"), default="triton")
    p.add_argument("--model", default="smollm2-135m", help="a preset's shapes, random weights")
    p.add_argument("--layers", type=int, default=None, help="keep only the first layers")
    p.add_argument("--prompt", type=int, default=40, help="prompt tokens")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--interpret", action="store_true", help="CPU: Triton's interpreter")
    args = p.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TUNEBOOK_MODE", "serve")
    out = harness.out_dir(args.out)

    import torch

    from tunebook.demo.llm.engine import Engine, default_device, default_dtype
    from tunebook.demo.llm.loading import load_model
    from tunebook.demo.llm.sampling import SamplingParams

    device = default_device()
    loaded = load_model(
        "smollm2-135m", random=True, layers=args.layers, dtype=default_dtype(device), device=device
    )
    engine = Engine(
        loaded.weights, loaded.tokenizer, ops=args.ops, max_batch=1, max_model_len=512, cache_tokens=512
    )
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    engine.submit(list(range(args.prompt)), SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.step():
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    profile.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top // 2)
    # The library's own frames (the autotuner, hit table, policy, book): the decision path's
    # share, which the lists above may not reach when kernel time dominates (on the CPU the
    # interpreter's frames fill them).
    print("tunebook's own frames (src/tunebook/_*):", file=text)
    stats.sort_stats("cumulative").print_stats(r"tunebook[/\\]_", args.top // 2)
    header = harness.header_line(harness.platform_header(interpret=args.interpret))
    report = f"{header}\n{args.ops}: first prefill {seconds:.3f} s\n{text.getvalue()}"
    (out / f"first_prefill_profile-{args.ops}.txt").write_text(report)
    print(report[:6000])
    print(f"{args.ops}: first prefill {seconds:.3f} s (under the profiler)")


if __name__ == "__main__":
    main()
