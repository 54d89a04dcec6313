"""Tuning inside torch.distributed jobs (``group=``): gloo process groups on the CPU interpreter.

Every rank is a real process in a real gloo group. Each rank's timer reports its own noisy
view of near-tied configs (alone, each rank would pick another winner); the group must
still launch one config per key on every rank, run one search a key (the one a lone rank
would run) with each rank measuring about 1/world of it, and have exactly one rank write
the book. The protocol's timing rules (late ranks, a silent leader) are checked with ranks
as threads over one in-process store, around a real ``tune_key``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import TESTS, book_files

# The protocol over the group's store: no Triton version changes it; the tuning each rank
# runs is checked on every Triton by the rest of the suite. Last Triton only (conftest.py).
pytestmark = pytest.mark.once

BLOCKS = (16, 32, 64, 128, 256)

RANK = """
import json, os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD"]))
rank, world = dist.get_rank(), dist.get_world_size()
dies = {dies}  # the rank that dies at its first measurement, after the others arrived
dist.barrier()
if rank == dies:
    time.sleep(0.5)
import triton, tunebook
from small_kernels import add_kernel, grid_1d, vectors

measured, recorded = [], []
from tunebook._book import pages as _pages
_record = _pages.Page.record
def _counting_record(self, key_text, entry):
    recorded.append(key_text)  # every write of a key to this rank's book
    return _record(self, key_text, entry)
_pages.Page.record = _counting_record

class Noisy:
    # Near-tied configs; each rank sees them through its own noise, so that alone each rank
    # would choose another winner (rank r's fastest is BLOCKS[r]).
    def __init__(self):
        self.current = {{}}
    def pre_hook(self, nargs, reset_only=False):
        self.current = nargs
    def __call__(self, kernel_call, quantiles=None):
        kernel_call()
        if rank == dies:
            os._exit(3)
        block = self.current["BLOCK"]
        measured.append(block)
        if {wide}:
            # A valley over (BLOCK, num_warps, num_stages), two tied optima ordered by rank.
            b, w = {blocks}.index(block), WARPS.index(self.current["num_warps"])
            s = self.current["num_stages"]
            ms = 1.0 + 0.3 * abs(b - 2) + 0.2 * abs(w - 1) + 0.15 * abs(s - 2)
            ms = 1.0 + 0.001 * ((s + rank) % 2) if (b, w) == (2, 1) and s in (2, 3) else ms
        else:
            ms = 1.0 if block == {blocks}[rank % len({blocks})] else 1.01 + 0.001 * {blocks}.index(block)
        return [ms, ms, ms]

noisy = Noisy()
group = None if os.environ.get("TUNEBOOK_DISTRIBUTED") == "1" else dist.group.WORLD
WARPS = (1, 2, 4, 8)
configs = [triton.Config({{"BLOCK": b}}) for b in {blocks}]
if {wide}:  # 80 configs: a key with a neighbour's hint is searched by 'neighbors', not exhaustively
    configs = [triton.Config({{"BLOCK": b}}, num_warps=w, num_stages=s) for b in {blocks} for w in WARPS
               for s in (1, 2, 3, 4)]
kernel = tunebook.autotune(configs, key=["n"], do_bench=noisy, pre_hook=noisy.pre_hook, group=group)
kernel = kernel(add_kernel)
store = dist.distributed_c10d._get_default_store()
keys_before = store.num_keys()
chosen, start = {{}}, time.perf_counter()
for n in {keys}:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)
    best = kernel.best_config
    wide_label = f"{{best.kwargs['BLOCK']}}/{{best.num_warps}}/{{best.num_stages}}"
    chosen[n] = wide_label if {wide} else best.kwargs["BLOCK"]
lonely = None
if rank == 0 and {lonely}:
    x, y, out = vectors(777)
    t0 = time.perf_counter()
    kernel[grid_1d(777)](x, y, out, 777)  # a key no other rank reaches
    torch.testing.assert_close(out, x + y)
    lonely = time.perf_counter() - t0
print(json.dumps({{"rank": rank, "chosen": chosen, "measured": len(measured), "lonely": lonely,
                  "recorded": len(recorded),
                  "store_keys": store.num_keys() - keys_before, "stats": tunebook.stats(),
                  "seconds": time.perf_counter() - start}}), flush=True)
if dies is None:
    dist.barrier()
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    world: int,
    tmp_path: Path,
    *,
    keys=(100, 200, 300),
    lonely=False,
    env=None,
    timeout=240,
    shared=False,
    wide=False,
    dies=None,
) -> list[dict]:
    """Run RANK in ``world`` processes of one gloo group; each rank gets its own book directory
    (``shared``: one for all, as ranks of one host sharing a disk). ``wide``: 80 configs;
    ``dies``: that rank exits at its first measurement (and reports nothing)."""
    code = textwrap.dedent(RANK.format(blocks=BLOCKS, keys=tuple(keys), lonely=lonely, wide=wide, dies=dies))
    return run_ranks(code, world, tmp_path, env=env, timeout=timeout, shared=shared, dies=dies)


