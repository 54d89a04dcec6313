"""Torture: many processes tune one book at once while some are SIGKILLed, some mid-write.

Each child (tests/helpers_reliability.py::torture_child) tunes real kernels in the Triton
interpreter with a replaying benchmarker, and prints a line for every result it read back
from disk. Its writer is stopped at three points inside every write, all under the book's
lock (``locked``: book re-read, no temp file yet; ``temp-written``: temp file written and
flushed, not yet replaced; ``replaced``: new file in place, directory not yet synced), and
waits there for the parent's "go", so the parent can SIGKILL it exactly there. Other
victims are killed at seeded random moments.

What must hold afterwards: every result any child reported as persisted is in the book with
the same timings; every book file parses and validates; the temp files killed writers left
behind break nothing (a later process serves every key from the book).
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tunebook
from conftest import TESTS, book_files
from helpers_reliability import KILL_POINTS, TABLE
from small_kernels import Replay, add_kernel, block_configs, grid_1d, scale_kernel, vectors
from tunebook._book import Document, read_document

SEED = int(os.environ.get("TUNEBOOK_TORTURE_SEED", "20261121"))
WAVES = (10, 4)  # processes started together, wave after wave
SHARED = (64, 96, 128, 160)  # keys every child tunes (overlapping)
OWN = 2  # keys only one child tunes (disjoint), per kernel


@dataclass
class Child:
    index: int
    plan: list[list[Any]]
    proc: subprocess.Popen[bytes]
    kill_at_point: int | None = None  # kill at this handshake (0-based), or
    kill_after_s: float | None = None  # this long after the child said it was ready
    kill_deadline: float | None = None
    points_seen: int = 0
    buffer: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    killed: str | None = None  # where: a KILL_POINT or "random"


def _plan(rng: random.Random, index: int) -> list[list[Any]]:
    own = [200 + 8 * (OWN * index + j) for j in range(OWN)]
    plan = [[kernel, n] for kernel in ("add", "scale") for n in (*SHARED, *own)]
    rng.shuffle(plan)
    return plan


def _spawn(index: int, plan: list[list[Any]], book: Path, logs: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "TUNEBOOK_DIR": str(book),
        "TORTURE_PLAN": json.dumps(plan),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", "import helpers_reliability as h; h.torture_child()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(logs / f"child-{index}.err").open("wb"),
        env=env,
    )


def _run_wave(children: list[Child]) -> None:
    """Answer handshakes and deliver kills until every child has exited."""
    sel = selectors.DefaultSelector()
    for child in children:
        assert child.proc.stdout is not None
        os.set_blocking(child.proc.stdout.fileno(), False)
        sel.register(child.proc.stdout, selectors.EVENT_READ, child)
    open_pipes = len(children)
    while open_pipes:
        now = time.monotonic()
        for child in children:
            due = child.kill_deadline is not None and now >= child.kill_deadline
            if due and child.killed is None and child.proc.poll() is None:
                child.killed = "random"
                child.proc.send_signal(signal.SIGKILL)
        for key, _ in sel.select(timeout=0.01):
            child = key.data
            chunk = child.proc.stdout.read()
            if not chunk:
                sel.unregister(child.proc.stdout)
                open_pipes -= 1
                continue
            child.buffer += chunk
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                _handle(child, line)
    for child in children:
        child.proc.wait(timeout=60)


def _handle(child: Child, line: bytes) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        return  # something else printed to stdout
    if not isinstance(event, dict):
        return
    child.events.append(event)
    if event.get("ev") == "ready" and child.kill_after_s is not None:
        child.kill_deadline = time.monotonic() + child.kill_after_s
    if event.get("ev") != "point":
        return
    if child.killed is None and child.kill_at_point == child.points_seen:
        child.killed = str(event["at"])
        child.proc.send_signal(signal.SIGKILL)
        return
    child.points_seen += 1
    if child.killed is None:
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write(b"go\n")
            child.proc.stdin.flush()
        except BrokenPipeError:  # killed at a random moment meanwhile
            pass


@pytest.mark.slow
@pytest.mark.once  # the book's writes under kills: ours, whatever the Triton; tuning is tested on every one
def test_concurrent_tuning_with_kills_loses_nothing(book_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    logs = tmp_path / "logs"
    logs.mkdir()
    book_dir.mkdir(parents=True, exist_ok=True)
    everyone: list[Child] = []
    for size in WAVES:
        children = []
        for _ in range(size):
            index = len(everyone) + len(children)
            plan = _plan(rng, index)
            children.append(Child(index, plan, _spawn(index, plan, book_dir, logs)))
        # Most of each wave dies: every other victim at a random moment, the others inside
        # one of the writes every child surely makes (its own keys: 2 x OWN writes, 3
        # handshakes each), at each KILL_POINT in turn.
        victims = rng.sample(children, size * 6 // 10)
        for i, victim in enumerate(victims):
            if i % 2:
                victim.kill_after_s = rng.uniform(0.0, 0.8)
            else:
                write = rng.randrange(0, 2 * OWN)
                victim.kill_at_point = len(KILL_POINTS) * write + (i // 2) % len(KILL_POINTS)
        _run_wave(children)
        everyone.extend(children)

    # ---- what the children saw
    for child in everyone:
        stderr = (logs / f"child-{child.index}.err").read_text()
        bad = [e for e in child.events if e.get("ev") in ("wrong-answer", "not-persisted")]
        assert not bad, f"child {child.index}: {bad}\n{stderr}"
        if child.killed is None:
            assert child.proc.returncode == 0, f"child {child.index} failed:\n{stderr}"
            assert child.events[-1]["ev"] == "done"
        else:
            assert child.proc.returncode == -signal.SIGKILL

    # ---- what the book holds: every file parses and validates, no result is torn
    docs: dict[str, Document] = {}
    for path in book_files(book_dir):
        doc = read_document(path)
        assert doc is not None, f"{path.name} does not parse"
        docs[path.name if path.suffix == ".json" else path.name + ".json"] = doc
    assert len(docs) == 2, sorted(docs)
    for doc in docs.values():
        for entry in doc.entries.values():
            assert len(entry.results) == len(TABLE)
            for result in entry.results.values():
                assert result.ms is not None and result.ms[0] == TABLE[result.config["kwargs"]["BLOCK"]]

    reported = [(c.index, e) for c in everyone for e in c.events if e.get("ev") == "persisted"]
    lost = []
    for index, event in reported:
        entry = docs[event["file"]].entries.get(event["key"])
        stored = {cid: list(r.ms or ()) for cid, r in entry.results.items()} if entry else None
        if stored != event["results"]:
            lost.append((index, event["key"], stored))
    reported_keys = {(e["file"], e["key"]) for _, e in reported}
    reported_n = {(f, json.loads(k)[0]) for f, k in reported_keys}

    # ---- temp files of killed writers break nothing: this process serves every key, and a
    # key some child reported is served from the book without benchmarking.
    temps = [p.name for p in book_dir.rglob("*.tmp")]
    replay = Replay(TABLE)
    rebenchmarked_reported = 0
    for name, fn in (("add", add_kernel), ("scale", scale_kernel)):
        tuner = tunebook.autotune(
            block_configs(*TABLE), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
        )(fn)
        for n in sorted({n for c in everyone for kernel, n in c.plan if kernel == name}):
            before = len(replay.measured)
            x, y, out = vectors(n, seed=n)
            if name == "add":
                tuner[grid_1d(n)](x, y, out, n)
                assert bool((out == x + y).all())
            else:
                tuner[grid_1d(n)](x, out, n, 3.0)
                assert bool((out == x * 3.0).all())
            if (tuner.page().file_name, n) in reported_n:
                rebenchmarked_reported += len(replay.measured) - before

    kills = [c.killed for c in everyone if c.killed]
    mid_write = [k for k in kills if k in KILL_POINTS]
    summary = {
        "seed": SEED,
        "processes": len(everyone),
        "at_once": max(WAVES),
        "kills": len(kills),
        "mid_write_kills": len(mid_write),
        "mid_write_kills_by_point": {p: mid_write.count(p) for p in KILL_POINTS},
        "random_kills": kills.count("random"),
        "persisted_reports": len(reported),
        "distinct_keys_reported": len(reported_keys),
        "entries_in_book": sum(len(d.entries) for d in docs.values()),
        "temp_files_left": len(temps),
        "configs_rebenchmarked_for_reported_keys": rebenchmarked_reported,
        "lost_entries": len(lost),
    }
    print("\nTORTURE " + json.dumps(summary))
    assert not lost, lost
    assert rebenchmarked_reported == 0
    assert mid_write, "no kill landed inside a write: the handshakes were not reached"
