"""The sweep's queue (tunebook._sweep.schedule), in milliseconds: several workers ask for units
at once, results come back in any order, workers are lost; every rule of a key's tuning in
one process (budget, early stop, nothing measured twice, failures as data, contenders
confirmed, the tie-aware choice) still holds."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace

import pytest

from tunebook._book import Entry, Result
from tunebook._failures import Judging, settings_hash
from tunebook._search import Budget, search
from tunebook._sweep.driver import SweepError, choose_groups, group_name
from tunebook._sweep.schedule import MAX_LOSSES, Plan, Sweep, Unit
from tunebook._tuner import tie_aware_choice

# The Ray sweep's queue: pure rules, no kernel runs. Last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once


def ok(ms: float, quick: bool = False) -> Result:
    return Result({"kwargs": {}}, (ms, ms, ms), None, "", quick=quick)


def failed(reason: str = "OutOfResources: shared memory") -> Result:
    return Result({"kwargs": {}}, None, reason, "")


def plan_of(times: list[float], strategy: str = "exhaustive", budget: Budget | None = None, **kw) -> Plan:
    ids = [f"B={i}" for i in range(len(times))]
    records = [{"kwargs": {"B": i}} for i in range(len(times))]
    budget = budget or Budget()
    return Plan(key=(1,), key_text="[1]", ids=ids, records=records, strategy=strategy, budget=budget, **kw)


class Recorder:
    """The driver's persist step: what was written, per key number."""

    def __init__(self) -> None:
        self.results: dict[int, dict[str, Result]] = {}
        self.chosen: dict[int, str | None] = {}

    def __call__(self, key, fresh, chosen, seconds) -> None:
        self.results.setdefault(key.number, {}).update(fresh)
        if chosen is not None or not fresh:
            self.chosen[key.number] = chosen


def planned_sweep(plans: list[Plan], unit_size: int = 2, known=None, clock=None) -> tuple[Sweep, Recorder]:
    recorder = Recorder()
    kwargs = {"clock": clock} if clock is not None else {}
    sweep = Sweep(len(plans), ["gpu"], recorder, unit_size=unit_size, **kwargs)
    units = [sweep.next_unit("gpu") for _ in plans]  # a key yields nothing until its plan is back
    for number, (unit, plan) in enumerate(zip(units, plans)):
        assert unit is not None and unit.kind == "plan" and unit.key == number
        sweep.planned(unit, plan, known[number] if known else None)
    return sweep, recorder


def drain(sweep: Sweep, tables: list[list[float]], workers: int = 3, seed: int = 0) -> list[str]:
    """Run the sweep with ``workers`` that each hold a unit and answer in a random order."""
    rng = random.Random(seed)
    out: list[Unit] = []
    measured: list[str] = []
    while not sweep.finished:
        while len(out) < workers and (unit := sweep.next_unit("gpu")) is not None:
            out.append(unit)
        assert out, "nothing handed out, yet the sweep is not finished"
        unit = out.pop(rng.randrange(len(out)))
        key = sweep.keys[unit.key]
        table = tables[unit.key]
        results = {}
        for cid in unit.cids:
            ms = table[key.index(cid)]
            measured.append(f"{unit.key}:{cid}{':full' if unit.full else ''}")
            results[cid] = (ok(ms, quick=not unit.full) if math.isfinite(ms) else failed(), False)
        sweep.measured(unit, results)
    return measured


