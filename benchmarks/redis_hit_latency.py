"""Per-call cost of a remembered key with the shared Redis book up, then down. CPU only.

The requirement (issue 5): once Redis has gone down and the first failure has been met,
a hit must not cost more than 1 us more per call than it did with Redis up.

What is timed is tunebook's own serving path: ``kernel[grid](x, y, out, n)`` on a key
already tuned in this process, for a real ``@triton.jit`` kernel (tests/small_kernels.py
``add_kernel``, under ``TRITON_INTERPRET=1``) whose ``run`` is replaced by a no-op before
tunebook sees it. The interpreter would take milliseconds per launch, which would bury a
microsecond; the launch itself does not depend on Redis, so leaving it out measures exactly
what Redis could change. Phases, in one process, against a redis-server started here on a
free port of 127.0.0.1 (needs ``redis-server`` on PATH and ``pip install 'tunebook[redis]'``):

1. ``no_redis`` — TUNEBOOK_REDIS_URL unset (baseline);
2. ``up`` — the key tuned and stored in Redis;
3. ``down`` — redis-server killed, then a miss on a new key met the failure (breaker open);
4. ``down_probe_due`` — still down, the breaker's retry interval passed, before any miss
   (the store's outbox thread probes in the background: what the miss of phase 3 tuned is
   held for Redis);
5. ``up_again`` — redis-server restarted, the held result sent by the outbox, and a miss
   using Redis again.

::

    python benchmarks/redis_hit_latency.py [--batches 400] [--calls 1000] [--out DIR]
    python benchmarks/redis_hit_latency.py --batches 5 --calls 20 --out /tmp/hit   # ~10 s

Each phase runs ``batches`` timed loops of ``calls`` calls; it prints the p10, median and
p90 over batches of the per-call time in microseconds (interpolated between ranks), as one
JSON object, also written to DIR/redis_hit_latency.json (default $OUT or ./bench-out), and
a table. The breaker's 5 s retry interval is waited out once, whatever the sizes.
The comparison uses the p10: other work on the machine only ever adds time to a batch, so
the low decile is what the code costs, while the median moves with the machine's load
(printed too: ``loadavg``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import _harness as harness

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNEBOOK_REDIS_URL", None)
os.environ.pop("TUNEBOOK_PATH", None)
os.environ.pop("TUNEBOOK_MODE", None)
sys.path.insert(0, str(harness.TESTS))

import triton

import tunebook
from helpers_reliability import RedisServer
from small_kernels import Replay, add_kernel, vectors
from tunebook._book import redis_store

BLOCKS = (16, 32, 64)
N = 1024  # the remembered key


def _no_launch(*args: Any, **kwargs: Any) -> None:
    return None


def make_kernel() -> Any:
    """add_kernel behind tunebook, with its launch replaced by a no-op (see the docstring)."""
    replay = Replay({16: 0.3, 32: 0.2, 64: 0.25})
    add_kernel.run = _no_launch  # an instance attribute: every launcher tunebook builds binds it
    configs = [triton.Config({"BLOCK": b}) for b in BLOCKS]
    return tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)


def per_call_us(kernel: Any, batches: int, calls: int) -> dict[str, float]:
    """Median, p10 and p90 over ``batches`` of the mean per-call time of a loop of ``calls`` hits."""
    x, y, out = vectors(N)
    grid = (N // 32,)
    hits_before = tunebook.stats()["hits"]
    for _ in range(calls):  # warm up
        kernel[grid](x, y, out, N)
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            kernel[grid](x, y, out, N)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    assert tunebook.stats()["hits"] - hits_before == (batches + 1) * calls, "some calls were not hits"
    p = harness.percentiles(samples, (10, 50, 90))
    return {"p10_us": round(p["p10"], 3), "median_us": round(p["p50"], 3), "p90_us": round(p["p90"], 3)}


def miss(kernel: Any, n: int) -> None:
    """A call on a new key: tunes it, which consults (and records into) the Redis book."""
    x, y, out = vectors(n)
    kernel[(1,)](x, y, out, n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--calls", type=int, default=1000)
    harness.add_out_argument(parser)
    args = parser.parse_args()
    out = harness.out_dir(args.out)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    report: dict[str, Any] = {"batches": args.batches, "calls_per_batch": args.calls}

    with tempfile.TemporaryDirectory() as book:
        os.environ["TUNEBOOK_DIR"] = book
        baseline = make_kernel()
        miss(baseline, N)
        report["no_redis"] = per_call_us(baseline, args.batches, args.calls)

        server = RedisServer()
        server.start()
        try:
            os.environ["TUNEBOOK_REDIS_URL"] = server.url
            os.environ["TUNEBOOK_DIR"] = os.path.join(book, "with-redis")
            kernel = make_kernel()
            miss(kernel, N)
            store = redis_store.shared_store(server.url)
            assert store is not None and store.fetch(kernel.page().file_name) is not None
            report["up"] = per_call_us(kernel, args.batches, args.calls)

            server.stop()
            miss(kernel, 2 * N)  # meets the failure: one warning, the breaker opens
            assert not store.available
            report["down"] = per_call_us(kernel, args.batches, args.calls)

            time.sleep(store.retry_after_s + 0.1)
            # A probe is due; hits make none (while results are held, the store's outbox
            # thread probes every retry interval, off the calls' path).
            report["down_probe_due"] = per_call_us(kernel, args.batches, args.calls)

            server.start()
            deadline = time.monotonic() + 3 * store.retry_after_s
            while store.unsent_results() and time.monotonic() < deadline:
                time.sleep(0.1)  # the outbox finds Redis back and sends what it held
            assert store.unsent_results() == 0 and store.available
            miss(kernel, 4 * N)  # a miss uses Redis again
            stored = store.fetch(kernel.page().file_name)
            # The restarted server is empty (no persistence): it holds the key missed while it
            # was down, sent along with the next one, and that one.
            assert stored is not None and {e.key[0] for e in stored.entries.values()} == {2 * N, 4 * N}
            report["up_again"] = per_call_us(kernel, args.batches, args.calls)
        finally:
            server.stop()

    report["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    for stat in ("p10", "median"):
        report[f"down_minus_up_{stat}_us"] = round(
            report["down"][f"{stat}_us"] - report["up"][f"{stat}_us"], 3
        )
    (out / "redis_hit_latency.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    phases = ("no_redis", "up", "down", "down_probe_due", "up_again")
    rows = [
        [phase, report[phase]["p10_us"], report[phase]["median_us"], report[phase]["p90_us"]]
        for phase in phases
    ]
    print()
    print(harness.table(rows, ("phase", "p10 us/call", "median", "p90")))
    print(
        f"\ndown - up: {report['down_minus_up_p10_us']:+.3f} us per call at p10, "
        f"{report['down_minus_up_median_us']:+.3f} at the median (requirement: <= 1 us); "
        f"load average {report['loadavg']}"
    )


if __name__ == "__main__":
    main()
