"""Issue 15: a tuning sweep over every GPU of a Ray cluster, against one GPU and against a
static assignment of whole keys to GPUs (vLLM's ``benchmark_moe.py``).

The pack's linear (GEMM) kernel under its own Space (``_sweep_linear.py``), over keys whose
costs differ (decode to prefill, a Llama-3-8B-like layer and its MLP), a seeded random
search of ``--configs`` configs per key (the same configs in every phase), three phases in
one Ray cluster, each with a fresh book and a cold Triton compile cache:

1. ``ray_1gpu``: ``tunebook.tune_on_ray`` on one GPU;
2. ``ray_dynamic``: on ``--gpus`` GPUs: the dynamic queue, units of ``--unit-size`` configs;
3. ``static``: whole keys assigned round-robin to the GPUs up front, each GPU sweeping its
   own keys (one ``tune_on_ray(gpus=1)`` per GPU, all at once), as ``benchmark_moe.py``
   assigns batch sizes to its actors.

Reports each phase's wall time, ``speedup`` (1 GPU over dynamic; target >= 1.8 on 2 GPUs),
``dynamic_vs_static`` and whether the phases chose the same winners. Then ``simulate``: the
sweep's own scheduler (``tunebook._sweep.schedule``) driven by simulated GPUs from 1 to 256,
with unit times drawn around the per-config time measured here, and the driver's book
write measured on this disk, to show where a cluster of 64+ GPUs stops scaling.

    python benchmarks/ray_sweep.py --out DIR                  # every local GPU (2), ray installed
    python benchmarks/ray_sweep.py --out DIR --phases ray_1gpu   # one phase (a short GPU session)
    python benchmarks/ray_sweep.py --interpret --out DIR      # CPU: interpreter, 2 stand-in GPUs

Prints a table last; writes DIR/ray_sweep.json after every phase (a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _harness as harness

BENCH = Path(__file__).resolve().parent
# (M, N, K): decode and prefill of a 4096-wide layer and its 14336-wide MLP; 5 keys on 2 GPUs
# cannot be split evenly by whole keys, and prefill keys cost more per config than decode.
GPU_KEYS = [(1, 4096, 4096), (16, 4096, 4096), (256, 14336, 4096), (2048, 4096, 4096), (8192, 4096, 14336)]
CPU_KEYS = [(16, 64, 64), (32, 64, 64), (16, 32, 64)]
CPU_RESOURCE = "tb_gpu"  # the custom resource that stands for a GPU in CPU mode


def _keys(args: argparse.Namespace) -> list[dict[str, int]]:
    return [{"M": m, "N": n, "K": k} for m, n, k in (CPU_KEYS if args.interpret else GPU_KEYS)]


def _fresh(work: Path, name: str) -> None:
    """A fresh book and a cold compile cache for a phase (the workers inherit both)."""
    os.environ["TUNEBOOK_DIR"] = str(work / name / "book")
    os.environ["TRITON_CACHE_DIR"] = str(work / name / "triton-cache")


def _summary(reports: list[Any], wall: float) -> dict[str, Any]:
    keys = [k for report in reports for k in report.keys]
    return {
        "wall_s": wall,
        "measured": sum(r.measured for r in reports),
        "failed_keys": [k.key_text for k in keys if k.state != "done"],
        "crashed": sum(len(r.crashed) for r in reports),
        "winners": {k.key_text: k.chosen for k in keys},
        "gpus": [g for r in reports for g in r.groups.items()],
    }


PHASES = ("ray_1gpu", "ray_dynamic", "static")


def run_phase(args: argparse.Namespace, work: Path, name: str) -> dict[str, Any]:
    """One phase (see the module docstring), in a fresh book and compile cache."""
    import _sweep_linear

    import tunebook

    keys = _keys(args)
    parts, gpus = {
        "ray_1gpu": ([keys], 1),
        "ray_dynamic": ([keys], args.gpus),
        "static": ([keys[g :: args.gpus] for g in range(args.gpus)], 1),
    }[name]
    common = {"unit_size": args.unit_size, "resource": CPU_RESOURCE if args.interpret else "GPU"}
    _fresh(work, name)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(parts)) as pool:  # static: one sweep of one GPU per part, at once
        runs = [
            pool.submit(tunebook.tune_on_ray, _sweep_linear.sweep_linear, part, gpus=gpus, **common)
            for part in parts
        ]
        reports = [run.result() for run in runs]
    phase = _summary(reports, time.perf_counter() - start)
    phase["gpus_used"] = gpus * len(parts)
    print(f"[{name}] {json.dumps(phase)}", flush=True)
    return phase


def conclude(out: dict[str, Any]) -> None:
    """The ratios, where both phases ran."""
    phases = out["phases"]
    wall = {name: p["wall_s"] for name, p in phases.items()}
    out["speedup"] = (
        wall["ray_1gpu"] / wall["ray_dynamic"] if {"ray_1gpu", "ray_dynamic"} <= set(wall) else None
    )
    out["dynamic_vs_static"] = (
        wall["static"] / wall["ray_dynamic"] if {"static", "ray_dynamic"} <= set(wall) else None
    )
    winners = [p["winners"] for p in phases.values()]
    out["same_winners"] = sum(all(w.get(k) == winners[0][k] for w in winners) for k in winners[0])


def measure_book_write(work: Path, sizes: tuple[int, ...]) -> dict[str, float]:
    """Milliseconds for the driver to record one unit (8 results) into a page already holding
    ``size`` keys of 100 results each, on this disk (the merge-on-write rewrites the file)."""
    from tunebook._book import Book, Entry, KernelIdentity, Result, config_id

    kernel = KernelIdentity("write_probe", "0" * 16, ("M",))
    out: dict[str, float] = {}
    for size in sizes:
        directory = work / f"write-{size}"
        page = Book(directory).open(kernel, {"id": "probe"}, "probe", "probe")

        def entry(key: int, first: int, count: int) -> Entry:
            records = [{"kwargs": {"B": c}, "num_warps": 4} for c in range(first, first + count)]
            results = {config_id(r): Result(r, (1.0, 1.0, 1.0)) for r in records}
            return Entry(key=(key,), results=results)

        page.record_many({f"[{key}]": entry(key, 0, 100) for key in range(size)})
        start = time.perf_counter()
        for unit in range(5):
            page.record("[0]", entry(0, 100 + 8 * unit, 8))
        out[str(size)] = (time.perf_counter() - start) / 5 * 1e3
    return out


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    config_s: float, write_ms: float, keys: int, configs: int, unit_size: int
) -> list[dict[str, Any]]:
    """The sweep's scheduler driven by simulated GPUs, as the driver drives it.

    A unit takes ``unit_size`` configs of ``config_s`` seconds (x0.5-1.5 at random, x3 for
    every fourth key, whose shapes are larger). Each GPU holds two units (one running, one
    queued: it never waits for the driver between them); the driver takes one result at a
    time and writes the book for ``write_ms`` (the cost of the largest page) at most every
    ``FLUSH_S`` or twice ``write_ms``, handing out nothing meanwhile. Per GPU count: the wall time, the GPUs'
    busy fraction, the driver's share of time spent writing, and the wall time of a static
    assignment of whole keys to GPUs (round-robin, as benchmark_moe.py)."""
    from tunebook._book import Result
    from tunebook._search import Budget
    from tunebook._sweep.schedule import Plan, Sweep
    from tunebook._sweep.writer import FLUSH_S

    rng = random.Random(0)
    ok = Result({"kwargs": {}}, (1.0, 1.0, 1.0))
    plan = Plan(
        key=(0,),
        key_text="",
        ids=[f"c{i}" for i in range(configs)],
        records=[{"kwargs": {"c": i}} for i in range(configs)],
        strategy="random",
        budget=Budget(max_configs=configs),
    )
    weight = [3.0 if k % 4 == 0 else 1.0 for k in range(keys)]

    def cost(unit: Any) -> float:
        if unit.kind == "plan":
            return 0.05
        return config_s * weight[unit.key] * len(unit.cids) * rng.uniform(0.5, 1.5)

    rows = []
    for gpus in (1, 2, 8, 64, 128, 256):
        clock = _Clock()
        sweep = Sweep(keys, ["gpu"], lambda *a: None, unit_size=unit_size, clock=clock)
        queued: list[list[Any]] = [[] for _ in range(gpus)]
        running: dict[int, tuple[float, Any]] = {}  # gpu -> (done at, unit)
        writing = last_write = 0.0
        while not sweep.finished:
            for g in range(gpus):  # the driver tops every GPU up to two units
                while len(queued[g]) + (g in running) < 2 and (unit := sweep.next_unit("gpu")) is not None:
                    queued[g].append(unit)
                if g not in running and queued[g]:
                    unit = queued[g].pop(0)
                    running[g] = (clock.now + cost(unit), unit)
            g = min(running, key=lambda gpu: running[gpu][0])
            done_at, unit = running.pop(g)
            if queued[g]:  # the GPU goes on with its queued unit at once
                following = queued[g].pop(0)
                running[g] = (done_at + cost(following), following)
            clock.now = max(clock.now, done_at)
            if unit.kind == "plan":
                sweep.planned(unit, plan, None)
            else:
                sweep.measured(unit, {cid: (ok, False) for cid in unit.cids})
            if clock.now - last_write >= max(FLUSH_S, 2 * write_ms / 1e3):  # as the driver
                clock.now += write_ms / 1e3
                writing += write_ms / 1e3
                last_write = clock.now
        static = max(sum(config_s * weight[k] * configs for k in range(g, keys, gpus)) for g in range(gpus))
        work = sum(config_s * w * configs for w in weight)
        rows.append(
            {
                "gpus": gpus,
                "wall_s": clock.now,
                "busy": work / (clock.now * gpus),
                "driver_writing": writing / clock.now,
                "static_wall_s": static,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_out_argument(parser)
    parser.add_argument(
        "--interpret", action="store_true", help="CPU: the interpreter, 2 stand-in GPUs, tiny"
    )
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the dynamic phase (default 2)")
    parser.add_argument("--configs", type=int, default=None, help="configs per key (default 100; CPU: 4)")
    parser.add_argument("--unit-size", type=int, default=8, help="configs per unit (default 8)")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)} (default: all)"
    )
    args = parser.parse_args()
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; expected some of {', '.join(PHASES)}")
    out_dir = harness.out_dir(args.out)
    configs = args.configs or (4 if args.interpret else 100)
    work = Path(tempfile.mkdtemp(prefix="tunebook-raysweep-"))
    # Before Ray starts (its workers take this environment) and before triton is imported.
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["RAY_SWEEP_DTYPE"] = "float32"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ["RAY_SWEEP_CONFIGS"] = str(configs)
    os.environ["TUNEBOOK_PROGRESS"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCH), str(harness.SRC), os.environ.get("PYTHONPATH", "")) if p
    )
    import ray

    if args.interpret:
        resources = {CPU_RESOURCE: args.gpus}
        ray.init(
            num_cpus=2,
            resources=resources,
            object_store_memory=100 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = harness.platform_header(interpret=args.interpret)
    out.update(
        {"keys": _keys(args), "configs_per_key": configs, "unit_size": args.unit_size, "gpus": args.gpus}
    )
    out["phases"] = {}
    result = out_dir / "ray_sweep.json"
    try:
        out["cluster"] = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        for name in args.phases.split(","):
            out["phases"][name] = run_phase(args, work, name)
            conclude(out)
            result.write_text(json.dumps(out, indent=1))  # a run cut short keeps what it measured
    finally:
        ray.shutdown()
    phases = out["phases"]
    first = next(iter(phases.values()))
    config_s = first["wall_s"] * first["gpus_used"] / max(1, first["measured"])  # start-up included
    out["book_write_ms"] = measure_book_write(work, (10, 30) if args.interpret else (10, 100, 300))
    write_ms = max(out["book_write_ms"].values())
    keys = 10 if args.interpret else 200
    out["simulate"] = {
        "config_s": config_s,
        "write_ms": write_ms,
        "keys": keys,
        "configs_per_key": configs,
        "rows": simulate(config_s, write_ms, keys, configs, args.unit_size),
    }
    result.write_text(json.dumps(out, indent=1))

    print(f"\n=== {harness.header_line(out)}")
    rows = [
        (name, f"{p['wall_s']:.1f}", p["measured"], len(p["failed_keys"]), _gpus(p["gpus"]))
        for name, p in phases.items()
    ]
    print(harness.table(rows, ("phase", "wall s", "configs measured", "failed keys", "GPUs")))
    if out["speedup"] is not None:
        print(f"speedup of {args.gpus} GPUs over 1: {out['speedup']:.2f}x")
    if out["dynamic_vs_static"] is not None:
        print(f"dynamic queue over static keys: {out['dynamic_vs_static']:.2f}x")
    print(f"same winner in every phase: {out['same_winners']} of {len(out['keys'])} keys")
    print(f"book write of one unit, by keys in the page: {json.dumps(out['book_write_ms'])} ms")
    sim = out["simulate"]
    print(
        f"simulated: {sim['keys']} keys x {configs} configs, {sim['config_s']:.2f} s per config, "
        f"{sim['write_ms']:.1f} ms per book write"
    )
    cells = [
        (
            r["gpus"],
            f"{r['wall_s']:.0f}",
            f"{r['busy']:.2f}",
            f"{r['driver_writing']:.2f}",
            f"{r['static_wall_s']:.0f}",
        )
        for r in sim["rows"]
    ]
    print(harness.table(cells, ("GPUs", "wall s", "GPU busy", "driver writing", "static wall s")))


def _gpus(groups: list[Any]) -> str:
    return ", ".join(f"{n} x {g}" for g, n in groups)


if __name__ == "__main__":
    main()