@pytest.mark.parametrize("strategy", ["exhaustive", "random", "neighbors"])
def test_a_key_searched_by_several_workers_measures_what_one_process_would(strategy):
    rng = random.Random(7)
    times = [rng.uniform(1, 10) for _ in range(40)]
    budget = Budget(max_configs=25)
    plan = plan_of(times, strategy, budget, hints=[3])
    sweep, recorder = planned_sweep([plan], unit_size=3)
    measured = drain(sweep, [times], workers=4)
    quick = [m for m in measured if not m.endswith(":full")]
    assert len(quick) == len(set(quick)) <= 25  # nothing twice, the budget across workers
    alone = search(
        [{"B": i} for i in range(40)],
        lambda batch: {i: times[i] for i in batch},
        strategy=strategy,
        budget=budget,
        hints=[3],
    )
    if strategy != "neighbors":  # neighbors climbs in smaller steps here; same rule, other path
        assert {m.split(":")[1] for m in quick} == {plan.ids[i] for i in alone.measured}
    else:
        assert len(quick) <= len(times)
    results = recorder.results[0]
    best = min((r.median, cid) for cid, r in results.items())[1]
    assert recorder.chosen[0] == best == tie_aware_choice(results, plan.ids, plan.hints)


def test_contenders_with_only_a_quick_measurement_are_confirmed_in_full_then_the_key_is_decided():
    times = [5.0, 1.0, 1.05, 3.0, 1.08, 9.0]  # 1.0, 1.05, 1.08 are within the 10% margin
    sweep, recorder = planned_sweep([plan_of(times)], unit_size=2)
    measured = drain(sweep, [times], workers=2)
    full = sorted(m for m in measured if m.endswith(":full"))
    assert full == ["0:B=1:full", "0:B=2:full", "0:B=4:full"]
    assert not any(r.quick for cid, r in recorder.results[0].items() if f"0:{cid}:full" in full)
    assert recorder.chosen[0] == "B=1"


def test_a_hint_within_the_tie_outside_the_fastest_few_is_confirmed_as_tune_key_does():
    quick = [1.0] * 8 + [1.015]  # the hint is ninth, within the 2% tie on its screening
    full = [1.0] * 8 + [1.03]  # and 3% behind in full: it must not win the tie
    plan = plan_of(quick, hints=[8])
    sweep, recorder = planned_sweep([plan], unit_size=3)
    confirmed: list[str] = []
    while not sweep.finished:
        unit = sweep.next_unit("gpu")
        assert unit is not None
        table = full if unit.full else quick
        confirmed += unit.cids if unit.full else []
        results = {cid: (ok(table[plan.ids.index(cid)], quick=not unit.full), False) for cid in unit.cids}
        sweep.measured(unit, results)
    assert "B=8" in confirmed and recorder.chosen[0] == "B=0"


def test_units_go_to_the_earliest_key_that_has_one_and_later_keys_fill_in():
    times = [1.0, 2.0, 3.0, 4.0]
    sweep, _ = planned_sweep([plan_of(times), plan_of(times)], unit_size=2)
    first = [sweep.next_unit("gpu") for _ in range(3)]
    assert [u.key for u in first if u is not None] == [0, 0, 1]  # key 0 has two units, then key 1
    assert sweep.next_unit("other-gpu-model") is None  # units stay within their GPU model


def test_a_strategy_that_waits_for_results_hands_out_nothing_until_they_come():
    times = [float(i + 1) for i in range(20)]
    sweep, _ = planned_sweep([plan_of(times, "neighbors", hints=[10])], unit_size=8)
    unit = sweep.next_unit("gpu")
    assert unit is not None and unit.cids == ("B=10",)  # the hint first, alone
    assert sweep.next_unit("gpu") is None  # neighbors climbs only from measured points
    sweep.measured(unit, {"B=10": (ok(11.0), False)})
    assert sweep.next_unit("gpu") is not None


def test_known_results_are_told_first_and_never_handed_out():
    times = [1.0, 2.0, 3.0, 4.0]
    known = Entry(key=(1,), results={"B=0": ok(1.0), "B=2": failed()})
    sweep, _ = planned_sweep([plan_of(times)], unit_size=8, known=[known])
    unit = sweep.next_unit("gpu")
    assert unit is not None and unit.cids == ("B=1", "B=3")


