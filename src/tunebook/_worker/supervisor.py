"""The supervisor of tuning worker processes (``tunebook tune`` and ``isolate=True``).

A *job* tunes one key of one kernel: ``{"module", "attr", "key_text", "call", "key"}``.
The worker (``python -m tunebook._worker -``, child.py: its jobs on stdin) imports the kernel by module and
attribute, rebuilds the call (the kernel's ``inputs=`` factory, else tensors of the
recorded layout and the recorded grids), and calls the kernel in ``tune`` mode, which
measures and persists as usual. It prints one JSON line per event on stdout:

    {"event": "job", "index": 3}
    {"event": "candidate", "index": 3, "key_text": "...", "key": [...], "cid": "...", "config": {...}}
    {"event": "done", "index": 3, "benchmarked": 48, "seconds": 3.1}
    {"event": "error", "index": 3, "reason": "..."}

The supervisor (``run_jobs``) starts workers, follows their events, and when a worker
dies (illegal memory access, device-side assert, segfault) or stays silent past the
timeout (a hang), records the candidate it was measuring as failed — with the reason — in
the book, starts a new worker, and carries on with the remaining jobs. The config is never
retried, and the caller's process and CUDA context are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._failures import reason_found_as_reference

DEFAULT_TIMEOUT_S = 300.0


# ------------------------------------------------------------------- the supervisor


@dataclass
class JobReport:
    index: int
    status: str = "pending"  # pending | running | done | error
    benchmarked: int = 0
    crashed: list[str] = field(default_factory=list)  # config ids recorded as failed by us
    reason: str = ""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def events_of(stream: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of a worker's stdout; other lines (the kernel's own prints) are skipped."""
    for line in stream:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def keep_tail(stream: Iterable[str] | None, tail: list[str], lines: int = 20) -> None:
    """Keep the last ``lines`` lines of a worker's stderr in ``tail`` (its last words)."""
    for line in stream or ():
        tail.append(line)
        del tail[:-lines]


def run_jobs(
    jobs: Sequence[dict[str, Any]],
    record_failure: Callable[[dict[str, Any], str], None],
    *,
    workers: int = 1,
    devices: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    on_event: Callable[[int, dict[str, Any]], None] | None = None,
    max_restarts: int = 100,
) -> dict[int, JobReport]:
    """Run ``jobs`` over ``workers`` processes; return a report per job index.

    ``record_failure(candidate_event, reason)`` persists the candidate that took its worker
    down (the event has the key's ``key_text`` and ``key``, the ``cid`` and its ``config``).
    ``devices`` (one per worker) sets CUDA_VISIBLE_DEVICES for each.
    """
    jobs = [{**job, "index": i} for i, job in enumerate(jobs)]
    reports = {job["index"]: JobReport(job["index"]) for job in jobs}
    queues = [jobs[w::workers] for w in range(max(1, workers))]
    lock = threading.Lock()
    stop = threading.Event()  # the caller was interrupted: every worker goes, no new one starts

    def supervise(slot: int, queue: list[dict[str, Any]], ended: threading.Event) -> None:
        try:
            restarts = 0
            while queue and restarts <= max_restarts and not stop.is_set():
                remaining = _run_one_worker(
                    slot, queue, reports, record_failure, devices, timeout_s, env, on_event, lock, stop
                )
                if remaining and remaining == queue:
                    restarts += 1  # no progress at all: count it, so a broken setup cannot loop forever
                queue = remaining
            for job in queue:
                reports[job["index"]].status = "error"
                reports[job["index"]].reason = reports[job["index"]].reason or "worker kept failing"
        finally:
            ended.set()

    slots = [(i, q, threading.Event()) for i, q in enumerate(queues) if q]
    started: list[threading.Event] = []
    try:
        for slot in slots:  # started inside: Ctrl-C may land while a later one starts
            started.append(slot[2])
            threading.Thread(target=supervise, args=slot, daemon=True).start()
        for ended in started:
            ended.wait()
    except BaseException:
        # Ctrl-C lands here, in the caller's thread: the supervising threads would carry on
        # (a REPL or a server that catches it then had two workers tuning one key, each
        # slowing the other's timings). They stop their workers.
        # (Waited for by events: a join that Ctrl-C interrupted marks its thread ended.)
        stop.set()
        for ended in started:
            ended.wait(timeout=10)
        raise
    return reports


def _send_jobs(stdin: Any, queue: list[dict[str, Any]]) -> None:
    """Write the jobs to a worker's stdin and close it (on a thread: a worker that has not
    read them yet must not stall the supervisor's watch); a worker already gone is fine."""
    with contextlib.suppress(OSError, ValueError):
        with stdin:
            stdin.write(json.dumps({"jobs": queue}))