def run_ranks(code, world, tmp_path, *, env=None, timeout=240, shared=False, dies=None) -> list[dict]:
    """Run ``code`` in ``world`` processes of one gloo group (INIT, RANK, WORLD set); each
    prints one JSON object last. Each rank's book is its own directory (``shared``: one)."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            "TRITON_INTERPRET": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "INIT": init,
            "RANK": str(rank),
            "WORLD": str(world),
            "TUNEBOOK_DIR": str(tmp_path / ("book" if shared else f"book-{rank}")),
            "TUNEBOOK_DISTRIBUTED_JOIN_S": "30",
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} did not finish within {timeout} s: the job hung") from None
        if rank == dies:
            assert proc.returncode == 3, f"rank {rank} was to die:\n{out}\n{err}"
            continue
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}\n{err}"
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _book_keys(directory: Path) -> set[int]:
    from tunebook._book import read_document

    keys: set[int] = set()
    for path in book_files(directory) if directory.is_dir() else []:  # a rank that wrote nothing has none
        doc = read_document(path)
        keys |= {e.key[0] for e in doc.entries.values() if e.results} if doc is not None else set()
    return keys


def _check_agreement(outs: list[dict], tmp_path: Path, keys: tuple[int, ...]) -> None:
    world = len(outs)
    for n in keys:
        winners = {o["chosen"][str(n)] for o in outs}
        assert len(winners) == 1, f"key {n}: the ranks launch different configs {winners}"
    per_rank = [o["measured"] for o in outs]
    total = len(BLOCKS) * len(keys)
    assert sum(per_rank) == total, per_rank  # every candidate measured once, by one rank
    assert max(per_rank) <= -(-len(BLOCKS) // world) * len(keys), per_rank  # about 1/world each
    # Books of their own (another host, a book per rank): every rank keeps every decision, so a
    # later job hits on every rank alike instead of hitting on one and tuning on another.
    for rank in range(world):
        assert _book_keys(tmp_path / f"book-{rank}") == set(keys), rank
        assert outs[rank]["recorded"] == len(keys), outs[rank]  # one write a key


def test_two_ranks_launch_the_same_winner_and_split_the_work(tmp_path):
    keys = (100, 200, 300)
    outs = run_group(2, tmp_path, keys=keys)
    _check_agreement(outs, tmp_path, keys)
    # Alone, rank 0 would pick BLOCK=16 and rank 1 BLOCK=32: the group picked one for both.
    assert {o["chosen"]["100"] for o in outs} <= {16, 32}
    # The next job, each rank on its own book: every key a hit on every rank, the same config,
    # no store operation, nothing measured.
    again = run_group(2, tmp_path, keys=keys)
    assert [o["chosen"] for o in again] == [outs[0]["chosen"]] * 2
    assert all(o["measured"] == 0 and o["store_keys"] == 0 and o["recorded"] == 0 for o in again), again


def test_ranks_sharing_one_book_write_each_key_once(tmp_path):
    keys = (100, 200)
    outs = run_group(2, tmp_path, keys=keys, shared=True)
    assert len({json.dumps(o["chosen"]) for o in outs}) == 1
    assert sum(o["recorded"] for o in outs) == len(keys), outs  # the deciding rank's write only
    assert _book_keys(tmp_path / "book") == set(keys)


@pytest.mark.slow
def test_one_search_for_the_group_on_a_large_space_each_rank_measuring_half(tmp_path):
    # 80 configs: more than an exhaustive search takes. The keys hinted by the first one's
    # winner are searched by the lone search's 'neighbors' strategy, which stops at the local
    # optimum: one search a key, each batch it asks for dealt across the ranks.
    keys = (100, 200, 300)
    outs = run_group(2, tmp_path, keys=keys, wide=True)
    for n in keys:
        assert len({o["chosen"][str(n)] for o in outs}) == 1, n
    from tunebook._book import read_document

    results = {}
    for path in book_files(tmp_path / "book-0"):
        doc = read_document(path)
        results |= {e.key[0]: len(e.results) for e in doc.entries.values()} if doc is not None else {}
    # The first key: the budget of a space of 80 (64 configs); the hinted ones: a local search.
    assert results[100] == 64 and results[200] < 40 and results[300] < 40, results
    per_rank = [o["measured"] for o in outs]
    total = sum(results.values())
    assert sum(per_rank) == total, (per_rank, results)  # each config measured once, by one rank
    assert max(per_rank) <= 0.55 * total, (per_rank, total)  # about half each


@pytest.mark.slow
def test_a_follower_that_dies_mid_search_leaves_the_leader_finishing_alone(tmp_path):
    outs = run_group(2, tmp_path, keys=(100,), dies=1, env={"TUNEBOOK_DISTRIBUTED_WAIT_S": "2"}, timeout=120)
    (rank0,) = outs
    assert rank0["seconds"] < 20  # waited ~2 s for the dead rank's part, once
    assert rank0["measured"] == len(BLOCKS)  # its own part and the dead rank's
    assert rank0["chosen"]["100"] == 16  # rank 0's timings alone decide


@pytest.mark.slow
def test_four_ranks_agree_with_the_default_group_from_the_environment(tmp_path):
    keys = (100, 200)
    outs = run_group(4, tmp_path, keys=keys, env={"TUNEBOOK_DISTRIBUTED": "1"})
    _check_agreement(outs, tmp_path, keys)


@pytest.mark.slow
def test_a_key_only_one_rank_reaches_does_not_hang_the_job(tmp_path):
    outs = run_group(2, tmp_path, keys=(100,), lonely=True, env={"TUNEBOOK_DISTRIBUTED_JOIN_S": "1"})
    rank0 = next(o for o in outs if o["rank"] == 0)
    assert rank0["lonely"] is not None and rank0["lonely"] < 30  # waited ~1 s for the others, then tuned
    assert rank0["measured"] >= len(BLOCKS)  # its share of key 100, and all of key 777 alone


@pytest.mark.slow
def test_serve_mode_and_book_hits_never_touch_the_store_and_agree(tmp_path):
    # Tune once into a book both ranks ship read-only; then serve: known keys are hits and an
    # unseen key gets the same fallback on every rank, with no communication at all.
    shipped = tmp_path / "shipped"
    outs = run_group(2, tmp_path, keys=(100, 4000))
    for rank in range(2):  # each key is in the book of the rank that decided it: ship both
        # a format-2 page is a directory with a file per key: shipping is copying the files
        book = tmp_path / f"book-{rank}"
        if book.is_dir():  # a rank that decided no key wrote no book
            shutil.copytree(book, shipped, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    served = run_group(
        2,
        tmp_path / "serve",
        keys=(100, 4000, 1000, 3000),
        env={"TUNEBOOK_MODE": "serve", "TUNEBOOK_PATH": str(shipped)},
    )
    for n in (100, 4000, 1000, 3000):
        assert len({o["chosen"][str(n)] for o in served}) == 1, n
    assert [o["store_keys"] for o in served] == [0, 0]  # not one store operation
    assert all(o["measured"] == 0 and o["stats"]["fallbacks"] == 2 for o in served)
    assert {o["chosen"]["100"] for o in served} == {o["chosen"]["100"] for o in outs}


# Ranks as threads over one in-process store, each with a real tune_key over synthetic
# candidates whose "measurement" is a look-up: the protocol and the search, in milliseconds.


def _jobs(ids: list[str], records: list[dict], ms_of, calls: list[int], hints=(), adaptive=False):
    """``jobs(exchange)`` for ``tune_together``: a real KeyTuning whose bench looks up
    ``ms_of(index)`` and appends the index to ``calls`` (a rank's measurements)."""
    from tunebook._bench import Timers
    from tunebook._tuner import KeyTuning, Persist

    def timer(launch, quantiles=None):
        return launch()

    def bench(timer, i):
        calls.append(i)
        ms = ms_of(i)
        return [ms, ms, ms]

    def jobs(exchange, known=None):
        return KeyTuning(
            key_text="[7]",
            key=(7,),
            configs=list(range(len(ids))),
            ids=ids,
            records=records,
            known=known,
            timers=Timers(timer, timer, "test", adaptive),
            bench=lambda timer, i: timer(lambda: bench(timer, i)),
            persist=Persist(None, "[7]", (7,), ids[0], None),
            is_unexpected=lambda exc: True,
            hints=list(hints),
            exchange=exchange,
        )

    return jobs


def _in_threads(
    tmp_path, jobs_of_rank, stagger=0.2, timeout=60.0, finished=lambda rank: None, key=7, leader=0
):
    """Run ``tune_together`` for ``key`` in one thread per rank (``leader`` arrives first and
    leads; ``finished(rank)`` is called as each returns); returns {rank: Outcome} and the
    seconds each took."""
    import threading

    import torch.distributed as dist

    from tunebook import _collective
    from tunebook._book import Book, KernelIdentity
    from tunebook._distributed import Team

    store = dist.HashStore()
    kernel = KernelIdentity("k", "hash", ("n",))
    outcomes: dict[int, object] = {}
    seconds: dict[int, float] = {}
    world = len(jobs_of_rank)

    def rank(r: int) -> None:
        t0 = time.perf_counter()
        page = Book(tmp_path / f"book-{r}").open(kernel, {"backend": "test"}, "test", "p")
        ids = jobs_of_rank[r](None).ids
        outcomes[r] = _collective.tune_together(
            Team(r, world, store), page, (key,), f"[{key}]", ids, jobs_of_rank[r]
        )
        seconds[r] = time.perf_counter() - t0
        finished(r)

    order = [leader] + [r for r in range(world) if r != leader]
    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in order]
    for t in threads:
        t.start()
        time.sleep(stagger)  # rank 0 arrives first and leads
    for t in threads:
        t.join(timeout)
    return outcomes, seconds