def test_a_key_the_book_answers_hands_out_nothing():
    times = [1.0, 2.0]
    known = Entry(key=(1,), results={"B=0": ok(1.0), "B=1": ok(2.0)})
    sweep, recorder = planned_sweep([plan_of(times)], known=[known])
    assert sweep.finished and sweep.keys[0].answered and sweep.keys[0].chosen == "B=0"
    # Measured to the end by a run stopped before it decided: the decision is written, nothing measured.
    assert recorder.chosen == {0: "B=0"} and not any(recorder.results.values())
    tied = {"B=0": ok(1.0), "B=1": ok(1.01)}  # the chosen config keeps its place within 2%
    decided = Entry(key=(1,), results=tied, chosen="B=1")
    sweep, recorder = planned_sweep([plan_of(times)], known=[decided])
    assert sweep.finished and sweep.keys[0].chosen == "B=1" and recorder.chosen == {}


def test_a_lost_unit_goes_out_again_with_only_what_the_book_still_lacks():
    times = [1.0, 2.0, 3.0, 4.0]
    sweep, recorder = planned_sweep([plan_of(times)], unit_size=4)
    unit = sweep.next_unit("gpu")
    assert unit is not None
    # The worker wrote B=0 into the book before its actor was lost.
    sweep.lost(unit, "ActorDiedError", Entry(key=(1,), results={"B=0": ok(1.0)}))
    again = sweep.next_unit("gpu")
    assert again is not None and again.cids == ("B=1", "B=2", "B=3") and again.losses == 1
    assert list(recorder.results[0]) == ["B=0"]  # written by the driver too: Redis has it then
    for _ in range(MAX_LOSSES - 1):
        sweep.lost(again, "node gone")
        again = sweep.next_unit("gpu") or again
    assert sweep.finished
    # Left out of the run, never recorded: a later run measures them (losing workers is
    # the cluster's doing; recorded as failed, B=1 would have been given up for good).
    assert list(recorder.results[0]) == ["B=0"]
    assert sweep.keys[0].left_out == ["B=1", "B=2", "B=3"]
    assert recorder.chosen[0] == "B=0"


def test_a_lost_confirmation_goes_out_again_though_the_book_holds_its_quick_results():
    # A confirmation unit holds contenders that have quick results in the book by
    # construction; losing its worker must not count those as the full measurement.
    times = [5.0, 1.0, 1.05, 3.0]
    sweep, recorder = planned_sweep([plan_of(times)], unit_size=4)
    screen = sweep.next_unit("gpu")
    assert screen is not None and not screen.full
    quick = {
        cid: Result({"kwargs": {}}, (times[int(cid[2:])],) * 3, None, "t", quick=True) for cid in screen.cids
    }
    sweep.measured(screen, {cid: (r, False) for cid, r in quick.items()})
    confirm = sweep.next_unit("gpu")
    assert confirm is not None and confirm.full and confirm.cids == ("B=1", "B=2")
    sweep.lost(confirm, "ActorDiedError", Entry(key=(1,), results=quick))
    again = sweep.next_unit("gpu")
    assert again is not None and again.full and again.cids == confirm.cids and again.losses == 1
    assert not sweep.finished and recorder.chosen == {}


def test_a_broken_call_fails_the_key_and_persists_nothing():
    times = [1.0, 2.0, 3.0, 4.0]
    sweep, recorder = planned_sweep([plan_of(times)], unit_size=2)
    a, b = sweep.next_unit("gpu"), sweep.next_unit("gpu")
    assert a is not None and b is not None
    bug = failed("TypeError: add_kernel() got an unexpected keyword argument 'x'")
    sweep.measured(a, {cid: (bug, True) for cid in a.cids})
    assert sweep.next_unit("gpu") is None  # no new unit while the call may be broken
    sweep.measured(b, {cid: (bug, True) for cid in b.cids})
    assert sweep.keys[0].state == "failed" and "unexpected keyword" in sweep.keys[0].reason
    assert recorder.results == {}