def _run_one_worker(
    slot: int,
    queue: list[dict[str, Any]],
    reports: dict[int, JobReport],
    record_failure: Callable[[dict[str, Any], str], None],
    devices: Sequence[str] | None,
    timeout_s: float,
    env: Mapping[str, str] | None,
    on_event: Callable[[int, dict[str, Any]], None] | None,
    lock: threading.Lock,
    stop: threading.Event,
) -> list[dict[str, Any]]:
    """One worker process over ``queue``; returns the jobs still to do if it died."""
    child_env = {**os.environ, **(env or {}), "TUNEBOOK_MODE": "tune", "TUNEBOOK_PROGRESS": "0"}
    if devices:
        child_env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunebook._worker", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
        start_new_session=True,
    )
    current: dict[str, Any] = {}
    finished: set[int] = set()
    progressed = [False]  # a result was reported: a later death is not the job's fault
    last_event = [time.monotonic()]
    stderr_tail: list[str] = []

    threading.Thread(target=keep_tail, args=(proc.stderr, stderr_tail), daemon=True).start()
    # The jobs go on the worker's stdin, not in a file: a file (the recorded calls, their
    # shapes and values) outlived every run killed before its clean-up, one per worker.
    threading.Thread(target=_send_jobs, args=(proc.stdin, queue), daemon=True).start()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for event in events_of(proc.stdout):
            last_event[0] = time.monotonic()
            index = event.get("index")
            if index not in reports:
                continue
            with lock:
                report = reports[index]
                kind = event.get("event")
                if kind == "job":
                    report.status = "running"
                    current.clear()
                    current["index"] = index
                elif kind == "candidate":
                    current.clear()
                    current.update(event)
                elif kind == "result":
                    current.clear()  # measured: a death from here on is not this config's fault
                    progressed[0] = True
                elif kind == "done":
                    report.status = "done"
                    report.benchmarked += int(event.get("benchmarked", 0))  # over restarts
                    finished.add(index)
                    current.clear()
                elif kind == "error":
                    report.status, report.reason = "error", str(event.get("reason", ""))
                    finished.add(index)
                    current.clear()
            if on_event is not None:
                on_event(slot, event)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    timed_out = False
    try:
        while proc.poll() is None:
            time.sleep(0.05)
            if stop.is_set():
                return queue  # the finally below ends the worker; nothing is recorded
            if time.monotonic() - last_event[0] > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    finally:
        # Interrupted (Ctrl-C) or done: never leave a worker running on the GPU.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)

    remaining = [job for job in queue if job["index"] not in finished]
    if not remaining:
        return []
    with lock:
        if "cid" in current:
            index = current["index"]
            reason = (
                f"timed out: no progress for {timeout_s:g} s (a hang), worker killed"
                if timed_out
                else f"the worker process died while running this config ({describe_exit(proc.returncode)})"
            )
            detail = "".join(stderr_tail).strip().splitlines()[-1:] if stderr_tail else []
            if detail and not timed_out:
                reason += f": {detail[0][:300]}"
            if current.get("reference"):  # as the reference search's own failures: off the budget
                reason = reason_found_as_reference(reason)
            record_failure(dict(current), reason)
            reports[index].crashed.append(current["cid"])
            if on_event is not None:
                on_event(slot, {"event": "crash", "index": index, "cid": current["cid"], "reason": reason})
        elif remaining and not progressed[0]:
            # Died before measuring anything (an import error, a broken inputs= factory...):
            # the first unfinished job takes the blame, so the queue always moves on. (After
            # progress, e.g. a worker that ended itself after a config broke its CUDA context,
            # the next worker simply resumes.)
            index = remaining[0]["index"]
            reports[index].status = "error"
            tail = "".join(stderr_tail).strip()[-500:]
            if timed_out:  # its start-up (Python, torch, Triton, the kernel's module) counts too
                reports[index].reason = (
                    f"timed out: the worker said nothing for {timeout_s:g} s before measuring anything "
                    "(the timeout covers its start-up too: give a larger one)"
                )
            else:
                died = describe_exit(proc.returncode)
                reports[index].reason = f"worker died ({died}) before measuring: {tail}"
            if on_event is not None:
                on_event(slot, {"event": "error", "index": index, "reason": reports[index].reason})
            remaining = remaining[1:]
        elif on_event is not None:
            last = "".join(stderr_tail).strip().splitlines()[-1:] if stderr_tail else []
            on_event(
                slot,
                {
                    "event": "restart",
                    "index": remaining[0]["index"],
                    "reason": f"worker ended ({describe_exit(proc.returncode)}): "
                    + (last[0][:300] if last else ""),
                },
            )
    return remaining