def _grid():
    """240 candidates on a 3-D grid with one valley: more than an exhaustive search takes, so a
    hinted key is searched by 'neighbors', which stops at the local optimum."""
    points = [(a, b, c) for a in range(8) for b in range(6) for c in range(5)]
    ids = [f"a{a}-b{b}-c{c}" for a, b, c in points]
    records = [{"kwargs": {"a": a, "b": b, "c": c}} for a, b, c in points]

    def ms(i: int, rank: int = 0) -> float:
        a, b, c = points[i]
        if (a, b) == (5, 2) and c in (3, 4):  # two tied optima, ordered by each rank's noise
            return 1.0 + 0.001 * ((c + rank) % 2)
        return 1.0 + 0.1 * abs(a - 5) + 0.07 * abs(b - 2) + 0.05 * abs(c - 3)

    return ids, records, ms, ids.index("a4-b2-c3")


def test_one_search_for_the_group_each_rank_measures_about_half_of_a_lone_search(tmp_path):
    from tunebook._tuner import tune_key

    ids, records, ms, hint = _grid()
    lone: list[int] = []
    alone = tune_key(_jobs(ids, records, ms, lone, hints=[hint])(None))
    assert 10 < alone.measured < len(ids) / 2  # the lone search stopped at the local optimum
    assert alone.stopped == "converged"

    calls: dict[int, list[int]] = {0: [], 1: []}
    jobs = {r: _jobs(ids, records, lambda i, r=r: ms(i, r), calls[r], hints=[hint]) for r in (0, 1)}
    outcomes, _ = _in_threads(tmp_path, jobs)
    chosen = {o.entry.best(ids) for o in outcomes.values()}
    assert len(chosen) == 1 and chosen <= {"a5-b2-c3", "a5-b2-c4"}  # one choice, among the tied pair
    assert not set(calls[0]) & set(calls[1])  # every config measured by one rank
    # the leader (rank 0, first to arrive) searched; the follower says no reason of its own
    assert (outcomes[0].stopped, outcomes[1].stopped, outcomes[1].why) == ("converged", "", "")
    assert [outcomes[r].measured for r in (0, 1)] == [len(calls[0]), len(calls[1])]
    total = len(calls[0]) + len(calls[1])
    assert total == len(lone), (total, len(lone))  # the lone search's path, split
    for r in (0, 1):
        assert len(calls[r]) <= 0.6 * len(lone), (r, len(calls[r]), len(lone))  # about half each


