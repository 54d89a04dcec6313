"""The driver of a sweep on Ray: actors, the queue, results persisted as they arrive.

    jobs ─► Sweep (schedule.py) ─► units ─► one SweepActor per GPU (actor.py)
                 ▲                              │ isolated worker process (_worker/session.py)
                 └──── results, persisted ◄─────┘ in the driver's book (and Redis), as they come

* **Connect.** An initialized Ray is used as it is; else ``address`` (or ``RAY_ADDRESS``)
  is joined; else a local cluster is started and shut down at the end.
* **One actor per GPU** (``resource``: ``GPU``, or a custom resource that stands for one),
  at most ``gpus``. Each reports the device its worker measures on; actors are grouped by
  it. Several GPU models are refused unless ``each_model`` (every key tuned once per
  model, one book page per model) or ``gpu_model`` (only that model's GPUs are used).
* **A dynamic queue.** Every actor holds at most ``depth`` units (one measuring, one
  waiting), so no GPU idles while another has work, and a lost actor costs at most those,
  which go out again (:meth:`Sweep.lost`); a lost actor is replaced while replacements last.
* **Persisted as they arrive,** in the page of the platform they were measured on (the
  plan names it), through ``Page.record``: the writable directory and the Redis book when
  ``TUNEBOOK_REDIS_URL`` is set. The worker has written each result into its own book
  first, so a driver killed between the two loses nothing on its node; a driver started
  again tells every stored result to the strategies before asking for more.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._book import Entry, Result, now_iso
from .._errors import BookFormatError, TunebookError
from .._jsonio import is_number
from .._optional import require
from .._options import is_int
from .._tuner import doubted_reference_warning
from .._worker import DEFAULT_TIMEOUT_S
from .._worker.isolated import program_paths
from .actor import SweepActor, forwarded_environment
from .schedule import KeySearch, Plan, Sweep, Unit
from .writer import BookWriter, OnResult

log = logging.getLogger("tunebook")

_RUNS = itertools.count()  # sweeps driven by this process (actor names must be unique)

# How long a worker outlives its actor at most (it checks its parent every 0.2 s), with margin.
ORPHAN_EXIT_S = 1.0
# A worker that fails this many units in a row, for reasons of its own, while another worker
# of its model is fine, is retired (a node that cannot import the kernel, say).
RETIRE_AFTER = 2
# How long a replacement for a lost worker may wait to be placed before it is given up.
REPLACEMENT_WAIT_S = 120.0
# Once one worker is ready, how long the sweep waits for the others before it starts
# measuring (they join when placed: a GPU another job holds need not hold up the rest).
START_GRACE_S = 15.0


class SweepError(TunebookError):
    """A sweep that cannot start: no GPUs in the cluster, mixed GPU models, no worker starts."""


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (the ``--ray`` options of ``tunebook tune``)."""

    address: str | None = None  # a Ray address; None: RAY_ADDRESS, else a local cluster
    gpus: int | None = None  # at most this many actors (default: every GPU of the cluster)
    resource: str = "GPU"  # the Ray resource one actor takes one of
    unit_size: int = 8  # configs per unit
    timeout_s: float = DEFAULT_TIMEOUT_S  # seconds without progress before a config counts as hung
    each_model: bool = False  # several GPU models: tune every key on each (one page per model)
    gpu_model: str | None = None  # several GPU models: use only this one
    depth: int = 2  # units an actor holds: one measuring, one waiting
    runtime_env: Mapping[str, Any] | None = None  # for a cluster started or joined here
    start_timeout_s: float = 600.0  # how long to wait for the actors to start

    def __post_init__(self) -> None:
        # Checked before a cluster is started or joined: found later, after the actors
        # started, or never (gpus=-1 waited for workers that none would start).
        if self.gpus is not None and not (is_int(self.gpus) and self.gpus >= 1):
            raise ValueError(f"gpus= must be a whole number of GPUs, 1 or more, or None; found {self.gpus!r}")
        if not (is_int(self.unit_size) and self.unit_size >= 1):
            raise ValueError(
                f"unit_size= must be a whole number of configs, 1 or more; found {self.unit_size!r}"
            )
        if not (is_number(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout= must be seconds, more than 0; found {self.timeout_s!r}")
        if not (isinstance(self.resource, str) and self.resource):
            raise ValueError(f"resource= must name a Ray resource; found {self.resource!r}")


@dataclass(frozen=True)
class SweepProgress:
    """Where a sweep stands: what ``tunebook tune --ray`` shows."""

    keys_done: int
    keys_failed: int
    keys_total: int
    configs_measured: int  # in this run
    configs_left: int | None  # an estimate (None before any key is planned)
    gpus_busy: int
    gpus: int
    eta_s: float | None
    crashed: int


@dataclass(frozen=True)
class KeyReport:
    """How one key (of one job, on one GPU model) ended."""

    job: int
    group: str
    key_text: str
    state: str  # done | failed
    measured: int
    chosen: str | None
    reason: str = ""
    answered: bool = False  # the book had it already
    left_out: int = 0  # configs not measured: their worker was lost MAX_LOSSES times (a rerun measures them)


@dataclass
class SweepReport:
    """What a sweep did: per key, and in all."""

    keys: list[KeyReport] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)  # GPU model -> actors
    crashed: list[str] = field(default_factory=list)  # "key_text cid: reason"
    seconds: float = 0.0
    unsaved: int = 0  # results the book directory refused: held by this process only

    @property
    def measured(self) -> int:
        return sum(k.measured for k in self.keys)

    @property
    def failed(self) -> list[KeyReport]:
        return [k for k in self.keys if k.state != "done"]


@dataclass
class _Slot:
    actor: Any
    group: str
    info: dict[str, Any]
    out: dict[Any, Unit] = field(default_factory=dict)
    failures: int = 0  # units in a row it failed for a reason of its own (another worker ran them)
    successes: int = 0  # units it ran
    last_error: str = ""  # why its last failed unit failed


# What a worker's device record (its platform, less the sweep's timer) holds, as a GPU
# model's name shows it. A platform's identity is all of it: two GPUs that differ in any
# field file their results under different book pages, so they are never one group.
_SHOWN = ("device", "backend", "arch", "sm_count", "runtime", "triton")  # the backend: the name's and arch's
_NAMED = {
    "device": "name",
    "arch": "arch",
    "sm_count": "SM count",
    "runtime": "runtime",
    "triton": "Triton version",
}


def group_name(device: Mapping[str, Any]) -> str:
    """A GPU model as the sweep groups actors: its device record whole (name, arch, SM count,
    runtime, Triton version, and any other field it holds): an H100 PCIe and an H100 SXM, or a
    MIG slice and its whole GPU, are a page each, so a group each.

    >>> group_name({"device": "NVIDIA H200", "arch": "90", "runtime": "cuda 12.8", "triton": "3.6.0"})
    'NVIDIA H200 (arch 90, cuda 12.8, triton 3.6.0)'
    >>> group_name({"device": "H100", "arch": 90, "sm_count": 114, "runtime": "cuda 13.0", "triton": "3.6"})
    'H100 (arch 90, 114 SMs, cuda 13.0, triton 3.6)'
    """
    parts = [f"arch {device.get('arch', '?')}"]
    if "sm_count" in device:
        parts.append(f"{device['sm_count']} SMs")
    parts += [str(device.get("runtime", "?")), f"triton {device.get('triton', '?')}"]
    # Fields this record may gain (a MIG profile, say): shown, so that GPUs that differ
    # there are never one group.
    parts += [f"{k} {v}" for k, v in sorted(device.items()) if k not in _SHOWN]
    return f"{device.get('device', 'unknown')} ({', '.join(parts)})"


def what_differs(devices: Sequence[Mapping[str, Any]]) -> str:
    """The fields of the device records ``devices`` that are not the same in all of them.

    >>> what_differs([{"device": "H100", "sm_count": 132}, {"device": "H100", "sm_count": 114}])
    'SM count'
    """
    fields = sorted(
        {k for d in devices for k in d}, key=lambda k: (list(_NAMED).index(k) if k in _NAMED else 99, k)
    )
    return ", ".join(_NAMED.get(k, k) for k in fields if len({repr(d.get(k)) for d in devices}) > 1)


def choose_groups(
    counts: Mapping[str, int],
    each_model: bool,
    gpu_model: str | None,
    devices: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """The GPU models a sweep tunes on, or :class:`SweepError` saying why not and what to do.
    ``devices``: each group's device record, to say what differs between the groups.

    >>> choose_groups({"H200 (arch 90)": 2}, False, None)
    ['H200 (arch 90)']
    >>> choose_groups({"H200 (arch 90)": 2, "H100 (arch 90)": 4}, False, "H100")
    ['H100 (arch 90)']
    """
    names = sorted(counts)
    if gpu_model is not None:
        picked = [g for g in names if g == gpu_model or g.startswith(gpu_model + " (")]
        if not picked:
            # The full name tunebook printed before group names gained the SM count: a script
            # or CI job pinned to it. Taken where it names exactly one group, and said so.
            picked = [g for g in names if _WITHOUT_SMS.sub("", g) == gpu_model]
            if len(picked) == 1:
                log.warning(
                    "tunebook: --gpu-model %r, a name without the SM count (as tunebook printed it "
                    "before), is taken as the cluster's %r; pass that name from now on",
                    gpu_model,
                    picked[0],
                )
                return picked
            if len(picked) > 1:
                raise SweepError(
                    f"--gpu-model {gpu_model!r} (a name without the SM count, as tunebook printed it "
                    f"before) matches {len(picked)} models of the cluster: {', '.join(picked)}. Pass one "
                    "of those names, or the device name alone for all of them."
                )
            raise SweepError(
                f"no GPU of model {gpu_model!r} in the cluster; it has {_listing(counts)}. Pass one of "
                "those names to --gpu-model."
            )
        return picked
    if len(names) > 1 and not each_model:
        differs = what_differs(list(devices.values())) if devices else ""
        raise SweepError(
            f"the cluster has GPUs of {len(names)} models: {_listing(counts)}"
            + (f" (they differ in {differs})" if differs else "")
            + ". A timing on one model says nothing about another, and each is a book page of its "
            "own, so a sweep does not mix them. Tune every key once per model (one "
            "book page each) with --each-model (each_model=True), or on one model with "
            "--gpu-model NAME (gpu_model=NAME)."
        )
    return names


# The SM count in a group name (``group_name``), which names of earlier releases lacked.
_WITHOUT_SMS = re.compile(r", \d+ SMs(?=[,)])")


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} x {g}" for g, n in sorted(counts.items()))


def run_sweep(
    jobs: Sequence[dict[str, Any]],
    options: SweepOptions = SweepOptions(),
    *,
    on_progress: Callable[[SweepProgress], None] | None = None,
    on_result: OnResult | None = None,
    on_event: Callable[[str], None] | None = None,
    keeps_unsaved: bool = False,
) -> SweepReport:
    """Tune ``jobs`` (``tunebook tune``'s: module, attr, key_text, call, key; ``books``
    optional) over every GPU of a Ray cluster; see the module docstring.

    ``on_result(job, page, key_text, cid, key, result)`` sees every result persisted;
    ``on_event(text)`` lines worth showing (a crashed config, a lost actor).
    ``keeps_unsaved``: the caller keeps what the book refused itself and says where
    (``tunebook tune --ray``): the sweep then does not say they are held by this process only.
    """
    ray = require("ray", feature="tuning on a Ray cluster (--ray)", extra="ray")
    started_here = False
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if options.runtime_env:
            kwargs["runtime_env"] = dict(options.runtime_env)
        reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            where = f"the Ray cluster at {address!r}" if address else "Ray"
            raise SweepError(f"cannot connect to {where}: {_short(exc)}") from exc
        started_here = address in (None, "local")  # a cluster of its own: shut down at the end
    elif options.address:
        raise SweepError(
            f"Ray is already initialized in this process, so the sweep cannot connect to "
            f"{options.address!r}: leave out the address to run on the cluster it is connected to, "
            "or call ray.shutdown() first"
        )
    driver = _Driver(ray, jobs, options, on_progress, on_result, on_event)
    driver.keeps_unsaved = keeps_unsaved
    try:
        return driver.run()
    finally:
        driver.stop()
        if started_here:
            ray.shutdown()


class _Driver:
    def __init__(
        self,
        ray: Any,
        jobs: Sequence[dict[str, Any]],
        options: SweepOptions,
        on_progress: Callable[[SweepProgress], None] | None,
        on_result: OnResult | None,
        on_event: Callable[[str], None] | None,
    ) -> None:
        self.ray, self.jobs, self.options = ray, jobs, options
        self.on_progress = on_progress
        self.keeps_unsaved = False  # the caller keeps the results the book refused (run_sweep)
        self.say = on_event or (lambda text: log.warning("tunebook: %s", text))
        self.remote = ray.remote(SweepActor)
        self.env = forwarded_environment(os.environ, os.getcwd(), program_paths())
        # Through Ray Client the "current node" is the head node, not this machine: every
        # node is another one then, and gets only the settings that are not paths.
        self.node = None if _through_client(ray) else ray.get_runtime_context().get_node_id()
        self.slots: dict[Any, _Slot] = {}  # by the actor's ready() ref's actor
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor
        self.since: dict[Any, float] = {}  # ready() ref -> when its actor was asked for
        self.writer = BookWriter(jobs, on_result)
        self.pages = self.writer.pages
        self.report = SweepReport()
        # unit uid -> (the worker that failed it, its successes then, the unit's key), till it runs
        self.blamed: dict[int, tuple[_Slot, int, int]] = {}
        self.seen: dict[tuple[str, str, str], int] = {}  # (page, key) -> key number that has it
        self.replacements = 0
        self.run_id = next(_RUNS)
        self.first_result: float | None = None
        self.sweep: Sweep | None = None

    # ------------------------------------------------------------------ actors

    def _new_actor(self, number: int) -> None:
        opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
        if self.options.resource == "GPU":
            opts["num_gpus"] = 1
        elif self.options.resource == "CPU":  # the interpreter on a machine without GPUs
            opts["num_cpus"] = 1
        else:
            opts["resources"] = {self.options.resource: 1}
        if self.options.runtime_env:  # also where Ray was initialized without it
            opts["runtime_env"] = dict(self.options.runtime_env)
        name = f"tunebook-sweep-{os.getpid()}-{self.run_id}-{number}"  # tests find the actors by name
        actor = self.remote.options(name=name, **opts).remote(self.env, self.node, self.options.timeout_s)
        ref = actor.ready.remote()
        self.starting[ref] = actor
        self.since[ref] = time.monotonic()

    def _start(self) -> list[str]:
        ray, options = self.ray, self.options
        total = int(ray.cluster_resources().get(options.resource, 0))
        if total < 1:
            raise SweepError(
                f"the Ray cluster has no {options.resource!r} resource ({ray.cluster_resources()}): "
                "start its nodes with GPUs (or declare them: ray start --resources), or pass --ray "
                "the address of a cluster that has them."
            )
        for number in range(min(total, options.gpus or total)):
            self._new_actor(number)
        deadline = time.monotonic() + options.start_timeout_s
        ready: list[tuple[Any, dict[str, Any]]] = []
        problems: list[str] = []
        first: float | None = None
        while self.starting and time.monotonic() < deadline:
            if first is not None and time.monotonic() - first > START_GRACE_S:
                break  # the rest (a GPU another job holds, a node still booting) join when placed
            done, _ = ray.wait(list(self.starting), num_returns=1, timeout=1.0)
            for ref in done:
                actor = self._take_starting(ref)
                try:
                    ready.append((actor, ray.get(ref)))
                    first = first if first is not None else time.monotonic()
                except Exception as exc:
                    problems.append(_short(exc))
                    ray.kill(actor)
        if not ready:
            for actor in self.starting.values():  # never placed
                ray.kill(actor)
            self.starting.clear()
            raise SweepError(
                "no GPU worker started"
                + (f": {problems[0]}" if problems else f" within {options.start_timeout_s:.0f} s")
            )
        counts: dict[str, int] = {}
        devices: dict[str, Mapping[str, Any]] = {}
        for _, info in ready:
            counts[group_name(info["device"])] = counts.get(group_name(info["device"]), 0) + 1
            devices[group_name(info["device"])] = info["device"]
        try:
            groups = choose_groups(counts, options.each_model, options.gpu_model, devices)
        except SweepError:
            for actor, _ in ready:
                ray.kill(actor)
            raise
        for actor, info in ready:
            group = group_name(info["device"])
            if group in groups:
                self.slots[actor] = _Slot(actor, group, info)
            else:
                ray.kill(actor)
        self.report.groups = {g: counts[g] for g in groups}
        return groups

    def stop(self) -> None:
        """Write what is unwritten (also on Ctrl-C), end every actor and its worker, and fold
        the journals of this node's workers into the book (they hold nothing new by then, at
        the end of a sweep; after Ctrl-C, what they finished that did not reach us)."""
        self.writer.flush(force=True)
        closing = [slot.actor.close.remote() for slot in self.slots.values()]
        with contextlib.suppress(Exception):
            self.ray.wait(closing, num_returns=len(closing), timeout=15)
        for actor in [*self.slots, *self.starting.values()]:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor)
        self.slots.clear()
        self.starting.clear()
        self.since.clear()
        self._fold()

    def _fold(self) -> None:
        from .. import _settings
        from .._worker.journal import fold

        fold(_settings.book_dir())

    # ------------------------------------------------------------------ the loop

    def run(self) -> SweepReport:
        start = time.monotonic()
        groups = self._start()
        sweep = self.sweep = Sweep(len(self.jobs), groups, self._persist, unit_size=self.options.unit_size)
        last_progress = 0.0
        while not sweep.finished:
            self._drop_unplaced()
            self._fail_orphaned(sweep)
            self._hand_out(sweep)
            where = {ref: slot for slot in self.slots.values() for ref in slot.out}
            refs = [*where, *self.starting]
            if not refs:
                break
            done, rest = self.ray.wait(refs, num_returns=1, timeout=0.5)
            if done and rest:
                more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
                done += more
            for ref in done:
                if ref in self.starting:
                    self._started(ref, groups)
                elif ref in where and where[ref].actor in self.slots:
                    self._arrived(ref, where[ref], sweep)
            self.writer.flush()
            if self.on_progress is not None and time.monotonic() - last_progress > 0.25:
                self.on_progress(self.progress())
                last_progress = time.monotonic()
        self.writer.flush(force=True)
        if self.on_progress is not None:
            self.on_progress(self.progress())
        # A read-only or full book refuses the writes, with one warning: the sweep said "done"
        # and the results lived only in this process. The report counts them.
        self.report.unsaved = sum(page.unsaved() for page in self.pages.pages.values())
        # Not under `tunebook tune --ray`, which keeps them aside and says where: there this
        # line called them held by this process only (lost with it), and told the user to
        # run the command they were running.
        if self.report.unsaved and not self.keeps_unsaved:
            self.say(
                f"{self.report.unsaved} result(s) could not be written to the book (see the warning above); "
                "they are held by this process only: make the book writable and run the sweep again, "
                "or keep them with `tunebook tune --ray`, which saves them aside"
            )
        self.report.seconds = time.monotonic() - start
        self.report.keys = [self._key_report(k) for k in sweep.keys]
        for key in sweep.keys:
            self._say_doubts(key)
        return self.report

    def _take_starting(self, ref: Any) -> Any:
        """The actor of a ready() ref that answered or is given up (no longer starting)."""
        self.since.pop(ref, None)
        return self.starting.pop(ref)

    def _drop_unplaced(self) -> None:
        """Replacements the cluster could not place in time (their node was the last of its
        GPU model) are given up, so that the keys waiting for them fail instead of hanging."""
        limit = min(self.options.start_timeout_s, REPLACEMENT_WAIT_S)
        for ref in [r for r in self.starting if time.monotonic() - self.since.get(r, 0.0) > limit]:
            self.say(
                f"a GPU worker was not placed within {limit:.0f} s (no free GPU in the cluster); giving it up"
            )
            with contextlib.suppress(Exception):
                self.ray.kill(self._take_starting(ref))

    def _fail_orphaned(self, sweep: Sweep) -> None:
        """Keys of a GPU model with no worker left, and none starting, cannot go on: failed."""
        if self.starting:
            return
        alive = {slot.group for slot in self.slots.values()}
        why = (
            f"the sweep replaced {self.replacements} lost GPU workers, its most (2 a GPU), and has none left "
            "for this GPU model: run the sweep again to go on (nothing measured is measured twice)"
            if self.replacements >= self._most_replacements()
            else "its nodes were lost"
        )
        for key in sweep.keys:
            if not key.finished and key.group not in alive:
                key.state = "failed"
                key.reason = f"no GPU of its model ({key.group}) is left in the cluster: {why}"

    def _hand_out(self, sweep: Sweep) -> None:
        # A worker that just failed a unit for a reason of its own gets no more while another
        # of its model is fine: a broken node must not drain the queue (each unit it took
        # would fail in milliseconds).
        self._forgive_finished(sweep)
        fine = {slot.group for slot in self.slots.values() if not self._held_back(slot)}
        for slot in self.slots.values():
            if self._held_back(slot) and slot.group in fine:
                continue
            while len(slot.out) < self.options.depth:
                unit = sweep.next_unit(slot.group)
                if unit is None:
                    break
                key = sweep.keys[unit.key]
                job = self.jobs[key.job]
                if unit.kind == "plan":
                    ref = slot.actor.plan.remote({**job, "judge": True} if unit.judge else job)
                else:
                    ref = slot.actor.measure.remote(job, list(unit.cids), unit.full, key.any_ok)
                slot.out[ref] = unit

    def _started(self, ref: Any, groups: Sequence[str]) -> None:
        actor = self._take_starting(ref)
        try:
            info = self.ray.get(ref)
        except Exception as exc:
            self.say(f"a replacement GPU worker did not start: {_short(exc)}")
            self.ray.kill(actor)
            return
        group = group_name(info["device"])
        if group not in groups:
            self.ray.kill(actor)
            return
        self.slots[actor] = _Slot(actor, group, info)

    def _arrived(self, ref: Any, slot: _Slot, sweep: Sweep) -> None:
        unit = slot.out.pop(ref)
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._lost(slot, unit, sweep, _short(exc))
            return
        except Exception as exc:  # the actor's method raised: a bug, not the config's doing
            self._unit_error(slot, unit, sweep, f"the GPU worker failed: {_short(exc)}")
            return
        if unit.kind == "plan" and "error" in value:
            self._unit_error(slot, unit, sweep, f"could not rebuild the call: {value['error']}")
            return
        if unit.kind == "measure" and value.get("error") and not value.get("results"):
            self._unit_error(slot, unit, sweep, str(value["error"]))
            return
        slot.failures = 0
        slot.successes += 1
        blamed = self.blamed.pop(unit.uid, None)
        if blamed is not None:  # it ran here: the first worker's fault, unless it was this one
            self._confirmed(*blamed[:2], sweep, elsewhere=blamed[0] is not slot)
        if unit.kind == "plan":
            self._planned(unit, value, sweep)
            return
        results: dict[str, tuple[Result | None, bool]] = {}
        for cid, item in value.get("results", {}).items():
            raw = item.get("result")
            try:
                result = Result.from_json(raw, f"result of {cid}") if raw is not None else None
            except BookFormatError as exc:
                result = Result(dict(raw.get("config", {})), None, f"unreadable result: {exc}", now_iso())
            results[cid] = (result, bool(item.get("unexpected")))
        key = sweep.keys[unit.key]
        for cid in value.get("crashed", []):
            crashed = results.get(cid, (None, False))[0]
            reason = (crashed.error or "") if crashed is not None else ""
            self.report.crashed.append(f"{key.plan.key_text if key.plan else ''} {cid}: {reason}")
            key_text = key.plan.key_text if key.plan else ""
            self.say(f"{_where(slot)}: {key_text[:40]} {cid}: {reason}")
        sweep.measured(unit, results, error=value.get("error"), seconds=float(value.get("seconds", 0.0)))

    def _unit_error(self, slot: _Slot, unit: Unit, sweep: Sweep, reason: str) -> None:
        """A unit the worker failed for a reason of its own: it goes out once more (to another
        worker of the model, where there is one: this one gets nothing new meanwhile). Where
        it runs, the first worker's failure was the worker's; where it fails again, the key's
        (a call its ``inputs=`` cannot build), and neither worker is blamed. A worker that
        failed RETIRE_AFTER units in a row that others then ran, while another is fine, is
        retired (bad keys alone once retired healthy workers, one after another)."""
        # Failed on a second worker: the key's fault; the first is blamed for it no more.
        self.blamed.pop(unit.uid, None)
        if sweep.retry(unit, f"{reason} (on {_where(slot)})"):
            slot.last_error = reason
            self.blamed[unit.uid] = (slot, slot.successes, unit.key)

    def _suspect(self, slot: _Slot) -> int:
        """Units ``slot`` failed that have not run since: its fault, or their keys'?"""
        return sum(1 for blamed, _, _ in self.blamed.values() if blamed is slot)

    def _held_back(self, slot: _Slot) -> bool:
        return bool(slot.failures or self._suspect(slot))

    def _forgive_finished(self, sweep: Sweep) -> None:
        """Units whose key ended (failed, decided or given up) never run again: their first
        worker is not held in suspicion for them (it would get no unit for the rest of the run)."""
        for uid, (_, _, key) in list(self.blamed.items()):
            if sweep.keys[key].finished:
                del self.blamed[uid]

    def _confirmed(self, slot: _Slot, successes_then: int, sweep: Sweep, *, elsewhere: bool) -> None:
        """A unit ``slot`` failed has run (``elsewhere``: on another worker): the failure was
        the worker's, unless it has run units since (a passing trouble) or ran this one itself."""
        if not elsewhere or slot.successes > successes_then:
            return
        slot.failures += 1
        peers = [
            s
            for s in self.slots.values()
            if s.group == slot.group and s is not slot and not self._held_back(s)
        ]
        if slot.failures >= RETIRE_AFTER and peers and slot.actor in self.slots:
            reason = slot.last_error
            self.slots.pop(slot.actor, None)
            units = list(slot.out.values())
            slot.out.clear()
            self.say(
                f"retired the GPU worker on {_where(slot)}: its last {slot.failures} units failed and ran "
                f"on other workers ({reason}); {len(units)} unit(s) go to the other workers"
            )
            with contextlib.suppress(Exception):
                self.ray.kill(slot.actor)
            for held in units:
                sweep.lost(held, reason, None)

    def _planned(self, unit: Unit, value: Mapping[str, Any], sweep: Sweep) -> None:
        key = sweep.keys[unit.key]
        plan = Plan.from_json(value["plan"])
        key.plan = plan
        page = self.pages.of(key)
        page.refresh()
        known = page.get(plan.key_text)
        theirs = value["plan"].get("known")
        if theirs is not None:  # what the planning worker's own book holds (another node's)
            try:
                known = page.record(plan.key_text, Entry.from_json(theirs, "the worker's book"))
            except BookFormatError:
                pass
        name = (page.file_name, plan.key_text, key.group)
        twin = self.seen.setdefault(name, key.number)
        same_as = sweep.keys[twin].job if twin != key.number else None  # bucketed keys: tuned once
        sweep.planned(unit, plan, known, same_as=same_as, settled=page.settled(plan.key_text))

    def _lost(self, slot: _Slot, unit: Unit, sweep: Sweep, reason: str) -> None:
        """The actor is gone: its units go out again, and a new actor takes its place."""
        self.slots.pop(slot.actor, None)
        units = [unit, *slot.out.values()]
        slot.out.clear()
        self.say(f"lost the GPU worker on {_where(slot)} ({reason}); {len(units)} unit(s) go out again")
        with contextlib.suppress(Exception):  # "unavailable for the moment" is an actor error too:
            self.ray.kill(slot.actor)  # end it, so it measures no unit that goes out again
        # Its worker ends within a fraction of a second of it (child.py), between two results;
        # then its journal holds every result it finished, and goes into the book here.
        time.sleep(ORPHAN_EXIT_S)
        self._fold()
        for lost in units:
            key = sweep.keys[lost.key]
            known = None
            if key.plan is not None:
                page = self.pages.of(key)
                page.refresh()  # the worker wrote what it measured before it went
                known = page.get(key.plan.key_text)
            sweep.lost(lost, reason, known)
        if self.replacements < self._most_replacements():
            self.replacements += 1
            self._new_actor(1000 + self.replacements)
        else:
            self.say(f"not replacing it: {self.replacements} lost workers replaced already, the sweep's most")

    def _most_replacements(self) -> int:
        # A cluster that keeps killing workers (a bad node, a memory limit) is not fed forever.
        return 2 * max(1, sum(self.report.groups.values()))

    # ------------------------------------------------------------------ persisting, reporting

    def _persist(self, key: KeySearch, fresh: dict[str, Result], chosen: str | None, seconds: float) -> None:
        """News from the schedule for the book, queued; the loop's next flush writes them."""
        if fresh and self.first_result is None:
            self.first_result = time.monotonic()
        self.writer.queue(key, fresh, chosen, seconds)

    def progress(self) -> SweepProgress:
        sweep = self.sweep
        assert sweep is not None
        keys = sweep.keys
        measured = sum(k.measured for k in keys)
        planned = [k for k in keys if k.strategy is not None]
        unplanned = sum(1 for k in keys if k.plan is None and not k.finished)
        left: int | None = None
        if planned:
            average = sum(k.cap() for k in planned) / len(planned)
            left = sum(k.remaining() for k in keys) + round(average * unplanned)
        eta = None
        if left is not None and self.first_result is not None and measured:
            rate = measured / max(1e-6, time.monotonic() - self.first_result)
            eta = left / rate
        return SweepProgress(
            keys_done=sum(1 for k in keys if k.state == "done"),
            keys_failed=sum(1 for k in keys if k.state == "failed"),
            keys_total=len(keys),
            configs_measured=measured,
            configs_left=left,
            gpus_busy=sum(1 for s in self.slots.values() if s.out),
            gpus=len(self.slots),
            eta_s=eta,
            crashed=len(self.report.crashed),
        )

    def _say_doubts(self, key: KeySearch) -> None:
        """The warning that a key's reference config may itself be wrong (check=), which no
        worker's warning brings here: said from what its search decided on, as tune_key says it."""
        plan = key.plan
        if key.state != "done" or key.answered or plan is None:
            return
        text = doubted_reference_warning(key.results, plan.ids, self.pages.of(key).kernel.name, plan.key)
        if text:
            self.say(text.removeprefix("tunebook: "))

    def _key_report(self, key: KeySearch) -> KeyReport:
        job = self.jobs[key.job]
        return KeyReport(
            job=key.job,
            group=key.group,
            key_text=key.plan.key_text if key.plan is not None else str(job.get("key_text", "")),
            state="done" if key.state == "done" else "failed",
            measured=key.measured,
            chosen=key.chosen,
            reason=key.reason,
            answered=key.answered,
            left_out=len(key.left_out),
        )


def reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address whose port does not answer is a SweepError now: Ray itself
    waits for it without end (a mistyped host or port sat at "starting the GPU workers" for
    minutes, and Ctrl-C took 30 s). Other forms (``auto``, ``local``, ``ray://``) are Ray's."""
    if not address or "://" in address or address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(
            f"the Ray address {address!r} is not host:port, ray://host:port, auto or local; the head "
            "node's address is its host and GCS port (6379 by default): --ray head:6379"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SweepError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); check the head node's host and "
            "its GCS port (6379 by default), or leave --ray's address out to start a local cluster"
        ) from None


def _through_client(ray: Any) -> bool:
    """Whether this process reaches the cluster through Ray Client (``ray://``). Connecting
    that way imports ``ray.util.client``; importing it only to ask costs seconds (gRPC)."""
    module = sys.modules.get("ray.util.client")
    client = getattr(module, "ray", None)
    return bool(client is not None and client.is_connected())


def _where(slot: _Slot) -> str:
    gpu = slot.info.get("gpu", "")
    return f"{slot.info.get('host', '?')}" + (f" GPU {gpu}" if gpu else "")


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
