"""What a book's size costs: first call, hit, miss, `tunebook show` and `tunebook report`. CPU only.

Issue 10 item 6: a valid 40,000-key book (59.5 MB in format 1) made the first kernel call
take 5-6 s and a tune-mode miss 24-38 s, `tunebook show` 27-45 s and `tunebook report`
12 min 22 s at 16.9 GB. The targets: a hit never reads the book; a miss reads and writes
one key, not the book; the first call on a 40,000-key book within 0.2 s; a Redis request
~1 ms plus one key's bytes; `report` linear in what it draws, with bounded memory.

For each store (a local book directory, or a Redis book with an empty local directory) and
each size, a book of that many keys is made (5 configs a key, ~1.5 KB a key in format 1,
as tuning writes them; ``--format 1`` makes the single-file format-1 book that tunebook
wrote before format 2, for the comparison), then a new process measures:

* ``first_call_ms`` — its first call of a key the book holds (opening the page included);
* ``hit_us`` — the mean of 2,000 further calls (nothing is read: the tables in memory);
* ``miss_ms`` — a tune-mode miss of a key the book lacks: 5 configs "benchmarked" by a
  replaying timer that costs nothing, nearest keys read as hints, results written;
* ``rss_mb`` — the process's peak resident memory at the end (VmHWM);
* for Redis, the store's requests on that book, measured here: ``request_fetch_one_key_ms``,
  ``request_merge_one_key_ms`` (medians of 200), ``request_key_names_ms`` (the listing of
  key names a miss of an unknown key asks once per page, for its nearest-key hints: at most
  ``pages.NAME_BUDGET`` names) and ``request_all_key_names_ms`` (every name: the CLI's listing);

and, for the local store, ``tunebook show DIR`` and ``tunebook report DIR -o FILE`` run as
a user would (wall time and peak memory of that process; killed past ``--timeout`` or
``--max-rss-gb``, which the table says). The kernel is tests/small_kernels.py's real
``add_kernel`` under TRITON_INTERPRET=1 with its launch replaced by a no-op, as in
benchmarks/redis_hit_latency.py: what is timed is tunebook's own work, which is what a
book's size can change.

::

    python benchmarks/book_scale.py --out DIR                           # 1k, 10k, 40k; local, redis
    python benchmarks/book_scale.py --format 1 --stores local --out DIR  # the format-1 baseline
    python benchmarks/book_scale.py --quick --out DIR                   # 200 keys, ~30 s: a smoke run
    python benchmarks/book_scale.py --sizes 10000 40000 --stores local --commands report --out DIR

The GPU hit path is measured by ``python benchmarks/core.py --hot-only`` (the lead runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import _harness as harness

BLOCKS = (16, 32, 64, 128, 256)  # ~1.5 KB a key in format 1, as in the 59.5 MB book
DTYPES = ("torch.float32",) * 3
FIRST_N = 100_000  # keys are n = FIRST_N, FIRST_N + 1, ...

CHILD = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import triton
import tunebook
from small_kernels import Replay, add_kernel, vectors

add_kernel.run = lambda *args, **kwargs: None  # tunebook's own work only (see the docstring)
blocks = {blocks!r}
replay = Replay({{b: 1.0 + i / 10 for i, b in enumerate(blocks)}})
configs = [triton.Config({{"BLOCK": b}}, num_warps=4) for b in blocks]
kernel = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
x, y, out = vectors(8)

def call(n):
    kernel[(1,)](x, y, out, n)

def peak_mb():
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report the
    # parent's peak (the parent holds the book it just made).
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

t0 = time.perf_counter(); call({hit_n}); first = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(2000):
    call({hit_n})
hit = (time.perf_counter() - t0) / 2000
t0 = time.perf_counter(); call({miss_n}); miss = time.perf_counter() - t0
stats = tunebook.stats()
print(json.dumps({{"first_call_ms": first * 1e3, "hit_us": hit * 1e6, "miss_ms": miss * 1e3,
                   "benchmarked": stats["benchmarked"], "book_hits": stats["book_hits"],
                   "rss_mb": peak_mb()}}))
"""