def test_a_config_is_measured_by_the_same_rank_key_after_key_whichever_rank_leads(tmp_path):
    # Measuring a config first compiles it, and a compiled config serves every key of the same
    # specialization: dealt to the same rank on every key, each rank compiles only its share.
    # Two keys over the same candidates, with their optima apart so the searches overlap only
    # in part; rank 0 leads the first, rank 1 the second.
    import tunebook

    tunebook.reset_stats()
    ids, records, ms, hint = _grid()
    far = ids.index("a1-b4-c1")
    by_rank: dict[int, set[int]] = {0: set(), 1: set()}
    for key, leader, hint_of_key in ((7, 0, hint), (8, 1, far)):
        calls: dict[int, list[int]] = {0: [], 1: []}
        jobs = {r: _jobs(ids, records, ms, calls[r], hints=[hint_of_key]) for r in (0, 1)}
        outcomes, _ = _in_threads(tmp_path, jobs, key=key, leader=leader)
        assert len({o.entry.best(ids) for o in outcomes.values()}) == 1
        for r in (0, 1):
            assert calls[r], (key, r)  # both ranks took part in both searches
            by_rank[r] |= set(calls[r])
    both, union = by_rank[0] & by_rank[1], by_rank[0] | by_rank[1]
    # A config leaves its owner only to even out a batch (6 of 90 here); dealt round-robin,
    # 50 of the 90 were measured, so compiled, on both ranks.
    assert len(both) <= 0.1 * len(union), (len(both), sorted(both), len(union))
    assert min(map(len, by_rank.values())) >= 0.3 * len(union)  # and the work is shared out
    assert tunebook.stats()["group_wait_seconds"] > 0  # the ranks waited for each other, and it shows


