"""Latency of RedisStore.fetch with Redis up, down (refused), and hung (SIGSTOP). CPU only.

Starts its own redis-server on a free port of 127.0.0.1 (needs ``redis-server`` on PATH and
``pip install 'tunebook[redis]'``)::

    python benchmarks/redis_latency.py [--entries 64] [--calls 2000] [--out DIR]
    python benchmarks/redis_latency.py --entries 4 --calls 20 --out /tmp/redis   # a few seconds

Prints one JSON object, microseconds per call (median, p90, p99, max; percentiles
interpolated between ranks) for each condition, then a table; writes the object to
DIR/redis_latency.json (default $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import _harness as harness

sys.path.insert(0, str(harness.TESTS))
from helpers_reliability import RedisServer
from tunebook._book import Document, Entry, Result, config_id, config_record
from tunebook._book.redis_store import RedisStore

FILE = "matmul_kernel--0123456789abcdef--cuda-H200--fedcba9876543210.json"


def book(entries: int, configs: int = 8) -> Document:
    """A document like a tuned GEMM's: ``entries`` keys x ``configs`` measured configs."""
    docs = {}
    for m in range(entries):
        results = {}
        for c in range(configs):
            record = config_record({"BLOCK_M": 16 << (c % 4), "BLOCK_N": 32 << (c // 4)}, {"num_warps": 4})
            results[config_id(record)] = Result(
                record, (0.1 + c, 0.1 + c, 0.1 + c), None, "2026-11-21T05:00:00Z"
            )
        key = (16 * (m + 1), 4096, 4096, "torch.float16")
        docs[json.dumps(list(key))] = Entry(key, results, 1.0, "2026-11-21T05:00:00Z", "2026-11-21T05:00:00Z")
    return Document(
        {"name": "matmul_kernel", "hash": "abc", "key": ["M", "N", "K"]}, {"backend": "cuda"}, docs
    )


def timed(call: Callable[[], Any], calls: int) -> dict[str, float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e6)
    p = harness.percentiles(times, (50, 90, 99, 100))
    return {
        "calls": calls,
        "median_us": round(p["p50"], 1),
        "p90_us": round(p["p90"], 1),
        "p99_us": round(p["p99"], 1),
        "max_us": round(p["p100"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    harness.add_out_argument(parser)
    args = parser.parse_args()
    out = harness.out_dir(args.out)
    logging.getLogger("tunebook").addHandler(logging.NullHandler())

    server = RedisServer()
    server.start()
    try:
        doc = book(args.entries)
        store = RedisStore(server.url)
        assert store.merge(FILE, doc) is not None
        report: dict[str, Any] = {
            "entries": args.entries,
            "results": args.entries * 8,
            "document_bytes": len(doc.dumps()),
        }
        timed(lambda: store.fetch(FILE), 50)  # warm the connection
        report["up_fetch"] = timed(lambda: store.fetch(FILE), args.calls)
        report["up_fetch_missing"] = timed(lambda: store.fetch("absent.json"), args.calls)
        report["up_merge_one_key"] = timed(lambda: store.merge(FILE, book(1)), max(args.calls // 10, 10))

        server.freeze()  # hung: connect succeeds, reads time out
        hung = RedisStore(server.url)
        report["hung_first_call"] = timed(lambda: hung.fetch(FILE), 1)
        report["hung_breaker_open"] = timed(lambda: hung.fetch(FILE), args.calls)
        server.thaw()

        server.stop()  # down: connection refused
        report["down_first_call"] = timed(lambda: store.fetch(FILE), 1)
        report["down_breaker_open"] = timed(lambda: store.fetch(FILE), args.calls)
        probing = RedisStore(server.url, retry_after_s=0.0)  # every call probes: the worst case
        report["down_every_call_probes"] = timed(lambda: probing.fetch(FILE), max(args.calls // 10, 10))
    finally:
        server.stop()
    (out / "redis_latency.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    rows = [
        [name, *(r[k] for k in ("calls", "median_us", "p90_us", "p99_us", "max_us"))]
        for name, r in report.items()
        if isinstance(r, dict)
    ]
    print(harness.table(rows, ("condition", "calls", "median us", "p90", "p99", "max"), floats=".1f"))


if __name__ == "__main__":
    main()
