"""Issue 11: real libraries, unmodified, under ``tunebook.patch()``: the first call of each op
in a second process, against the first process and against Triton's own ``cache_results``.

For each library (fla-core, Liger-Kernel) and each variant, two fresh processes run the
same ops on the same inputs, timing each op's first call (compile, tuning and run, with
the GPU synchronized); each variant has its own Triton compile cache (cold in process 1,
warm in process 2) and tunebook its own book:

* ``tunebook`` — ``tunebook.patch()`` before the library is imported: process 1 tunes
  and writes the book, process 2 must benchmark 0 configs and give identical outputs;
* ``triton-cache`` — Triton's autotuner with its on-disk cache of timings on for every
  kernel (``TRITON_CACHE_AUTOTUNING=1``; fla-core passes ``cache_results=True`` itself);
* ``triton`` — Triton's autotuner without that cache (fla: ``FLA_CACHE_RESULTS=0``):
  every process tunes again.

    python benchmarks/adoption.py [--out DIR] [--library fla liger] [--variants ...]
    python benchmarks/adoption.py --interpret --out /tmp/adoption   # CPU mode, ~1 min

Needs one CUDA GPU and the libraries installed (``pip install fla-core==0.6.0
liger-kernel==0.8.5``; both pure Python). Prints one table per library last; writes
DIR/adoption.json (default $OUT or ./bench-out). ``--interpret`` runs the flow on the CPU
through Triton's interpreter with tiny shapes and the ops that run there (no GatedDeltaNet,
no fused MoE); there Triton's variants time with a host clock (Triton's own timer needs a
GPU) and Triton's results cache is off (its interpreter does not support it): it checks
the script, its timings are stand-ins. Last, the host time a call of a remembered key
costs each kind of autotuner, with a launch that does nothing (Python overhead only; a
measurement in CPU mode too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as harness

VARIANTS = ("tunebook", "triton-cache", "triton")
LIBRARIES = ("fla", "liger")


# ---------------------------------------------------------------------------- the ops


def fla_ops(cpu: bool) -> dict[str, Callable[[], Any]]:
    import torch
    from fla.modules.l2norm import l2norm_fwd
    from fla.modules.layernorm import rms_norm
    from fla.ops.utils.cumsum import chunk_local_cumsum

    dev = harness.device()
    dtype = torch.float32 if cpu else torch.bfloat16
    tokens, dim = (32, 64) if cpu else (8192, 4096)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=dev, dtype=dtype)

    ops: dict[str, Callable[[], Any]] = {
        "l2norm_fwd": lambda: l2norm_fwd(randn(tokens, 128 if not cpu else 64)),
        "rms_norm": lambda: rms_norm(randn(tokens, dim), randn(dim), None),
        "chunk_local_cumsum": lambda: chunk_local_cumsum(
            torch.randn(1, tokens, 4 if cpu else 16, device=dev), chunk_size=16 if cpu else 64
        ),
    }
    if not cpu:  # GatedDeltaNet's chunked forward: many autotuned kernels, fla's subclass among them
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def gated_delta_rule() -> Any:
            b, t, h, k = 1, 4096, 16, 128
            q, v = randn(b, t, h, k), randn(b, t, h, k)
            key = torch.nn.functional.normalize(randn(b, t, h, k).float(), dim=-1).to(dtype)
            g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev))
            beta = torch.rand(b, t, h, device=dev, dtype=dtype)
            return chunk_gated_delta_rule(q, key, v, g, beta, output_final_state=True)

        ops["chunk_gated_delta_rule"] = gated_delta_rule
    return ops


def liger_ops(cpu: bool) -> dict[str, Callable[[], Any]]:
    import torch
    from liger_kernel.ops.experimental.mm_int8int2 import matmul

    dev = harness.device()
    m, k, n = (16, 512, 32) if cpu else (4096, 4096, 4096)
    ops: dict[str, Callable[[], Any]] = {
        "mm_int8int2": lambda: matmul(
            torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev),
            torch.randint(0, 255, (k // 4, n), dtype=torch.uint8, device=dev),
        )
    }
    if not cpu:  # the fused MoE forward: three autotuned kernels (grouped GEMMs, a gather)
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        def fused_moe() -> Any:
            tokens, hidden, inter, experts, top_k = 4096, 2048, 1024, 8, 2
            x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
            gate_up = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
            down = torch.randn(experts, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02
            scores = torch.randn(tokens, experts, device=dev)
            weights, index = torch.topk(torch.softmax(scores, -1), top_k)
            return LigerFusedMoEFunction.apply(x, gate_up, down, index.int(), weights.to(torch.bfloat16))

        ops["fused_moe"] = fused_moe
    return ops


# ---------------------------------------------------------------------------- one process


def child(library: str, variant: str, outputs: Path) -> None:
    """Run the library's ops once each, first calls timed; print one JSON object."""
    import torch

    cpu = harness.interpreting()
    triton_benchmarked = [0]
    if variant == "tunebook":
        import tunebook

        tunebook.patch()
    else:
        _count_tritons_tuning(triton_benchmarked, cpu)
    import_start = time.perf_counter()
    ops = fla_ops(cpu) if library == "fla" else liger_ops(cpu)
    import_seconds = time.perf_counter() - import_start
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, op in ops.items():
        torch.manual_seed(0)
        harness.synchronize()
        start = time.perf_counter()
        results[name] = op()
        harness.synchronize()
        seconds[name] = time.perf_counter() - start
    torch.save(_to_cpu(results), outputs)
    report: dict[str, Any] = {
        "seconds": seconds,
        "import_seconds": import_seconds,
        "triton_benchmarked": triton_benchmarked[0],
    }
    if variant == "tunebook":
        import tunebook

        report["stats"] = tunebook.stats()
    print(json.dumps(report))