def test_the_contenders_full_measurements_are_dealt_too(tmp_path):
    # An adaptive timer: a quick screening, then the contenders (within 10% of the best, at
    # most 8) measured in full, dealt across the ranks like any batch.
    ids = [f"c{i}" for i in range(8)]
    records = [{"kwargs": {"B": i}} for i in range(8)]
    calls: dict[int, list[int]] = {0: [], 1: []}
    jobs = {r: _jobs(ids, records, lambda i: 1.0 + 0.001 * i, calls[r], adaptive=True) for r in (0, 1)}
    outcomes, _ = _in_threads(tmp_path, jobs)
    assert [len(c) for c in calls.values()] == [8, 8]  # 4 screenings and 4 confirmations each
    entry = outcomes[0].entry
    assert all(not r.quick for r in entry.results.values())  # every contender confirmed in full
    assert outcomes[1].entry.best(ids) == entry.best(ids) == "c0"


def test_a_follower_that_stops_answering_leaves_the_leader_finishing_alone(tmp_path, monkeypatch):
    # The follower hangs in its second part; the leader waits TUNEBOOK_DISTRIBUTED_WAIT_S for it,
    # measures that part itself, deals it nothing more and decides.
    import threading

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_WAIT_S", "1")
    ids, records, ms, hint = _grid()
    release = threading.Event()
    calls: dict[int, list[int]] = {0: [], 1: []}

    def follower_ms(i: int) -> float:
        if len(calls[1]) == 2:
            release.wait(30)  # hangs, as a dead or stuck rank would, until the leader has decided
        return ms(i, 1)

    jobs = {
        0: _jobs(ids, records, ms, calls[0], hints=[hint]),
        1: _jobs(ids, records, follower_ms, calls[1], hints=[hint]),
    }
    lone: list[int] = []
    from tunebook._tuner import tune_key

    tune_key(_jobs(ids, records, ms, lone, hints=[hint])(None))
    outcomes, seconds = _in_threads(tmp_path, jobs, timeout=30, finished=lambda r: r == 0 and release.set())
    assert 0 in outcomes and seconds[0] < 6  # ~1 s of waiting, once: not a hang
    assert len(calls[0]) >= len(lone) - 3  # the leader measured the rest of the search itself
    assert outcomes[0].entry.best(ids) == outcomes[1].entry.best(ids)


def test_a_rank_that_waits_too_long_tunes_alone_and_the_first_decision_stands(tmp_path, monkeypatch):
    # The leader hangs in its own part of the first batch; the other rank measures its part,
    # gives up waiting for the next batch, tunes alone and publishes; the leader, when it
    # comes back, adopts the decision that stands. Both end with the same config.
    import threading

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_JOIN_S", "2")
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_WAIT_S", "1")
    ids = ["a", "b", "c", "d"]
    records = [{"kwargs": {"B": i}} for i in range(4)]
    release = threading.Event()
    times = {0: [1.0, 2.0, 3.0, 4.0], 1: [4.0, 3.0, 2.0, 1.0]}
    calls: dict[int, list[int]] = {0: [], 1: []}

    def leader_ms(i: int) -> float:
        release.wait(20)  # the leader's part hangs until the other rank has decided
        return times[0][i]

    def other_ms(i: int) -> float:
        return times[1][i]

    jobs = {0: _jobs(ids, records, leader_ms, calls[0]), 1: _jobs(ids, records, other_ms, calls[1])}
    # The leader is released once rank 1 has returned, i.e. published its lone decision
    # (released earlier, which of the two publishes first is up to the scheduler).
    outcomes, _ = _in_threads(tmp_path, jobs, finished=lambda r: r == 1 and release.set())
    chosen = {r: o.entry.best(ids) for r, o in outcomes.items()}
    assert chosen == {0: "d", 1: "d"}  # rank 1's lone decision was published first and stands