WRAPPER = """
import json, resource, subprocess, sys, time
limit = int(sys.argv[1]) * (1 << 30)
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t0 = time.perf_counter()
try:
    proc = subprocess.run(sys.argv[3:], preexec_fn=cap, capture_output=True, timeout=float(sys.argv[2]))
    outcome = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.decode()[-300:]}"
except subprocess.TimeoutExpired:
    outcome = f"killed after {sys.argv[2]} s"
print(json.dumps({"seconds": time.perf_counter() - t0, "outcome": outcome,
                   "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_kernel_identity() -> tuple[dict[str, Any], dict[str, Any], str, list[dict[str, Any]]]:
    """The page of the child's kernel: (kernel, platform with id, file name, config records)."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(harness.TESTS))
    import triton

    import tunebook
    from small_kernels import Replay, add_kernel

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in BLOCKS]
    replay = Replay({b: 1.0 for b in BLOCKS})  # as the child's: the timer is part of the platform
    tuner = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
    ident = tuner.identity()
    records = [tuner.config_index.record_of(c) for c in configs]
    platform = {**ident.platform, "id": ident.platform_id}
    return ident.kernel.to_json(), platform, ident.file_name, records


def entries(size: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``size`` entries as tuning writes them: 8 timed configs, a chosen one, provenance."""
    from tunebook._book import Entry, Result, config_id
    from tunebook._jsonio import key_text

    stamp = "2026-11-30T12:00:00.000000Z"
    out = {}
    for i in range(size):
        key = (FIRST_N + i, *DTYPES)
        results = {}
        for j, record in enumerate(records):
            ms = 0.01 * (1 + ((i * 7 + j * 13) % 17))
            results[config_id(record)] = Result(record, (ms, ms * 0.98, ms * 1.03), None, stamp)
        best = min(results, key=lambda c: results[c].median)
        out[key_text(key)] = Entry(
            key, results, 1.234567, stamp, stamp, "0.1.0", chosen=best, first=config_id(records[0])
        )
    return out


def write_local(directory: Path, fmt: int, size: int) -> str:
    """A book of ``size`` keys in ``directory`` (format 1: one file; 2: a page directory)."""
    from tunebook._book import Document

    kernel, platform, name, records = make_kernel_identity()
    docs = entries(size, records)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == 1:
        (directory / name).write_text(Document(kernel, platform, docs).dumps())
        return f"{(directory / name).stat().st_size / 1e6:.1f} MB in one file"
    from tunebook._book import pagedir  # format 2 (the baseline's tunebook predates it)

    meta = {"kernel": kernel, "platform": platform}
    page = directory / pagedir.page_dir_name(name)
    pagedir.ensure_page(page, meta)
    total = 0
    for text, entry in docs.items():  # written directly: a fixture need not fsync 40,000 files
        body = pagedir.entry_text(entry, meta)
        (page / pagedir.key_file_name(text)).write_text(body)
        total += len(body)
    return f"{total / 1e6:.1f} MB in {size} files"


def write_redis(url: str, size: int) -> str:
    import redis

    from tunebook._book.redis_store import KEY_PREFIX

    kernel, platform, name, records = make_kernel_identity()
    client = redis.Redis.from_url(url)
    key = KEY_PREFIX + name
    client.delete(key)
    client.hset(key, "meta", json.dumps({"kernel": kernel, "platform": platform}, sort_keys=True))
    docs = entries(size, records)
    batch: dict[str, str] = {}
    total = 0
    for text, entry in docs.items():
        batch[text] = json.dumps(entry.to_json(), sort_keys=True)
        total += len(batch[text])
        if len(batch) >= 1000:
            client.hset(key, mapping=batch)
            batch = {}
    if batch:
        client.hset(key, mapping=batch)
    return f"{total / 1e6:.1f} MB in one hash"


def measure_requests(url: str) -> dict[str, float]:
    """Median ms of the Redis store's requests on the book just written: a fetch of one
    key, a merge of one key (200 each), and the key-name listing a miss asks once per page."""
    import statistics

    from tunebook._book import Document
    from tunebook._book.pages import NAME_BUDGET
    from tunebook._book.redis_store import RedisStore

    kernel, platform, name, records = make_kernel_identity()
    store = RedisStore(url)
    news = entries(2, records)
    key = sorted(news)[1]  # a key the book holds

    def median_ms(call: Any, times: int) -> float:
        samples = []
        for _ in range(times):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return {
        "request_fetch_one_key_ms": median_ms(lambda: store.fetch(name, [key]), 200),
        "request_merge_one_key_ms": median_ms(
            lambda: store.merge(name, Document(kernel, platform, {key: news[key]})), 200
        ),
        "request_key_names_ms": median_ms(lambda: store.fetch(name, (), max_names=NAME_BUDGET), 20),
        "request_all_key_names_ms": median_ms(lambda: store.fetch(name, ()), 20),
    }


def measure_calls(book: Path, size: int, env_extra: dict[str, str]) -> dict[str, Any]:
    code = CHILD.format(
        tests=str(harness.TESTS), blocks=BLOCKS, hit_n=FIRST_N + size // 2, miss_n=FIRST_N - 7
    )
    env = harness.child_env(interpret=True, TUNEBOOK_DIR=str(book), TUNEBOOK_MODE="tune", **env_extra)
    return harness.run_child(["-c", textwrap.dedent(code)], env=env, timeout=900)


def measure_command(args: list[str], timeout: float, max_rss_gb: int) -> dict[str, Any]:
    env = harness.child_env(interpret=True)
    return harness.run_child(
        [
            "-c",
            textwrap.dedent(WRAPPER),
            str(max_rss_gb),
            str(timeout),
            sys.executable,
            "-m",
            "tunebook",
            *args,
        ],
        env=env,
        timeout=timeout + 60,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 40000])
    parser.add_argument("--stores", nargs="+", choices=["local", "redis"], default=["local", "redis"])
    parser.add_argument(
        "--format", type=int, choices=[1, 2], default=2, help="book format of the local store"
    )
    parser.add_argument("--quick", action="store_true", help="200 keys, short limits: a smoke run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for show and report")
    parser.add_argument("--max-rss-gb", type=int, default=8, help="address-space cap for show and report")
    parser.add_argument("--no-commands", action="store_true", help="skip `tunebook show` and `report`")
    parser.add_argument(
        "--commands",
        nargs="+",
        choices=["show", "report"],
        default=["show", "report"],
        help="which commands to run on the local book (e.g. --commands report)",
    )
    harness.add_out_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.timeout = [200], 120
    out = harness.out_dir(args.out)
    header = harness.platform_header(interpret=True)
    header["timings"] = "measured (CPU: tunebook's own work, the kernel launch is a no-op)"
    rows = []
    server = None
    try:
        for store in args.stores:
            if store == "redis":
                sys.path.insert(0, str(harness.TESTS))
                from helpers_reliability import RedisServer

                server = server or RedisServer()
                server.start()
            for size in args.sizes:
                # The scratch book (up to ~160 MB at 40,000 keys) goes once its row is measured.
                with tempfile.TemporaryDirectory(prefix=f"book-scale-{store}-{size}-") as tmp:
                    scratch = Path(tmp)
                    book = scratch / "book"
                    if store == "local":
                        made = write_local(book, args.format, size)
                        extra: dict[str, str] = {}
                    else:
                        assert server is not None
                        made = write_redis(server.url, size)
                        extra = {"TUNEBOOK_REDIS_URL": server.url}
                    row: dict[str, Any] = {
                        "store": store,
                        "format": args.format if store == "local" else "redis",
                    }
                    row.update(keys=size, book=made, **measure_calls(book, size, extra))
                    if store == "redis":
                        assert server is not None
                        row.update(measure_requests(server.url))
                    if store == "local" and not args.no_commands:
                        for command in args.commands:
                            cmd = [command, str(book)] + (
                                ["-o", str(scratch / "r.html")] if command == "report" else []
                            )
                            result = measure_command(cmd, args.timeout, args.max_rss_gb)
                            row[f"{command}_s"] = result["seconds"]
                            row[f"{command}_rss_mb"] = result["rss_mb"]
                            row[f"{command}_outcome"] = result["outcome"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.stop()
    doc = {**header, "command": " ".join(sys.argv), "quick": args.quick, "rows": rows}
    (out / "book_scale.json").write_text(json.dumps(doc, indent=1))
    columns = (
        "store",
        "format",
        "keys",
        "first call ms",
        "hit us",
        "miss ms",
        "rss MB",
        "show s",
        "report s",
        "report MB",
    )
    print(harness.header_line({**header, "timings": "measured"}))
    print(
        harness.table(
            [
                (
                    r["store"],
                    str(r["format"]),
                    r["keys"],
                    r["first_call_ms"],
                    r["hit_us"],
                    r["miss_ms"],
                    r["rss_mb"],
                    r.get("show_s"),
                    r.get("report_s"),
                    r.get("report_rss_mb"),
                )
                for r in rows
            ],
            columns,
            floats=".1f",
        )
    )
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
