"""The sweep's queue: every key's search, handed out in small units to whichever worker is free.

A *key search* is one job (a key of a kernel) on one platform group (a GPU model). It goes
``new -> planning -> search -> confirm -> done`` (or ``failed``), and yields units:

* **plan** — a worker of the group rebuilds the call and lists the candidates, the
  strategy, the budget and the hints (``_worker/units.py``), so that every later unit of
  the key runs on the same candidates;
* **measure** — up to ``unit_size`` candidates, asked of the key's strategy. A strategy
  keeps asked-but-not-told candidates *pending* (``_search/_base.py``), so asking again
  while units are out hands the next ones to the next free worker; ``ask`` returning
  ``[]`` while units are out means "wait for their results" (``neighbors`` climbs only from
  measured points), and with none out, that the search converged;
* **confirm** — measure units with ``full=True``: the contenders ``_tuner.contenders``
  names (the fastest few near the best, and hinted configs within the tie tolerance) that
  only have a quick measurement, the function ``tune_key`` confirms by; then the key is
  decided with the same tie-aware choice and the decision persisted.

Rules that keep a sweep equal to ``tune_key`` run key by key:

* **Budget across workers.** ``max_configs`` counts results *and* pending candidates, so
  five workers never overshoot it; ``max_seconds`` runs from the key's first unit, and no
  unit is handed out after it.
* **Nothing measured twice.** Known results (the book's, or an earlier run's) are told
  before the first ask; a unit whose worker was lost is handed out again with only the
  configs that still lack a result (:meth:`Sweep.lost`), at most ``MAX_LOSSES`` times,
  after which its configs are left out of this run, not recorded: a worker is lost to the
  cluster (a preemption, an OOM kill of the actor, ``ray.kill``) far more often than to a
  config (a config that crashes is caught by the worker's own process and recorded as
  such), and a config recorded as failed is never measured again: the key could keep a
  slower winner for good. A later run measures them.
* **Failures are data,** except a failure that points at the call rather than the config
  (``unexpected``) while nothing of the key has run: it is held back, no new unit of the
  key goes out, and if the units out bring nothing that runs either, the key fails with
  that reason and nothing is persisted (``tune_key`` raises the same way).
* **Wrong results judged again as a miss judges them.** A key whose wrong results under
  ``check=`` were judged under other settings or another reference than its workers judge
  now (``_failures.stale_under``, from the book and the plan's ``settings``) is not answered
  from the book; a second plan (``Unit.judge``) runs its reference on a worker, and only if
  that confirms it (``_failures.judged_again``, the rule ``tune_key`` applies) is every
  candidate measured and judged again, the old verdicts neither told nor read back
  (``KeySearch.judged``).
* **Keys in order.** Units go out for the earliest key that has one, so keys finish (and
  are decided) in order while later keys fill the workers that would otherwise wait.

Pure bookkeeping: no I/O and no clocks of its own (``clock`` is injected), so the rules
are tested in milliseconds (``tests/test_sweep_schedule.py``). Not thread-safe: one driver
loop owns a Sweep.

>>> from tunebook._book import Result
>>> sweep = Sweep(n_jobs=1, groups=["gpu"], persist=lambda key, fresh, chosen, seconds: None)
>>> plan_unit = sweep.next_unit("gpu")
>>> plan_unit.kind
'plan'
>>> ids = ["B=16", "B=32", "B=64"]
>>> sweep.planned(plan_unit, Plan(key=(1,), key_text="[1]", ids=ids,
...     records=[{"kwargs": {"B": b}} for b in (16, 32, 64)], strategy="exhaustive"), known=None)
>>> unit = sweep.next_unit("gpu"); unit.cids
('B=16', 'B=32', 'B=64')
>>> ok = lambda ms: (Result({"kwargs": {}}, (ms, ms, ms)), False)
>>> sweep.measured(unit, {"B=16": ok(3.0), "B=32": ok(1.0), "B=64": ok(2.0)})
>>> sweep.finished, sweep.keys[0].chosen
(True, 'B=32')
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import _policy
from .._book import Entry, Result
from .._failures import Judging, judged_again, stale_under, tagged, to_measure_again
from .._search import Budget, Strategy, make_strategy
from .._tuner import _flat, contenders, keeping, search_order, tie_aware_choice

# A unit whose worker was lost this many times has its configs left out of the run.
MAX_LOSSES = 3

# persist(key search, new results by config id, the chosen config or None, GPU seconds)
Persist = Callable[["KeySearch", dict[str, Result], "str | None", float], None]


@dataclass(frozen=True)
class Unit:
    """One piece of work for one worker: plan a key, or measure some of its configs."""

    uid: int
    key: int  # index into Sweep.keys
    kind: str  # "plan" | "measure"
    cids: tuple[str, ...] = ()
    full: bool = False
    losses: int = 0
    errors: int = 0  # times a worker failed it for a reason of its own (not a config's)
    judge: bool = False  # a plan that also runs the key's reference config (Plan.reference)


@dataclass(frozen=True)
class Plan:
    """A key as a worker of its group sees it (``_worker/units.py: plan``)."""

    key: tuple[Any, ...]
    key_text: str
    ids: Sequence[str]
    records: Sequence[Mapping[str, Any]]
    strategy: str = "exhaustive"
    hints: Sequence[int] = ()
    seeds: Sequence[int] = ()  # measured first, never kept on a tie (_miss.earlier_seeds)
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    page: Mapping[str, Any] = field(default_factory=dict)
    settings: str | None = None  # _failures.settings_hash of the kernel's check= (None: off)
    # A judging plan's: the config check= takes as reference on the worker ("": none runs).
    reference: str | None = None

    def judging(self) -> Judging | None:
        """What a tuning of the key judges under, from a judging plan (_failures.judged_again)."""
        if not self.reference or self.settings is None:
            return None
        return Judging(self.reference, self.settings)

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        """Config id -> its index among the candidates."""
        return {cid: i for i, cid in enumerate(self.ids)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        max_configs, max_seconds = data.get("budget") or (None, None)
        return cls(
            key=tuple(data["key"]),
            key_text=str(data["key_text"]),
            ids=list(data["ids"]),
            records=list(data["records"]),
            strategy=str(data["strategy"]),
            hints=[int(h) for h in data.get("hints", [])],
            seeds=[int(h) for h in data.get("seeds", [])],
            seed=int(data.get("seed", 0)),
            budget=Budget(max_configs=max_configs, max_seconds=max_seconds),
            page=dict(data.get("page", {})),
            settings=data.get("settings"),
            reference=data.get("reference"),
        )


@dataclass(eq=False)
class KeySearch:
    """One job on one platform group, from plan to decision (see the module docstring)."""

    number: int  # its index in Sweep.keys
    job: int
    group: str
    state: str = "new"  # new | planning | search | confirm | done | failed
    plan: Plan | None = None
    strategy: Strategy | None = None
    results: dict[str, Result] = field(default_factory=dict)  # everything known, by config id
    out: dict[int, Unit] = field(default_factory=dict)  # units handed out, by uid
    queued: list[Unit] = field(default_factory=list)  # units to hand out (lost ones, confirmations)
    withheld: dict[str, Result] = field(default_factory=dict)
    converged: bool = False
    started: float | None = None
    measured: int = 0  # configs measured in this run
    answered: bool = False  # the book answered it: nothing to measure
    chosen: str | None = None
    reason: str = ""
    reopens: str = ""  # the chosen its search starts over, if any (Entry.reopens)
    left_out: list[str] = field(default_factory=list)  # configs left unmeasured by lost workers
    # A key judged again: the results it dropped, which the book still holds until the new
    # ones replace them (a lost unit's configs are measured again, not read back as these).
    judged: dict[str, Result] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def any_ok(self) -> bool:
        return any(r.ok for r in self.results.values())

    def index(self, cid: str) -> int:
        assert self.plan is not None
        return self.plan.positions[cid]

    def cap(self) -> int:
        """How many candidates the search may have results for (the budget's configs)."""
        assert self.plan is not None
        n = len(self.plan.ids)
        limit = self.plan.budget.max_configs
        return n if limit is None else min(n, limit)

    def remaining(self) -> int:
        """Configs this key may still measure (an estimate for progress: no confirmations)."""
        if self.finished or self.plan is None or self.strategy is None:
            return 0
        return max(0, self.cap() - len(self.strategy.results))


class Sweep:
    """Every key search of a sweep, and the units they hand out (see the module docstring)."""

    def __init__(
        self,
        n_jobs: int,
        groups: Sequence[str],
        persist: Persist,
        *,
        unit_size: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if unit_size < 1:
            raise ValueError(f"unit_size must be at least 1 config; found {unit_size}")
        pairs = [(job, group) for job in range(n_jobs) for group in groups]
        self.keys = [KeySearch(number, job, group) for number, (job, group) in enumerate(pairs)]
        self.persist = persist
        self.unit_size = unit_size
        self.clock = clock
        self._uids = 0

    # ------------------------------------------------------------------ handing out

    @property
    def finished(self) -> bool:
        return all(k.finished for k in self.keys)

    def next_unit(self, group: str) -> Unit | None:
        """The next unit for a free worker of ``group``, or None (nothing to do right now)."""
        for key in self.keys:
            if key.group != group or key.finished:
                continue
            unit = self._next_of(key)
            if unit is not None:
                key.out[unit.uid] = unit
                return unit
        return None

    def _unit(self, key: int, kind: str, cids: Sequence[str] = (), full: bool = False) -> Unit:
        self._uids += 1
        return Unit(self._uids, key, kind, tuple(cids), full)

    def _next_of(self, key: KeySearch) -> Unit | None:
        if key.state == "new":
            key.state = "planning"
            return self._unit(key.number, "plan")
        if key.queued:
            return key.queued.pop(0)
        if key.state != "search" or key.strategy is None or key.plan is None:
            return None
        if key.withheld and not key.any_ok:
            return None  # the call may be broken: wait for the units out before going on
        now = self.clock()
        seconds = key.plan.budget.max_seconds
        over_time = seconds is not None and key.started is not None and now - key.started >= seconds
        room = key.cap() - len(key.strategy.results) - len(key.strategy.pending)
        picks = [] if over_time or key.converged or room <= 0 else key.strategy.ask(min(self.unit_size, room))
        if not picks:
            key.converged = key.converged or (room > 0 and not over_time and not key.strategy.pending)
            self._advance(key)  # the search may be over: on to the confirmations, which may go out now
            return key.queued.pop(0) if key.queued else None
        if key.started is None:
            key.started = now
        return self._unit(key.number, "measure", [key.plan.ids[i] for i in picks])

    # ------------------------------------------------------------------ what comes back

    def planned(
        self,
        unit: Unit,
        plan: Plan,
        known: Entry | None,
        same_as: int | None = None,
        settled: Entry | None = None,
    ) -> None:
        """A plan came back; ``known`` is what the book (and the planning worker's) holds.
        ``same_as``: an earlier job that has the same book key (bucketed keys), tuned once.
        ``settled``: the key's entry in a read-only book (``_policy.decide``). A key whose
        wrong results may be judged again is planned once more, by a judging plan (see the
        module docstring)."""
        key = self.keys[unit.key]
        key.out.pop(unit.uid, None)
        key.plan = plan
        key.results = dict(known.results) if known is not None else {}
        if same_as is not None:
            key.state, key.answered, key.reason = "done", True, f"the same key as job {same_as}"
            return
        if known is not None and _answered(known, plan, settled):
            key.state, key.answered = "done", True
            key.chosen = known.best(plan.ids)
            if not known.chosen:  # measured to the end by a run that was stopped before deciding
                key.chosen = tie_aware_choice(known.results, plan.ids, plan.hints)
                if key.chosen is not None:
                    self.persist(key, {}, key.chosen, 0.0)
            return
        key.reopens = known.chosen if known is not None else ""
        # What may not be the configs' failures, held while none ran: measured again (_failures.py).
        for cid in to_measure_again(key.results, plan.ids):
            del key.results[cid]
        if tagged(key.results, plan.ids) and plan.settings is not None and plan.reference is None:
            # Judged again only against the reference a worker runs now, as tune_key confirms
            # it (a guess from the book may be wrong): planned once more, running it.
            key.state = "planning"
            key.queued.append(replace(unit, judge=True))
            return
        if judged_again(key.results, plan.ids, plan.judging if plan.settings is not None else None):
            key.judged = {cid: key.results.pop(cid) for cid in plan.ids if cid in key.results}
        strategy = make_strategy(
            plan.strategy,
            [_flat(r) for r in plan.records],
            seed=plan.seed,
            hints=search_order(plan.seeds, plan.hints),
        )
        for i, cid in enumerate(plan.ids):
            if cid in key.results:
                strategy.tell(i, key.results[cid].median)
        key.strategy = strategy
        key.state = "search"

    def measured(
        self,
        unit: Unit,
        results: Mapping[str, tuple[Result | None, bool]],
        *,
        error: str | None = None,
        seconds: float = 0.0,
    ) -> None:
        """A measure unit came back: per config id (its result, or None if skipped; whether
        its failure was unexpected). Configs it lacks were not measured: with ``error`` the
        key fails with that reason; without, they go out again."""
        key = self.keys[unit.key]
        key.out.pop(unit.uid, None)
        fresh: dict[str, Result] = {}
        for cid, (result, unexpected) in results.items():
            if cid not in unit.cids:
                continue
            key.measured += 1
            if result is None:  # skipped (a replay without this config's grid): told, not kept
                self._tell(key, cid, math.inf)
            elif unexpected and not key.any_ok:
                key.withheld[cid] = result
                self._tell(key, cid, math.inf)
            else:
                fresh[cid] = result
                key.results[cid] = result
                self._tell(key, cid, result.median)
        if key.withheld and key.any_ok:
            fresh.update(key.withheld)
            key.results.update(key.withheld)
            key.withheld.clear()
        if fresh:
            self.persist(key, fresh, None, seconds)
        missing = [cid for cid in unit.cids if cid not in results]
        if missing and error is not None:
            self._fail(key, error)
            return
        if missing:
            key.queued.append(replace(unit, cids=tuple(missing)))
        self._advance(key)

    def lost(self, unit: Unit, reason: str, known: Entry | None = None) -> None:
        """The worker holding ``unit`` is gone. What ``known`` (the book, read again) holds
        for its configs counts as measured (for a confirmation, only full measurements); the
        rest goes out again, or after MAX_LOSSES is left out of the run (not recorded)."""
        key = self.keys[unit.key]
        key.out.pop(unit.uid, None)
        if unit.kind == "plan":
            if unit.losses + 1 >= MAX_LOSSES:
                self._fail(key, f"planning it lost its worker {MAX_LOSSES} times: {reason}")
            else:
                key.queued.append(replace(unit, losses=unit.losses + 1))
            return
        stored = known.results if known is not None else {}
        if unit.full:  # a confirmation: its configs have quick results already, which do not count
            stored = {cid: r for cid, r in stored.items() if not r.quick}
        # A key judged again: the old verdicts the book still holds are not its results.
        stored = {cid: r for cid, r in stored.items() if key.judged.get(cid) != r}
        done = {cid: stored[cid] for cid in unit.cids if cid in stored}
        for cid, result in done.items():
            key.results[cid] = result
            self._tell(key, cid, result.median)
        if done:  # the lost worker's journal reached this node's book only: on to every layer
            self.persist(key, done, None, 0.0)
        rest = tuple(cid for cid in unit.cids if cid not in stored)
        if rest and unit.losses + 1 >= MAX_LOSSES:
            key.left_out.extend(rest)
            for cid in rest:
                self._tell(key, cid, math.inf)  # for this run's search: nothing recorded
            self._advance(key)
            return
        if rest:
            key.queued.append(replace(unit, cids=rest, losses=unit.losses + 1))
        self._advance(key)

    def retry(self, unit: Unit, reason: str) -> bool:
        """A worker failed ``unit`` for a reason not tied to a config (it could not import the
        kernel, say): it goes out once more, to another worker where there is one; failed a
        second time, its key is failed with ``reason``. Returns whether it went out again."""
        key = self.keys[unit.key]
        key.out.pop(unit.uid, None)
        if unit.errors >= 1:
            self._fail(key, reason)
            return False
        key.queued.append(replace(unit, errors=unit.errors + 1))
        return True

    def failed(self, unit: Unit, reason: str) -> None:
        """The unit's key cannot be tuned (its call cannot be rebuilt, say)."""
        key = self.keys[unit.key]
        key.out.pop(unit.uid, None)
        self._fail(key, reason)

    # ------------------------------------------------------------------ internals

    def _tell(self, key: KeySearch, cid: str, ms: float) -> None:
        assert key.strategy is not None and key.plan is not None
        i = key.index(cid)
        if i not in key.strategy.results:
            key.strategy.tell(i, ms)

    def _fail(self, key: KeySearch, reason: str) -> None:
        key.state, key.reason = "failed", reason
        key.queued.clear()

    def _advance(self, key: KeySearch) -> None:
        """Move a key on when its units are all back: search -> confirm -> done."""
        if key.out or key.queued or key.plan is None or key.finished:
            return
        if key.state == "search":
            if key.withheld and not key.any_ok:
                first = next(iter(key.withheld.values()))
                self._fail(key, first.error or "every config failed")
                return
            if not self._search_over(key):
                return
            to_confirm = self._contenders(key)
            key.state = "confirm"
            for start in range(0, len(to_confirm), self.unit_size):
                chunk = to_confirm[start : start + self.unit_size]
                key.queued.append(self._unit(key.number, "measure", chunk, full=True))
            if key.queued:
                return
        if key.state == "confirm":
            self._decide(key)

    def _search_over(self, key: KeySearch) -> bool:
        assert key.strategy is not None and key.plan is not None
        seconds = key.plan.budget.max_seconds
        timed_out = seconds is not None and key.started is not None and self.clock() - key.started >= seconds
        return key.converged or timed_out or len(key.strategy.results) >= key.cap()

    def _contenders(self, key: KeySearch) -> list[str]:
        """The configs ``tune_key`` would measure in full (``_tuner.contenders``)."""
        assert key.plan is not None
        return [key.plan.ids[i] for i in contenders(key.results, key.plan.ids, key.plan.hints)]

    def _decide(self, key: KeySearch) -> None:
        assert key.plan is not None
        hints = keeping(key.reopens, key.plan.ids, key.plan.hints)
        chosen = tie_aware_choice(key.results, key.plan.ids, hints)
        key.chosen, key.state = chosen, "done"
        if chosen is not None or key.measured:
            self.persist(key, {}, chosen, 0.0)


def _answered(known: Entry, plan: Plan, settled: Entry | None) -> bool:
    """Whether the book answers the key (``_policy.decide``), as at a miss in tune mode: not
    where its wrong results under ``check=`` were judged under other settings or another
    reference than its workers judge now, as far as the book tells (``_failures.stale_under``)."""
    stale = stale_under(known.results, plan.ids, plan.settings)
    return _policy.decide(known, plan.ids, "tune", plan.budget, settled, stale) == "book"