def test_an_unexpected_failure_is_kept_once_another_config_of_the_key_runs():
    times = [1.0, 2.0, 3.0, 4.0]
    sweep, recorder = planned_sweep([plan_of(times)], unit_size=2)
    a, b = sweep.next_unit("gpu"), sweep.next_unit("gpu")
    assert a is not None and b is not None
    odd = failed("ValueError: something only this config hits")
    sweep.measured(a, {cid: (odd, True) for cid in a.cids})
    sweep.measured(b, {cid: (ok(2.0), False) for cid in b.cids})
    drain(sweep, [times])
    assert sweep.keys[0].state == "done"
    assert set(recorder.results[0]) == {"B=0", "B=1", "B=2", "B=3"}


def test_the_time_budget_runs_from_the_keys_first_unit_across_workers():
    now = [0.0]
    times = [float(i + 1) for i in range(30)]
    sweep, _ = planned_sweep(
        [plan_of(times, budget=Budget(max_seconds=10.0))], unit_size=2, clock=lambda: now[0]
    )
    first = sweep.next_unit("gpu")
    assert first is not None
    now[0] = 11.0
    assert sweep.next_unit("gpu") is None
    sweep.measured(first, {cid: (ok(1.0), False) for cid in first.cids})
    assert sweep.finished
    # Its last unit back before the time is up, the key must still end once it is up.
    now[0] = 0.0
    sweep, recorder = planned_sweep([plan_of(times, budget=Budget(max_seconds=10.0))], clock=lambda: now[0])
    unit = sweep.next_unit("gpu")
    assert unit is not None
    sweep.measured(unit, {cid: (ok(1.0), False) for cid in unit.cids})
    now[0] = 11.0
    assert sweep.next_unit("gpu") is None and sweep.finished and recorder.chosen[0] == "B=0"


def test_several_gpu_models_are_refused_unless_asked_with_what_to_do():
    counts = {"NVIDIA H200 (arch 90)": 2, "NVIDIA H100 80GB HBM3 (arch 90)": 4}
    with pytest.raises(SweepError) as refused:
        choose_groups(counts, each_model=False, gpu_model=None)
    message = str(refused.value)
    assert "2 models" in message and "2 x NVIDIA H200" in message and "4 x NVIDIA H100" in message
    assert "--each-model" in message and "--gpu-model" in message
    assert choose_groups(counts, each_model=True, gpu_model=None) == sorted(counts)
    assert choose_groups(counts, each_model=False, gpu_model="NVIDIA H200") == ["NVIDIA H200 (arch 90)"]
    with pytest.raises(SweepError, match="no GPU of model 'A100'"):
        choose_groups(counts, each_model=False, gpu_model="A100")


def test_gpus_of_one_name_and_arch_but_another_sm_count_are_two_models_said_so():
    """An H100 SXM (132 SMs) and a slice or a PCIe part under the same name: a page each, so a
    group each. Grouped by name and arch alone, the second's timings were filed in the page
    of whichever worker planned the key."""
    sxm = {"backend": "cuda", "device": "NVIDIA H100", "arch": 90, "sm_count": 132, "runtime": "cuda 12.8"}
    cut = {**sxm, "sm_count": 114}
    assert group_name({**sxm, "triton": "3.6.0"}) != group_name({**cut, "triton": "3.6.0"})
    assert "114 SMs" in group_name(cut)
    devices = {group_name(d): d for d in (sxm, cut)}
    counts = dict.fromkeys(devices, 1)
    with pytest.raises(SweepError) as refused:
        choose_groups(counts, each_model=False, gpu_model=None, devices=devices)
    assert "2 models" in str(refused.value) and "they differ in SM count" in str(refused.value)
    assert choose_groups(counts, each_model=True, gpu_model=None) == sorted(devices)
    assert choose_groups(counts, each_model=False, gpu_model="NVIDIA H100") == sorted(devices)