# A rank (or, without INIT, a process alone) timing BLOCKs by a table, the same on every rank.
TABLED = """
import json, os, time
import triton, tunebook
from small_kernels import add_kernel, grid_1d, vectors
MS = json.loads(os.environ["MS"])  # BLOCK -> ms, the same on every rank of a job

class Table:
    current = {}
    def pre_hook(self, nargs, reset_only=False):
        self.current = nargs
    def __call__(self, kernel_call, quantiles=None):
        kernel_call()
        ms = MS[str(self.current["BLOCK"])]
        return [ms, ms, ms]

group = None
if "INIT" in os.environ:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD"]))
    group = dist.group.WORLD
    if dist.get_rank() == 1:
        time.sleep(1.0)  # rank 0 leads
table = Table()
kernel = tunebook.autotune([triton.Config({"BLOCK": int(b)}) for b in MS], key=["n"], do_bench=table,
                           pre_hook=table.pre_hook, group=group)(add_kernel)
x, y, out = vectors(100)
kernel[grid_1d(100)](x, y, out, 100)
print(json.dumps({"rank": int(os.environ.get("RANK", 1)), "block": kernel.best_config.kwargs["BLOCK"],
                  "benchmarked": tunebook.stats()["benchmarked"]}), flush=True)
if group is not None:
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_config_added_to_a_tuned_kernel_is_launched_by_every_rank_or_by_none(tmp_path):
    """Each rank's book holds the key, chosen 16; a config added later (256, 1% faster: within
    the tie tolerance) is measured by the group, and every rank launches what the leader's
    book keeps, 16, as a lone rank would (the leader used to keep 16 while the others
    launched the published 256)."""
    ms = {"16": 1.00, "32": 1.005, "64": 1.10, "128": 1.20}
    first = run_ranks(TABLED, 2, tmp_path, env={"MS": json.dumps(ms)})
    assert [o["block"] for o in first] == [16, 16]
    grown = json.dumps({**ms, "256": 0.99})
    again = run_ranks(TABLED, 2, tmp_path, env={"MS": grown})
    assert [o["block"] for o in again] == [16, 16], again
    hits = run_ranks(TABLED, 2, tmp_path, env={"MS": grown})  # no communication
    assert [o["block"] for o in hits] == [16, 16] and all(o["benchmarked"] == 0 for o in hits), hits


def _one_rank_tunes(store, page, ids, calls, seconds_to_join=0.2):
    from tunebook import _collective
    from tunebook._distributed import Team

    jobs = _jobs(ids, [{"kwargs": {"i": i}} for i in range(len(ids))], lambda i: 1.0 + i, calls)
    return _collective.tune_together(Team(0, 2, store), page, (7,), "[7]", ids, jobs)


def test_two_autotuners_of_one_function_never_share_a_decision(tmp_path, monkeypatch):
    """Two candidate lists for one key of one page (two autotuners of one @triton.jit, or a
    call whose pruning leaves others): the second must not adopt the first's decision, which
    names a config it lacks, but tune its own."""
    import torch.distributed as dist

    from tunebook._book import Book, KernelIdentity

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_JOIN_S", "0.2")  # the other rank never comes
    store = dist.HashStore()
    page = Book(tmp_path / "book").open(KernelIdentity("k", "hash", ("n",)), {"backend": "test"}, "test", "p")
    first: list[int] = []
    a = _one_rank_tunes(store, page, ["a", "b"], first)
    assert a.entry.best(["a", "b"]) == "a" and sorted(first) == [0, 1]
    second: list[int] = []
    b = _one_rank_tunes(store, page, ["c", "d"], second)
    assert b.entry.best(["c", "d"]) == "c" and sorted(second) == [0, 1]  # measured, not adopted


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the follower's, meant
def test_a_follower_that_fails_mid_search_costs_the_leader_no_wait(tmp_path, monkeypatch):
    """A follower interrupted while measuring says so: the leader measures its part at once
    instead of waiting for it to be late (at least 30 s)."""
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_WAIT_S", "60")
    ids = [f"c{i}" for i in range(8)]
    records = [{"kwargs": {"i": i}} for i in range(8)]

    def interrupted(i: int) -> float:
        raise KeyboardInterrupt

    calls: dict[int, list[int]] = {0: [], 1: []}
    jobs = {
        0: _jobs(ids, records, lambda i: 1.0 + i, calls[0]),
        1: _jobs(ids, records, interrupted, calls[1]),
    }
    outcomes, seconds = _in_threads(tmp_path, jobs, timeout=30)
    assert 1 not in outcomes and seconds[0] < 10, seconds
    assert outcomes[0].entry.best(ids) == "c0" and sorted(calls[0]) == list(
        range(8)
    )  # the leader measured all


def test_settings_that_leave_the_group_out_are_refused_or_said(monkeypatch, caplog):
    """group= with isolate=True cannot work (a worker process is not a rank): refused at
    decoration. TUNEBOOK_MODE=off keeps no book, so each rank tunes alone: said once."""
    import logging

    import triton

    import tunebook
    from small_kernels import add_kernel, grid_1d, vectors

    configs = [triton.Config({"BLOCK": b}) for b in (32, 64)]
    with pytest.raises(tunebook.ConfigurationError, match="group= and isolate=True cannot be combined"):
        tunebook.autotune(configs, key=["n"], group="world", isolate=True)
    monkeypatch.setenv("TUNEBOOK_MODE", "off")
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED", "1")
    caplog.set_level(logging.WARNING, logger="tunebook")
    kernel = tunebook.autotune(configs, key=["n"])(add_kernel)
    for n in (100, 200):
        x, y, out = vectors(n)
        kernel[grid_1d(n)](x, y, out, n)
    said = [r.message for r in caplog.records if "TUNEBOOK_MODE=off keeps no book" in r.message]
    assert len(said) == 1 and "each rank tunes its keys alone" in said[0]


@pytest.mark.slow
def test_a_rank_whose_book_held_the_key_agrees_with_the_group_in_the_next_job(tmp_path):
    """Rank 1 once tuned the key alone, over BLOCK=16 (0.95 ms) and 64. The group's search
    starts from every rank's book, so the decision counts that result, and each rank's book
    ends up serving the same config: the next job's hits agree (rank 1's own result used to
    outlive a decision of 32, so it served 16 and rank 0 served 32)."""
    from conftest import run_python

    solo = {"MS": json.dumps({"16": 0.95, "64": 5.0}), "TUNEBOOK_DIR": str(tmp_path / "book-1")}
    alone = run_python(TABLED, env=solo)  # (two configs: a single one is launched, not tuned)
    assert alone["block"] == 16 and alone["benchmarked"] == 2
    both = json.dumps({"16": 1.00, "32": 0.97})
    group = run_ranks(TABLED, 2, tmp_path, env={"MS": both})
    assert {o["block"] for o in group} == {16}, group  # 0.95 counted: 16 is the fastest known
    assert sum(o["benchmarked"] for o in group) == 1  # only 32 was measured: 16 was known
    hits = run_ranks(TABLED, 2, tmp_path, env={"MS": both})
    assert [o["block"] for o in hits] == [16, 16] and all(o["benchmarked"] == 0 for o in hits), hits


def test_the_rank_hosting_the_store_dying_leaves_the_others_tuning_alone(tmp_path):
    """Found by a misuse review: rank 0, whose process hosts the store init_process_group
    made, killed mid-search: the other rank's kernel call raised DistNetworkError (Broken
    pipe) where the docs promise it tunes alone."""
    code = textwrap.dedent(RANK.format(blocks=BLOCKS, keys=(100, 200), lonely=False, wide=False, dies=0))
    code = code.replace('"store_keys": store.num_keys() - keys_before,', "")  # no store to ask
    (rank1,) = run_ranks(code, 2, tmp_path, env={"TUNEBOOK_DISTRIBUTED_WAIT_S": "2"}, timeout=120, dies=0)
    assert sorted(rank1["chosen"]) == ["100", "200"]
    assert rank1["chosen"]["100"] == rank1["chosen"]["200"] == BLOCKS[1]  # its own timings decide


def test_a_rank_waiting_for_the_group_leaves_its_other_threads_the_store() -> None:
    """A blocking store.wait held the process's TCPStore client for as long as it waited (up
    to WAIT_S): every other thread's store request, another kernel's leader among them,
    waited behind it (two ranks each leading one kernel and following the other waited
    on each other for WAIT_S). Waits poll now; another thread's request goes between."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from tunebook import _distributed

    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True, timeout=timedelta(seconds=30))
    order: list[str] = []
    waiting = threading.Event()

    def follower() -> None:
        waiting.set()
        found = _distributed.wait(store, ["never-written"], 4.0)
        order.append(f"wait ended ({found})")

    thread = threading.Thread(target=follower)
    thread.start()
    waiting.wait(10)
    time.sleep(0.3)  # the wait has begun
    store.set("other-thread", "1")  # a leader's publication, from another thread
    order.append("set done")
    thread.join(30)
    assert order == ["set done", "wait ended (False)"], order
    assert _distributed.wait(store, ["other-thread"], 1.0)


