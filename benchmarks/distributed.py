"""Issue 16: the same winner on every rank, and the tuning work split across ranks.

The pack's RMSNorm kernel (near-tied configs: it is memory-bound) over many new keys, in a
group of ``--world`` processes, one GPU each (NCCL); three phases, each in a fresh group and
a fresh book per rank:

1. ``triton.autotune`` over the same candidates: every rank tunes every key itself;
2. tunebook, every rank alone (no group): every rank tunes every key itself;
3. tunebook in the group (``TUNEBOOK_DISTRIBUTED=1``): one search a key, each batch of it
   measured across the ranks, and one rank decides.

Reports the keys whose winners differ between ranks (phases 1 and 3; tunebook's target is 0),
the tuning wall time of phase 3 against phase 2 (target at most 0.6 on 2 GPUs), and the
configs each rank screened (phase 3 against phase 2: about 1/world, since the group runs one
search whose batches are dealt across the ranks).

    python benchmarks/distributed.py --out DIR [--world 2]     # 2 GPUs
    python benchmarks/distributed.py --out DIR --phases group,alone   # tunebook only (faster)
    python benchmarks/distributed.py --interpret --out DIR     # CPU: gloo, the interpreter, 2 keys

Prints a table last; writes DIR/distributed.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness

HIDDEN = (1024, 2048, 5120, 6144, 7168)  # sizes the shipped books do not hold: every key is new
TOKENS = (1, 8, 64, 512)  # 20 keys
CPU_KEYS = ((48, 1), (80, 3))
PHASES = ("group", "alone", "triton")  # the measurement that matters most first
SPLIT = ("compile_seconds", "group_wait_seconds")  # of tunebook's tuning time, per rank


def _keys(interpret: bool) -> list[tuple[int, int]]:
    return list(CPU_KEYS) if interpret else [(h, t) for h in HIDDEN for t in TOKENS]


def _triton_kernel() -> Any:
    """The pack's RMSNorm jit function under triton.autotune: every statically feasible config
    of its Space, cut per call by the Space's own argument constraints (as tunebook does)."""
    import triton

    module = importlib.import_module("tunebook.kernels.rms_norm")  # the module, not the function
    tuned = module._rms_norm_kernel
    space = tuned.space

    def candidate(config: Any) -> dict[str, Any]:
        return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}

    def prune(configs: list[Any], named: dict[str, Any], **kwargs: Any) -> list[Any]:
        args = {**named, **kwargs}
        return [c for c in configs if all(rule(candidate(c), args) for rule in space.arg_constraints)]

    configs = [space.to_config(c) for c in space.candidates()]
    kernel = triton.autotune(
        configs, key=[str(k) for k in tuned.keys], prune_configs_by={"early_config_prune": prune}
    )(tuned.fn)
    if harness.interpreting():
        from tunebook._bench import wallclock_bench

        kernel = triton.autotune(
            configs,
            key=[str(k) for k in tuned.keys],
            prune_configs_by={"early_config_prune": prune},
            do_bench=wallclock_bench,
        )(tuned.fn)
    return kernel