def test_each_gpu_model_gets_its_own_search_of_every_key():
    recorder = Recorder()
    sweep = Sweep(2, ["H100", "H200"], recorder, unit_size=4)
    units = [sweep.next_unit(g) for g in ("H100", "H200", "H100", "H200")]
    assert [(u.kind, sweep.keys[u.key].job, sweep.keys[u.key].group) for u in units if u] == [
        ("plan", 0, "H100"),
        ("plan", 0, "H200"),
        ("plan", 1, "H100"),
        ("plan", 1, "H200"),
    ]


def test_a_search_over_a_decided_key_reopens_it_and_chooses_what_it_finds():
    """Two configs added to a decided list: they are searched, and the driver's news reopen
    the key (``KeySearch.reopens``), so its full results and choice replace the old ones."""
    times = [2.0, 3.0, 4.0, 1.0]
    decided = Entry(key=(1,), results={"B=0": ok(2.0), "B=1": ok(3.0)}, chosen="B=0")
    sweep, recorder = planned_sweep([plan_of(times)], known=[decided])
    assert sweep.keys[0].reopens == "B=0"
    drain(sweep, [times])
    assert recorder.chosen == {0: "B=3"}
    fresh = recorder.results[0]
    news = Entry(key=(1,), results=fresh, chosen="B=3", reopens="B=0")
    screened = Entry(key=(1,), results={**decided.results, "B=3": ok(0.9, quick=True)}, chosen="B=0")
    stored = news.merged_over(screened)  # the book as the search's screening left it
    assert stored.chosen == "B=3" and not stored.results["B=3"].quick
    assert stored.results["B=0"] is decided.results["B=0"]  # what the old search measured stands
    undecided = planned_sweep([plan_of(times)], known=[Entry(key=(1,), results={"B=0": ok(2.0)})])[0]
    assert not undecided.keys[0].reopens