def _count_tritons_tuning(counter: list[int], cpu: bool) -> None:
    """Count the configs Triton's own autotuner times (its ``_bench``); in CPU mode, give it
    the host clock its interpreter lacks."""
    from triton.runtime.autotuner import Autotuner

    bench = Autotuner._bench

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return bench(self, *args, **kwargs)

    Autotuner._bench = counted
    if cpu:  # one timed run a config: CPU mode checks the flow, its timings are stand-ins anyway
        import functools

        from tunebook._bench import wallclock_bench

        clock = functools.partial(wallclock_bench, min_reps=1, max_reps=1)
        Autotuner.do_bench = property(lambda self: clock)


def _to_cpu(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu()
    if isinstance(value, tuple | list):
        return [_to_cpu(v) for v in value]
    return value


# ---------------------------------------------------------------------------- host time a call


def host_overhead() -> None:
    """Microseconds of host time per call of a remembered key, on a kernel whose launch does
    nothing (Python overhead only, the same on any machine class): Triton's autotuner and a
    subclass of it; tunebook's decorated autotuner; both of Triton's, adopted by the patch."""
    import timeit

    import torch
    import triton
    from triton.runtime.autotuner import Autotuner

    import tunebook

    def body(x: Any, n: int, BLOCK: int) -> None:
        pass

    class NoOp:  # a jit function as an autotuner sees one; its launch does nothing
        arg_names = ["x", "n", "BLOCK"]
        fn = staticmethod(body)

        def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            return None

    class Subclass(Autotuner):  # as fla-core's CachedAutotuner: its own run, then Triton's
        def run(self, *args: Any, **kwargs: Any) -> Any:
            return super().run(*args, **kwargs)

    kernel = NoOp()
    configs = [triton.Config({"BLOCK": b}) for b in (32, 64)]

    def bench(kernel_call: Any, quantiles: Any = None) -> list[float]:
        return [1.0, 1.0, 1.0]

    def triton_autotuner(cls: type) -> Any:
        return cls(kernel, kernel.arg_names, configs, ["n"], None, None, do_bench=bench)

    x = torch.empty(4)

    def per_call(tuner: Any) -> float:
        launch = tuner[(1,)]
        launch(x, 8)  # the key is decided here
        calls = 20000
        return min(timeit.repeat(lambda: launch(x, 8), number=calls, repeat=5)) / calls * 1e6

    us = {
        "triton": per_call(triton_autotuner(Autotuner)),
        "triton subclass": per_call(triton_autotuner(Subclass)),
        "tunebook decorated": per_call(tunebook.autotune(configs, key=["n"], do_bench=bench)(kernel)),
    }
    tunebook.patch()
    us["triton, adopted"] = per_call(triton_autotuner(Autotuner))
    us["triton subclass, adopted"] = per_call(triton_autotuner(Subclass))
    print(json.dumps(us))


# ---------------------------------------------------------------------------- the run


def variant_env(variant: str, interpret: bool, scratch: Path) -> dict[str, str]:
    cache = {"TRITON_CACHE_AUTOTUNING": None, "FLA_CACHE_RESULTS": "0"}
    if variant == "triton-cache":
        cache = {"TRITON_CACHE_AUTOTUNING": "1", "FLA_CACHE_RESULTS": "1"}
    if interpret:  # Triton's interpreter cannot use Triton's results cache (Triton 3.4 fails there)
        cache = {"TRITON_CACHE_AUTOTUNING": None, "FLA_CACHE_RESULTS": "0"}
    if variant == "tunebook":
        cache["FLA_CACHE_RESULTS"] = "1"  # fla's default; tunebook accepts and subsumes it
    return harness.child_env(interpret=interpret, scratch=scratch, TUNEBOOK_PATCH=None, **cache)


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Whether two processes' outputs are identical, op by op, and their largest difference."""
    import torch

    left, right = torch.load(a), torch.load(b)
    out = {}
    for name in left:
        pairs = list(zip(_tensors(left[name]), _tensors(right[name])))
        identical = all(torch.equal(x, y) for x, y in pairs)
        diff = max((float((x.double() - y.double()).abs().max()) for x, y in pairs if x.numel()), default=0.0)
        out[name] = {"identical": identical, "max_abs_diff": diff}
    return out


def _tensors(value: Any) -> list[Any]:
    if hasattr(value, "dtype"):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, list | tuple) else []