DECORATED_EARLY = """
import json, logging, os
import torch, torch.distributed as dist, triton, tunebook
from small_kernels import add_kernel, grid_1d, vectors

said = []
class Keep(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.getLogger("tunebook").addHandler(Keep())

def timer(rank_of):
    current = {}
    def bench(kernel_call, quantiles=None):
        kernel_call()
        ms = 1.0 if current["BLOCK"] == (32, 64)[rank_of()] else 1.5  # alone, each rank its own winner
        return [ms, ms, ms]
    return bench, lambda nargs, reset_only=False: current.update(nargs)

def kernel(group, name):  # one function: one page, so each kernel below tunes keys of its own
    bench, hook = timer(lambda: dist.get_rank())
    configs = [triton.Config({"BLOCK": b}) for b in (32, 64)]
    tuned = tunebook.autotune(configs, key=["n"], do_bench=bench, pre_hook=hook, group=group, name=name)
    return tuned(add_kernel)

# Decorated at import, before init_process_group, as in any module: WORLD is None there.
written_world = kernel(dist.group.WORLD, "written")
named_world = kernel("world", "named")
init = lambda how: dist.init_process_group("gloo", init_method=how, rank=int(os.environ["RANK"]),
                                           world_size=int(os.environ["WORLD"]))
init(os.environ["INIT"])
stale = kernel(dist.group.WORLD, "stale")

def chosen(k, n):
    x, y, out = vectors(n)
    k[grid_1d(n)](x, y, out, n)
    return k.best_config.kwargs["BLOCK"]

out = {"written": chosen(written_world, 100), "named": chosen(named_world, 200), "stale": chosen(stale, 300)}
dist.barrier()
dist.destroy_process_group()
init(os.environ["INIT_AGAIN"])  # a new group (a store of its own): the kernels stay
try:
    chosen(stale, 400)
except tunebook.ConfigurationError as exc:
    out["stale_error"] = str(exc)
out["named_again"] = chosen(named_world, 500)
out["said"] = [m for m in said if "group" in m]
print(json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_kernel_decorated_before_init_process_group_tunes_with_the_group_by_name(tmp_path):
    """Found by a misuse review: group=dist.group.WORLD where the kernel is decorated, before
    init_process_group, is None: each rank tuned alone and the two launched different configs,
    with nothing said. It is said now, and group='world' (looked up at each new key) tunes with
    the group; a group made before destroy_process_group() raised torch's 'not registered'
    ValueError deep in the tuning, and is a ConfigurationError that names the way out."""
    again = {"INIT_AGAIN": f"file://{tmp_path / 'store-again'}"}
    outs = run_ranks(textwrap.dedent(DECORATED_EARLY), 2, tmp_path, env=again, timeout=240)
    assert [o["written"] for o in outs] == [32, 64]  # alone: each rank its own winner
    assert len({o["named"] for o in outs}) == 1 and len({o["stale"] for o in outs}) == 1
    assert len({o["named_again"] for o in outs}) == 1
    for o in outs:
        assert any("was given group=None" in m and "group='world'" in m for m in o["said"]), o["said"]
        assert "no longer knows this group" in o["stale_error"] and "group='world'" in o["stale_error"]


def test_group_takes_a_process_group_or_world(tmp_path):
    import triton

    import tunebook

    configs = [triton.Config({"BLOCK": b}) for b in (32, 64)]
    for wrong in ([0, 1], "WORLD", 0, True):
        with pytest.raises(tunebook.ConfigurationError, match=r"group= takes a torch\.distributed"):
            tunebook.autotune(configs, key=["n"], group=wrong)
    tunebook.autotune(configs, key=["n"], group="world")
    tunebook.autotune(configs, key=["n"], group=None)
    # what dist.new_group returns on a rank outside the group: that rank tunes alone
    tunebook.autotune(configs, key=["n"], group=-100)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the lost leader's end
def test_a_leader_lost_while_the_group_arrives_leaves_the_others_tuning_alone_at_once(tmp_path, monkeypatch):
    """Found by a misuse review: a leader killed during its join wait never closes the round;
    the rank that came waited for the round (join time and a margin), then for a decision
    nobody would publish (TUNEBOOK_DISTRIBUTED_WAIT_S more: 935 s by default)."""
    import threading

    from tunebook import _collective

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_JOIN_S", "1")
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_WAIT_S", "600")
    gone = threading.Event()

    def lost(store, ns, world):  # the leader's process dies in its join wait: it never closes
        gone.wait(120)
        raise SystemExit  # (a thread's quiet end) once the other rank is done or given up on

    monkeypatch.setattr(_collective, "_close_round", lost)
    ids = ["a", "b", "c"]
    records = [{"kwargs": {"B": i}} for i in range(3)]
    calls: dict[int, list[int]] = {0: [], 1: []}
    jobs = {r: _jobs(ids, records, lambda i: (3.0, 1.0, 2.0)[i], calls[r]) for r in (0, 1)}
    outcomes, _ = _in_threads(tmp_path, jobs, timeout=60, finished=lambda r: gone.set())
    gone.set()
    assert 1 in outcomes, "the rank that came waited for a decision no leader would publish"
    assert outcomes[1].entry.best(ids) == "b" and sorted(calls[1]) == [0, 1, 2]  # tuned alone


def test_a_round_closed_short_of_the_group_is_said_once(tmp_path, monkeypatch, caplog):
    """Found by a misuse review: ranks in other modes left every key's leader waiting the join
    time, with nothing said below DEBUG."""
    import logging

    import torch.distributed as dist

    from tunebook import _collective
    from tunebook._book import Book, KernelIdentity
    from tunebook._distributed import Team

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_JOIN_S", "0.2")
    caplog.set_level(logging.WARNING, logger="tunebook")
    ids = ["a", "b"]
    records = [{"kwargs": {"B": i}} for i in range(2)]
    page = Book(tmp_path / "book").open(KernelIdentity("k", "hash", ("n",)), {"backend": "test"}, "test", "p")
    store = dist.HashStore()
    for n in (7, 8):  # two keys only this rank of two reaches
        jobs = _jobs(ids, records, lambda i: (2.0, 1.0)[i], [])
        _collective.tune_together(Team(0, 2, store), page, (n,), f"[{n}]", ids, jobs)
    said = [
        r.getMessage() for r in caplog.records if "came within TUNEBOOK_DISTRIBUTED_JOIN_S" in r.getMessage()
    ]
    assert len(said) == 1 and "1 of the group's 2 ranks" in said[0], said