def child(phase: str) -> None:
    """One rank of one phase: tune every key, report the winners and the wall time."""
    import torch
    import torch.distributed as dist

    import tunebook

    interpret = harness.interpreting()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD"])
    dist.init_process_group(
        "gloo" if interpret else "nccl", init_method=os.environ["INIT"], rank=rank, world_size=world
    )
    module = importlib.import_module("tunebook.kernels.rms_norm")  # the module, not the function
    kernel = _triton_kernel() if phase == "triton" else module._rms_norm_kernel
    if phase == "triton":
        module._rms_norm_kernel = kernel  # the op's wrapper launches whatever the module holds
    device = harness.device()
    winners: dict[str, Any] = {}
    traced = _collect_group_trace()
    dist.barrier()
    start = time.perf_counter()
    keys = _keys(interpret)
    if phase == "triton" and os.environ.get("TRITON_KEYS"):
        keys = keys[: int(os.environ["TRITON_KEYS"])]  # triton.autotune times every config in full: slow
    per_key: dict[str, dict[str, float]] = {}  # configs this rank screened and seconds, key by key
    for hidden, tokens in keys:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
        before, t0 = tunebook.stats(), time.perf_counter()
        module.rms_norm(x, w, 1e-6)
        harness.synchronize()
        best = kernel.best_config
        name = f"{hidden}x{tokens}"
        winners[name] = {
            **best.kwargs,
            "num_warps": best.num_warps,
            "num_stages": best.num_stages,
        }
        after = tunebook.stats()
        events, traced[:] = list(traced), []
        per_key[name] = {
            "group": _split_of(events),
            "benchmarked": after["benchmarked"] - before["benchmarked"],
            "seconds": round(time.perf_counter() - t0, 3),
            # where the key's time went: compiling ahead, waiting for the other ranks, the rest measuring
            **{k: round(after[k] - before[k], 3) for k in SPLIT},
        }
    harness.synchronize()
    seconds = time.perf_counter() - start
    dist.barrier()

    print(
        json.dumps(
            {
                "rank": rank,
                "phase": phase,
                "winners": winners,
                "seconds": seconds,
                "benchmarked": tunebook.stats()["benchmarked"],
                **{k: tunebook.stats()[k] for k in SPLIT},
                "per_key": per_key,
                "group_split": _split_of(
                    [{"event": e, "seconds": v} for k in per_key.values() for e, v in k["group"].items()]
                ),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


def _collect_group_trace() -> list[dict[str, Any]]:
    """The group's trace records (``tunebook._distributed.trace``), appended as they come."""
    import logging

    kept: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(getattr(record, "tunebook_group", {}))

    log = logging.getLogger("tunebook.group")
    log.addHandler(Keep())
    log.setLevel(logging.DEBUG)
    log.propagate = False  # kept, not printed
    return kept


def _split_of(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds by event: ``join`` (waiting for the group to arrive), ``measure`` (this rank's
    own parts), ``gather`` (the leader waiting for the others' parts), ``batch`` (a follower
    waiting for its next part, or for the end), ``decision``."""
    split: dict[str, float] = {}
    for e in events:
        if "event" in e:
            split[e["event"]] = round(split.get(e["event"], 0.0) + float(e.get("seconds", 0.0)), 3)
    return dict(sorted(split.items()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_phase(
    phase: str, world: int, interpret: bool, scratch: Path, triton_keys: int | None = None
) -> list[dict[str, Any]]:
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(world):
        overrides: dict[str, str | None] = {
            "RANK": str(rank),
            "WORLD": str(world),
            "INIT": init,
            "TUNEBOOK_DIR": str(scratch / f"{phase}-book-{rank}"),
            # Every phase compiles from cold: with a shared compile cache the phases after the
            # first would find the first phase's kernels compiled, and their wall times would
            # not compare (the first run on 2 x H200 made exactly that mistake).
            "TRITON_CACHE_DIR": str(scratch / f"{phase}-triton-cache-{rank}"),
            "TUNEBOOK_PATH": None,
            "TUNEBOOK_MODE": "tune",
            "TUNEBOOK_DISTRIBUTED": "1" if phase == "group" else None,
            "TUNEBOOK_PROGRESS": "0",
            "TRITON_KEYS": str(triton_keys) if triton_keys else None,
        }
        if not interpret:
            overrides["CUDA_VISIBLE_DEVICES"] = str(rank)
        env = harness.child_env(interpret=interpret, **overrides)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", phase],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise harness.ChildFailed(f"phase {phase} rank failed:\n{out}\n{err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def disagreements(ranks: list[dict[str, Any]]) -> list[str]:
    """Keys whose winner is not the same on every rank."""
    keys = ranks[0]["winners"]  # the keys this phase ran
    return [k for k in keys if any(r["winners"][k] != ranks[0]["winners"][k] for r in ranks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_out_argument(parser)
    parser.add_argument("--world", type=int, default=2, help="processes (one GPU each)")
    parser.add_argument("--interpret", action="store_true", help="CPU: gloo, Triton's interpreter, 2 keys")
    parser.add_argument(
        "--triton-keys", type=int, default=None, help="only the first N keys for triton.autotune (it is slow)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, run in this order (default {','.join(PHASES)})",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chosen = [p for p in args.phases.split(",") if p]
    if not chosen or any(p not in PHASES for p in chosen):
        parser.error(f"--phases: expected some of {','.join(PHASES)}; found {args.phases!r}")
    if args.child:
        child(args.child)
        return
    out = harness.out_dir(args.out)
    scratch = Path(tempfile.mkdtemp(prefix="tunebook-distributed-"))
    header = harness.platform_header(interpret=args.interpret)
    phases: dict[str, list[dict[str, Any]]] = {}
    for phase in chosen:
        phases[phase] = run_phase(phase, args.world, args.interpret, scratch, args.triton_keys)
        result = summary(header, args.world, args.interpret, phases)
        (out / "distributed.json").write_text(json.dumps(result, indent=1))  # kept if a later phase dies
        print(
            f"phase {phase}: {json.dumps({k: result[k][phase] for k in ('disagreements', 'wall_s')})}",
            flush=True,
        )
    print(harness.header_line(result))
    rows = [
        (
            p,
            len(result["disagreements"][p]),
            result["wall_s"][p],
            "/".join(map(str, result["benchmarked"][p])),
        )
        for p in PHASES[::-1]
        if p in phases
    ]
    print(
        harness.table(rows, ("phase", "keys where ranks differ", "tuning wall s", "configs timed per rank"))
    )
    for p in ("alone", "group"):
        if p in phases:  # where each rank's time went
            print(
                f"{p}: "
                + "; ".join(
                    f"rank {r['rank']} compiling {r['compile_seconds']:.1f} s, waiting for the group "
                    f"{r['group_wait_seconds']:.1f} s, of {r['seconds']:.1f} s"
                    for r in phases[p]
                )
            )
    for r in phases.get("group", []):  # the group's trace: what each rank waited for
        split = ", ".join(f"{event} {seconds:.1f} s" for event, seconds in r["group_split"].items())
        print(f"group, rank {r['rank']}: {split}")
    if result["group_vs_alone"] is not None:
        print(
            f"group / alone wall time: {result['group_vs_alone']:.2f} (target <= 0.6), over {result['keys']} "
            "keys; configs screened by the busiest rank, group / alone: "
            f"{result['configs_group_vs_alone']:.2f}"
        )


def summary(
    header: dict[str, str], world: int, interpret: bool, phases: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The results so far (written after every phase)."""
    wall = {p: max(r["seconds"] for r in ranks) for p, ranks in phases.items()}
    busiest = {p: max(r["benchmarked"] for r in ranks) for p, ranks in phases.items()}
    both = "alone" in wall and "group" in wall
    return {
        **header,
        "world": world,
        "keys": len(_keys(interpret)),
        "disagreements": {p: disagreements(ranks) for p, ranks in phases.items()},
        "wall_s": wall,
        "group_vs_alone": wall["group"] / wall["alone"] if both else None,
        # The configs the busiest rank screened, group against alone: the work each rank does.
        "configs_group_vs_alone": busiest["group"] / max(1, busiest["alone"]) if both else None,
        "benchmarked": {p: [r["benchmarked"] for r in ranks] for p, ranks in phases.items()},
        "phases": phases,
    }


if __name__ == "__main__":
    main()