def test_a_gpu_model_named_as_before_the_sm_count_is_taken_where_it_names_one_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Group names gained ", 132 SMs": the full name an earlier tunebook printed (pinned in a
    script or CI job) matched nothing. It is taken where it names exactly one group, and said."""
    h100 = {"device": "NVIDIA H100 80GB HBM3", "arch": "90", "sm_count": 132, "runtime": "cuda 12.8"}
    h100 = {**h100, "triton": "3.6.0"}
    old = "NVIDIA H100 80GB HBM3 (arch 90, cuda 12.8, triton 3.6.0)"
    counts = {group_name(h100): 8, group_name({**h100, "device": "NVIDIA H200"}): 8}
    with caplog.at_level(logging.WARNING, logger="tunebook"):
        assert choose_groups(counts, each_model=False, gpu_model=old) == [group_name(h100)]
    assert any(group_name(h100) in r.getMessage() for r in caplog.records), caplog.text
    counts[group_name({**h100, "sm_count": 114})] = 2  # the old name fits two groups now
    with pytest.raises(SweepError, match="matches 2 models"):
        choose_groups(counts, each_model=False, gpu_model=old)


# ----------------------------------------------------------------- wrong results judged again


def wrong(reference: str, settings: str) -> Result:
    error = "WrongResult: " + Judging(reference, settings).tag("wrong result: out differs")
    return Result({"kwargs": {}}, None, error, "t0")


STRICT = settings_hash({})
# B=0 is the reference; B=1 and B=2 were judged wrong against it under the default settings.
JUDGED = Entry(key=(1,), results={"B=0": ok(1.0), "B=1": wrong("B=0", STRICT), "B=2": wrong("B=0", STRICT)})
JUDGED = replace(JUDGED, chosen="B=0")


def judged_sweep(known: Entry, settings: str | None) -> tuple[Sweep, Recorder]:
    """A sweep of one key of 3 configs planned over ``known``, under check= ``settings``."""
    recorder = Recorder()
    sweep = Sweep(1, ["gpu"], recorder, unit_size=8)
    unit = sweep.next_unit("gpu")
    assert unit is not None and unit.kind == "plan" and not unit.judge
    sweep.planned(unit, plan_of([1.0, 2.0, 3.0], settings=settings), known)
    return sweep, recorder


def judged_plan(sweep: Sweep, reference: str, known: Entry = JUDGED) -> None:
    """The plan a worker sends back for a judging plan unit (the key's reference, run there),
    over what the book still holds for the key."""
    unit = sweep.next_unit("gpu")
    assert unit is not None and unit.kind == "plan" and unit.judge
    plan = sweep.keys[0].plan
    assert plan is not None
    sweep.planned(unit, replace(plan, reference=reference), known)


def test_a_key_judged_as_the_sweep_would_judge_it_is_answered_without_running_anything():
    sweep, recorder = judged_sweep(JUDGED, settings_hash({"max_bytes": 1 << 20}))  # judges no config
    assert sweep.finished and sweep.keys[0].answered and sweep.keys[0].chosen == "B=0"
    assert recorder.results == {}


def test_other_check_settings_judge_every_candidate_again_once_the_reference_is_run():
    """As a miss in tune mode: the book's guess sends a plan that runs the reference (tune_key's
    confirmation), then every candidate is measured and judged again, and the key reopened."""
    sweep, recorder = judged_sweep(JUDGED, settings_hash({"rtol": 10.0, "atol": 10.0}))
    assert not sweep.finished and sweep.keys[0].state == "planning"
    judged_plan(sweep, "B=0")
    assert sweep.keys[0].reopens == "B=0" and not sweep.keys[0].results
    measured = drain(sweep, [[3.0, 1.0, 2.0]])
    assert {m for m in measured if not m.endswith(":full")} == {"0:B=0", "0:B=1", "0:B=2"}
    assert recorder.chosen == {0: "B=1"} and all(r.ok for r in recorder.results[0].values())


def test_check_turned_off_judges_again_without_a_reference_run():
    sweep, _ = judged_sweep(JUDGED, None)
    unit = sweep.next_unit("gpu")
    assert unit is not None and unit.kind == "measure" and unit.cids == ("B=0", "B=1", "B=2")


def test_a_guess_the_reference_run_disproves_measures_only_what_the_key_lacks():
    """B=3 put first, never measured: the book guesses it is the new reference; the worker finds
    that it cannot run, B=0 stays the reference, and only B=3 is measured (as in tune_key)."""
    recorder = Recorder()
    sweep = Sweep(1, ["gpu"], recorder, unit_size=8)
    unit = sweep.next_unit("gpu")
    assert unit is not None
    plan = plan_of([1.0, 2.0, 3.0, 4.0], settings=STRICT)
    plan = replace(plan, ids=["B=3", "B=0", "B=1", "B=2"], records=[plan.records[i] for i in (3, 0, 1, 2)])
    sweep.planned(unit, plan, JUDGED)
    judged_plan(sweep, "B=0")
    again = sweep.next_unit("gpu")
    assert again is not None and again.cids == ("B=3",)


def test_a_lost_unit_of_a_key_judged_again_does_not_read_back_the_old_verdicts():
    sweep, recorder = judged_sweep(JUDGED, None)
    unit = sweep.next_unit("gpu")
    assert unit is not None
    # The worker measured B=0 anew before its actor was lost; the book holds the old verdicts
    # of the others (an ordinary write does not replace a decided key's results).
    anew = ok(1.5)
    sweep.lost(unit, "ActorDiedError", Entry(key=(1,), results={**JUDGED.results, "B=0": anew}))
    again = sweep.next_unit("gpu")
    assert again is not None and again.cids == ("B=1", "B=2")
    assert recorder.results[0] == {"B=0": anew}
