"""Tuning inside torch.distributed jobs (``group=``): gloo process groups on the CPU interpreter.

Every rank is a real process in a real gloo group. Each rank's timer reports its own noisy
view of near-tied configs (alone, each rank would pick another winner); the group must
still launch one config per key on every rank, each rank measuring about 1/world of the
candidates, and exactly one rank writing the book.
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

BLOCKS = (16, 32, 64, 128, 256)

RANK = """
import json, os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD"]))
rank, world = dist.get_rank(), dist.get_world_size()
import triton, tunebook
from kernels import add_kernel, grid_1d, vectors

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
        block = self.current["BLOCK"]
        measured.append(block)
        ms = 1.0 if block == {blocks}[rank % len({blocks})] else 1.01 + 0.001 * {blocks}.index(block)
        return [ms, ms, ms]

noisy = Noisy()
group = None if os.environ.get("TUNEBOOK_DISTRIBUTED") == "1" else dist.group.WORLD
kernel = tunebook.autotune([triton.Config({{"BLOCK": b}}) for b in {blocks}], key=["n"], do_bench=noisy,
                           pre_hook=noisy.pre_hook, group=group)(add_kernel)
store = dist.distributed_c10d._get_default_store()
keys_before = store.num_keys()
chosen, start = {{}}, time.perf_counter()
for n in {keys}:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)
    chosen[n] = kernel.best_config.kwargs["BLOCK"]
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
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    world: int, tmp_path: Path, *, keys=(100, 200, 300), lonely=False, env=None, timeout=240, shared=False
) -> list[dict]:
    """Run RANK in ``world`` processes of one gloo group; each rank gets its own book directory
    (``shared``: one for all, as ranks of one host sharing a disk)."""
    init = f"tcp://127.0.0.1:{_free_port()}"
    code = textwrap.dedent(RANK.format(blocks=BLOCKS, keys=tuple(keys), lonely=lonely))
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


def test_a_rank_that_waits_too_long_tunes_alone_and_the_first_decision_stands(tmp_path, monkeypatch):
    # Two ranks as threads over one in-process store: the leader hangs in its share, the other
    # rank gives up waiting, tunes alone and publishes; the leader, when it comes back, adopts
    # the decision that stands. Both end with the same config.
    import threading

    import torch.distributed as dist

    from tunebook import _collective
    from tunebook._book import Book, KernelIdentity, Result
    from tunebook._distributed import Team
    from tunebook._tuner import Outcome

    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_JOIN_S", "2")
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED_WAIT_S", "1")
    store = dist.HashStore()
    ids = ["a", "b", "c", "d"]
    kernel = KernelIdentity("k", "hash", ("n",))
    release = threading.Event()

    def tuner_for(rank: int, times: dict[str, float]):
        def tune_share(indices: list[int]) -> Outcome:
            if rank == 0 and len(indices) < len(ids):
                release.wait(20)  # the leader's share hangs until the other rank has decided
            results = {ids[i]: Result({"kwargs": {"B": i}}, (times[ids[i]],) * 3) for i in indices}
            from tunebook._book import Entry

            return Outcome(Entry(key=(7,), results=results), len(indices), 0, 0.0)

        return tune_share

    outcomes: dict[int, object] = {}

    def rank(r: int, times: dict[str, float]) -> None:
        page = Book(tmp_path / f"book-{r}").open(kernel, {"backend": "test"}, "test", "p")
        outcomes[r] = _collective.tune_together(
            Team(r, 2, store), page, (7,), "[7]", ids, [], None, tuner_for(r, times)
        )
        if r == 1:
            release.set()

    leader = threading.Thread(target=rank, args=(0, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}))
    leader.start()
    time.sleep(0.2)  # rank 0 arrives first and leads
    other = threading.Thread(target=rank, args=(1, {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}))
    other.start()
    other.join(30)
    leader.join(30)
    chosen = {r: o.entry.best(ids) for r, o in outcomes.items()}
    assert chosen == {0: "d", 1: "d"}  # rank 1's lone decision was published first and stands