def run_library(library: str, variants: list[str], interpret: bool, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        scratch = work / library / variant
        scratch.mkdir(parents=True)
        env = variant_env(variant, interpret, scratch)
        runs[variant] = []
        for process in (1, 2):
            outputs = scratch / f"outputs-{process}.pt"
            argv = [__file__, "--child", library, variant, str(outputs)]
            r = harness.run_child(argv, env=env, timeout=3600)
            r["outputs"] = str(outputs)
            runs[variant].append(r)
            benchmarked = r.get("stats", {}).get("benchmarked", r["triton_benchmarked"])
            print(
                f"[{library} {variant} process {process}] "
                + ", ".join(f"{op} {s:.2f} s" for op, s in r["seconds"].items())
                + f"; configs benchmarked: {benchmarked}",
                flush=True,
            )
    checks: dict[str, Any] = {}
    if "tunebook" in runs:
        tb = runs["tunebook"]
        checks["tunebook_process_2_vs_1"] = compare(Path(tb[1]["outputs"]), Path(tb[0]["outputs"]))
        checks["tunebook_process_2_benchmarked"] = tb[1]["stats"]["benchmarked"]
        for other in (v for v in variants if v != "tunebook"):
            checks[f"tunebook_vs_{other}"] = compare(Path(tb[1]["outputs"]), Path(runs[other][1]["outputs"]))
    return {"runs": runs, "checks": checks}


def print_table(library: str, result: dict[str, Any], variants: list[str]) -> None:
    runs = result["runs"]
    ops = list(next(iter(runs.values()))[0]["seconds"])
    columns = ["op"] + [f"{v} p{p}, s" for v in variants for p in (1, 2)]
    rows = [[op, *(runs[v][p]["seconds"][op] for v in variants for p in (0, 1))] for op in ops]
    print(f"\n--- {library}: first call of each op (compile + tuning + run), seconds")
    print(harness.table(rows, columns))
    checks = result["checks"]
    if "tunebook_process_2_vs_1" in checks:
        same = all(c["identical"] for c in checks["tunebook_process_2_vs_1"].values())
        print(
            f"tunebook process 2: {checks['tunebook_process_2_benchmarked']} configs benchmarked; "
            f"outputs identical to process 1: {same}"
        )
    for v in variants:
        counted = [r.get("stats", {}).get("benchmarked", r["triton_benchmarked"]) for r in runs[v]]
        print(f"configs benchmarked, {v}: process 1 {counted[0]}, process 2 {counted[1]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    parser.add_argument("--library", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--interpret", action="store_true", help="CPU mode: the interpreter, tiny shapes")
    parser.add_argument("--child", nargs=3, metavar=("LIBRARY", "VARIANT", "OUTPUTS"))
    args = parser.parse_args()
    if args.child is not None:
        if args.child[0] == "host-overhead":
            host_overhead()
        else:
            child(args.child[0], args.child[1], Path(args.child[2]))
        return
    out = harness.out_dir(args.out)
    work = Path(tempfile.mkdtemp(prefix="tunebook-adoption-"))
    result: dict[str, Any] = {
        **harness.platform_header(interpret=args.interpret),
        "libraries": {},
        "variants": args.variants,
    }
    import importlib.metadata as metadata

    result["versions"] = {name: metadata.version(name) for name in ("fla-core", "liger-kernel")}
    for library in args.library:
        result["libraries"][library] = run_library(library, args.variants, args.interpret, work)
    result["host_us_per_call"] = harness.run_child(
        [__file__, "--child", "host-overhead", "-", "-"],
        env=harness.child_env(interpret=args.interpret, scratch=work / "overhead", TUNEBOOK_PATCH=None),
    )
    if args.interpret:
        result["cpu_mode"] = harness.CPU_TRITON_NOTE
    (out / "adoption.json").write_text(json.dumps(result, indent=1))
    print(f"\n=== unmodified libraries under tunebook.patch(): {harness.header_line(result)}")
    for library in args.library:
        print_table(library, result["libraries"][library], args.variants)
    print("\n--- host time per call of a remembered key, no-op launch (Python overhead only)")
    print(harness.table(list(result["host_us_per_call"].items()), ("autotuner", "us per call")))


if __name__ == "__main__":
    main()
