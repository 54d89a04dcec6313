"""A long-lived isolated worker: one process that measures unit after unit, restarted when a
config takes it down.

:class:`WorkerSession` runs ``python -m tunebook._worker --serve`` (``child.py``, requests in
``units.py``) and sends it one request at a time. Starting a worker costs seconds (torch,
Triton, the kernel's module, a GPU context), a unit of a few configs a fraction of that,
so one worker serves many units; isolation is kept all the same:

* a worker that **dies** while measuring a config (segfault, illegal memory access, a
  device-side assert) or stays **silent** past ``timeout_s`` (a hang, then killed) costs
  that config: it is returned as failed with the reason, recorded in the book by the next
  worker, and never retried; the rest of the unit is measured in a fresh worker; the same
  for a config launched as ``check=``'s would-be reference, which the key's later
  reference searches in this session pass over;
* a worker that ends itself after a failed config left its GPU context unusable (exit
  code 3, ``child.exit_if_gpu_broken``) has already reported that config; the next one
  carries on;
* a worker that dies before measuring anything, three times in a row, fails the unit with
  its last words (an import error, a broken ``inputs=``), so a broken setup cannot loop.

Not thread-safe: one session belongs to one caller (a Ray actor serves one unit at a time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._book import now_iso
from .._failures import reason_found_as_reference
from .supervisor import DEFAULT_TIMEOUT_S, describe_exit, events_of, keep_tail

_DEATHS_BEFORE_GIVING_UP = 3


@dataclass
class Measured:
    """What a unit's measurement brought back.

    ``results``: per config id, ``{"result": <Result JSON> or None (skipped), "unexpected":
    bool}``, crashed configs included (their failure, with the reason). ``crashed``: the
    ids of configs that took a worker down or hung. ``error``: why the rest of the unit
    could not be measured (its configs have no result), or None.
    """

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)
    error: str | None = None
    restarts: int = 0


class WorkerFailed(Exception):
    """A request the worker could not answer (the reason is the message)."""


class WorkerSession:
    """One isolated worker process at a time, started on first use (see the module docstring)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.env = {**os.environ, **(env or {}), "TUNEBOOK_MODE": "tune", "TUNEBOOK_PROGRESS": "0"}
        self.timeout_s = timeout_s
        self.device: dict[str, Any] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self._ids = itertools.count(1)
        # a kernel's key (_kernel_key) -> configs that took a worker down as check='s
        # reference there (passed over then)
        self._not_references: dict[tuple[str, str, str], set[str]] = {}

    # ------------------------------------------------------------------ requests

    def start(self) -> dict[str, Any]:
        """Start the worker if none runs; return its device (the ``ready`` event's)."""
        if self._proc is not None and self._proc.poll() is None:
            return self.device
        self.close()
        self._events = queue.Queue()
        self._stderr = []
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tunebook._worker", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,  # a hang is killed with its whole process group
        )
        threading.Thread(target=self._read_stdout, args=(self._proc, self._events), daemon=True).start()
        threading.Thread(target=keep_tail, args=(self._proc.stderr, self._stderr), daemon=True).start()
        status, event = self._wait(lambda event: None, ("ready",))
        if status != "ready":
            raise WorkerFailed(f"the worker did not start: {status}")
        self.device = dict(event.get("device", {}))
        return self.device

    def plan(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """The key's plan (``units.plan``); raises :class:`WorkerFailed` with the reason."""
        plans: list[dict[str, Any]] = []
        launched: dict[str, Any] = {}  # check='s would-be reference being run for the plan

        def keep(event: dict[str, Any]) -> None:
            if "plan" in event:
                plans.append(event["plan"])
            elif event.get("event") == "candidate":
                launched.clear()
                launched.update(event)

        status, deaths, references = "not started", 0, 0
        while deaths < _DEATHS_BEFORE_GIVING_UP:
            launched.clear()
            request = {"op": "plan", "job": dict(job), "not_references": self._passed_over(job)}
            status, event = self._request(request, keep)
            if status == "done" and plans:
                return plans[0]
            if status == "error":
                raise WorkerFailed(str(event.get("reason", "")))
            if not self._blamed_reference(job, launched, event, Measured()):
                deaths += 1
            else:
                references += 1
                if references >= _DEATHS_BEFORE_GIVING_UP:
                    raise WorkerFailed(_references_down(references, status))
        raise WorkerFailed(f"planning the key, the worker kept dying: {status}")

    def measure(
        self, job: Mapping[str, Any], cids: Sequence[str], *, full: bool = False, ok_known: bool = False
    ) -> Measured:
        """Measure ``cids`` of the job's key, surviving configs that take the worker down."""
        unit = _Unit(list(cids))
        deaths = references = 0
        while unit.remaining:
            unit.current.clear()
            unit.progressed = False
            ok = ok_known or any(_ran(r) for r in unit.out.results.values())
            request = {
                "op": "measure",
                "job": dict(job),
                "cids": unit.remaining,
                "full": full,
                "ok_known": ok,
                "not_references": self._passed_over(job),
            }
            status, event = self._request(request, unit.follow)
            if status == "done":
                break
            if status == "error":
                unit.out.error = str(event.get("reason", ""))
                break
            unit.out.restarts += 1
            cid = unit.current.get("cid")
            references = 0 if unit.progressed else references
            if self._blamed_reference(job, unit.current, event, unit.out):
                if cid in unit.remaining:  # a config of the unit: that was its measurement
                    unit.remaining.remove(cid)
                references += 1
                if references >= _DEATHS_BEFORE_GIVING_UP and not unit.progressed:
                    unit.out.error = _references_down(references, status)
                    break
            elif cid in unit.remaining:
                self._blame(job, unit.current, event, unit.out)
                unit.remaining.remove(cid)
            elif not unit.progressed:
                deaths += 1
                if deaths >= _DEATHS_BEFORE_GIVING_UP:
                    unit.out.error = f"the worker died {deaths} times before measuring anything: {status}"
                    break
        return unit.out

    def close(self) -> None:
        """End the worker (and anything it started)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    # ------------------------------------------------------------------ internals

    def _passed_over(self, job: Mapping[str, Any]) -> list[str]:
        """The configs the key's reference searches here pass over (``_blamed_reference``)."""
        return sorted(self._not_references.get(_kernel_key(job), ()))

    def _blamed_reference(
        self, job: Mapping[str, Any], launched: dict[str, Any], gone: dict[str, Any], out: Measured
    ) -> bool:
        """Whether the worker went down on check='s would-be reference (the config it named
        last, ``launched``): then that is its failure (``_blame``), and the key's next
        reference searches here pass it over (they would go down on it again)."""
        if not launched.get("reference") or "cid" not in launched:
            return False
        self._blame(job, launched, gone, out)
        self._not_references.setdefault(_kernel_key(job), set()).add(launched["cid"])
        return True

    def _blame(
        self, job: Mapping[str, Any], candidate: dict[str, Any], gone: dict[str, Any], out: Measured
    ) -> None:
        """The config ``candidate`` took the worker down: a failure, recorded by the next worker."""
        cid = candidate["cid"]
        if gone.get("hung"):
            reason = f"timed out: no progress for {self.timeout_s:.0f} s (a hang), worker killed"
        else:
            reason = f"the worker process died while running this config ({gone.get('exit', '')})"
            reason += f": {gone['detail']}" if gone.get("detail") else ""
        if candidate.get("reference"):  # as the reference search's own failures: off the budget
            reason = reason_found_as_reference(reason)
        failure = {"config": candidate.get("config", {}), "ms": None, "error": reason[:2000], "at": now_iso()}
        out.results[cid] = {"result": failure, "unexpected": False}
        out.crashed.append(cid)
        request = {
            "op": "record",
            "job": dict(job),
            "cid": cid,
            "config": failure["config"],
            "reason": reason,
        }
        with contextlib.suppress(WorkerFailed):
            self._request(request, lambda event: None)  # the driver records it too, if this fails

    def _request(
        self, request: dict[str, Any], on_event: Callable[[dict[str, Any]], None]
    ) -> tuple[str, dict[str, Any]]:
        """Send one request; ("done" | "error" | why the worker is gone, the last event)."""
        self.start()
        assert self._proc is not None and self._proc.stdin is not None
        rid = next(self._ids)
        try:
            self._proc.stdin.write(json.dumps({**request, "id": rid}) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # it died meanwhile: _wait says how
        return self._wait(on_event, ("done", "error"), rid)

    def _wait(
        self, on_event: Callable[[dict[str, Any]], None], ends: tuple[str, ...], rid: int | None = None
    ) -> tuple[str, dict[str, Any]]:
        proc = self._proc
        assert proc is not None
        last = time.monotonic()
        while True:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() - last > self.timeout_s:
                    self.close()
                    return f"silent for {self.timeout_s:.0f} s (a hang), killed", {"hung": True}
                continue
            if event is None:  # stdout closed: the worker is gone
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                words = "".join(self._stderr).strip().splitlines()[-1:]
                gone = {"exit": describe_exit(proc.returncode), "detail": words[0][:300] if words else ""}
                self.close()
                return f"the worker process died ({gone['exit']}): {gone['detail']}", gone
            last = time.monotonic()
            if rid is not None and event.get("id") != rid:
                continue  # a late line of an earlier request
            on_event(event)
            if event.get("event") in ends:
                return str(event["event"]), event

    @staticmethod
    def _read_stdout(proc: subprocess.Popen[str], events: queue.Queue[dict[str, Any] | None]) -> None:
        assert proc.stdout is not None
        for event in events_of(proc.stdout):
            events.put(event)
        events.put(None)


@dataclass
class _Unit:
    """A unit being measured: what is left, the config in the worker's hands, what came back."""

    remaining: list[str]
    current: dict[str, Any] = field(default_factory=dict)
    progressed: bool = False
    out: Measured = field(default_factory=Measured)

    def follow(self, event: dict[str, Any]) -> None:
        if event.get("event") == "candidate":
            self.current.clear()
            self.current.update(event)
        elif event.get("event") == "result" and event.get("cid") in self.remaining:
            self.current.clear()
            self.progressed = True
            cid = event["cid"]
            self.out.results[cid] = {
                "result": event.get("result"),
                "unexpected": bool(event.get("unexpected")),
            }
            self.remaining.remove(cid)


def _kernel_key(job: Mapping[str, Any]) -> tuple[str, str, str]:
    """A job's kernel and key: two kernels with the same configs and key text are two keys."""
    return (str(job.get("module")), str(job.get("attr")), str(job.get("key_text")))


def _references_down(n: int, status: str) -> str:
    """Why a plan or unit stops after ``n`` would-be references in a row took workers down."""
    return (
        f"{n} configs in a row took the worker down as check='s reference ({status}): the call "
        "itself, not a config, may hang or crash (its inputs=, or a lock the worker's inputs "
        "leave unset); each was recorded as failed"
    )


def _ran(entry: Mapping[str, Any]) -> bool:
    result = entry.get("result")
    return isinstance(result, dict) and result.get("ms") is not None and not result.get("error")
