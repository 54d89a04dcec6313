"""Search strategies, tested by replaying recorded timing tables (no GPU).

Every table in tests/data/tables/*.json is one kernel at one shape on one platform, with
every config of its space measured (format: tunebook._search._table). ``synthetic-*`` tables
come from tests/data/make_synthetic_tables.py; GPU-measured ones from
benchmarks/measure_tables.py. Each test loops over all tables present, so adding a table
adds coverage.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from tunebook._search import (
    SMALL_SPACE,
    Budget,
    Encoding,
    Table,
    TableRow,
    choose_strategy,
    make_strategy,
    search,
    strategy_names,
)

# Search strategies over recorded timing tables: no kernel runs. Last Triton only
# (tests/conftest.py).
pytestmark = pytest.mark.once

TABLES_DIR = Path(__file__).resolve().parent / "data" / "tables"
TABLE_PATHS = sorted(TABLES_DIR.glob("*.json"))
TABLES = {p.stem: Table.load(p) for p in TABLE_PATHS}
# The contract suite runs over the registry: a strategy registered later is tested too.
STRATEGIES = strategy_names()
SEEDS = (0, 1, 2)


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def hints_for(name: str) -> list[int]:
    """Winners of the other tables of the same kernel, as indices into this table: what
    the book would offer as "winner of the nearest remembered key"."""
    table = TABLES[name]
    index = {_key(c): i for i, c in enumerate(table.candidates())}
    hints = []
    for other_name, other in TABLES.items():
        if other_name != name and other.kernel == table.kernel:
            best, _ = other.best()
            i = index.get(_key(other.rows[best].config)) if best >= 0 else None
            if i is not None and i not in hints:
                hints.append(i)
    return hints


class Recorder:
    """A ``measure`` replaying a table, remembering every index it was asked for."""

    def __init__(self, table: Table, fail_after: int | None = None) -> None:
        self.timings = table.timings()
        self.calls: list[int] = []
        self.persisted: dict[int, float] = {}  # what a book would hold if the run died now
        self.fail_after = fail_after

    def __call__(self, batch: list[int]) -> dict[int, float]:
        out = {}
        for i in batch:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            self.calls.append(i)
            out[i] = self.persisted[i] = self.timings[i]
        return out


def assert_no_duplicates(indices) -> None:
    repeated = [i for i, n in Counter(indices).items() if n > 1]
    assert not repeated, f"measured twice: {repeated[:10]}"


def test_tables_are_present_and_well_formed():
    assert TABLE_PATHS, "no timing tables in tests/data/tables"
    for name, table in TABLES.items():
        assert table.rows and table.kernel and table.shape and table.platform, name
        best, ms = table.best()
        assert best >= 0 and math.isfinite(ms), name
        if name.startswith("synthetic-"):
            assert len(table.rows) >= 1000 and any(r.ms is None and r.error for r in table.rows)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(TABLES))
def test_budget_in_configs_and_no_duplicates(strategy, name):
    table = TABLES[name]
    measure = Recorder(table)
    result = search(
        table.candidates(),
        measure,
        strategy=strategy,
        budget=Budget(max_configs=40),
        hints=hints_for(name) if strategy == "neighbors" else (),
        seed=1,
    )
    assert_no_duplicates(measure.calls)
    assert list(result.measured) == measure.calls
    assert len(result.measured) <= 40
    if result.stopped != "converged":
        assert len(result.measured) == 40 and result.stopped == "max_configs"
    assert result.best_ms == min(table.timings()[i] for i in result.measured)
    assert result.trace == tuple(sorted(result.trace, reverse=True))  # best-so-far never worsens
    assert result.trace[-1] == result.best_ms


@pytest.mark.parametrize("strategy", ["random", "bayes", "neighbors"])
def test_seeding_is_reproducible(strategy):
    table = TABLES[sorted(TABLES)[0]]

    def run(seed):
        return search(
            table.candidates(), Recorder(table), strategy=strategy, budget=Budget(max_configs=30), seed=seed
        ).measured

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failures_are_never_retried(strategy):
    table = TABLES[sorted(TABLES)[0]]
    timings = table.timings()
    # Make every other config fail, some by inf, some by leaving them out of the reply.
    calls: list[int] = []

    def measure(batch):
        calls.extend(batch)
        return {i: (math.inf if i % 4 == 1 else timings[i]) for i in batch if i % 4 != 3}

    result = search(table.candidates(), measure, strategy=strategy, budget=Budget(max_configs=120), seed=0)
    assert_no_duplicates(calls)
    failed = [i for i in result.measured if i % 2 == 1]
    assert all(result.timings[i] == math.inf for i in failed)
    assert result.best is None or result.best % 2 == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kill_after", [1, 13, 24])
def test_resumes_after_a_kill_without_remeasuring(strategy, kill_after):
    name = sorted(TABLES)[0]
    table = TABLES[name]
    hints = hints_for(name) if strategy == "neighbors" else ()
    budget = Budget(max_configs=48)

    whole = search(table.candidates(), Recorder(table), strategy=strategy, budget=budget, hints=hints, seed=5)

    first = Recorder(table, fail_after=kill_after)
    with pytest.raises(KeyboardInterrupt):
        search(table.candidates(), first, strategy=strategy, budget=budget, hints=hints, seed=5)
    assert len(first.persisted) == kill_after
    second = Recorder(table)
    resumed = search(
        table.candidates(),
        second,
        strategy=strategy,
        budget=budget,
        hints=hints,
        seed=5,
        known=first.persisted,
    )
    assert not set(second.calls) & set(first.persisted), "a known result was measured again"
    assert_no_duplicates(second.calls)
    assert set(resumed.timings) == set(first.persisted) | set(second.calls)
    if whole.stopped == "max_configs":
        assert len(resumed.timings) == 48  # the budget counts known results too
    if strategy in ("exhaustive", "random"):
        # Their order depends on the seed alone: the resumed run ends where the whole one did.
        assert set(resumed.timings) == set(whole.measured)
        assert resumed.best == whole.best


@pytest.mark.parametrize("name", sorted(TABLES))
def test_exhaustive_finds_the_true_best(name):
    table = TABLES[name]
    measure = Recorder(table)
    result = search(table.candidates(), measure, strategy="exhaustive")
    assert result.stopped == "exhausted"
    assert sorted(measure.calls) == list(range(len(table.rows)))
    assert (result.best, result.best_ms) == table.best()


CAP = 300  # bounds the test's time; a strategy that has not arrived by then scores CAP


def configs_to_reach(strategy: str, table: Table, seed: int, hints=(), factor: float = 1.03) -> int:
    """How many configs a strategy measures before one is within ``factor`` of the best;
    CAP if it stops earlier without getting there, or needs more."""
    timings = table.timings()
    target = factor * table.best()[1]
    s = make_strategy(strategy, table.candidates(), seed=seed, hints=hints)
    told = 0
    while told < CAP and (batch := s.ask(8)):
        for i in batch:
            told += 1
            s.tell(i, timings[i])
            if timings[i] <= target:
                return told
    return CAP


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bayes", "neighbors"])
def test_model_and_local_search_beat_random(strategy):
    """Averaged over every table and three seeds, reaching 1.03x of the best takes fewer
    measurements than random search."""
    costs: dict[str, list[int]] = {strategy: [], "random": []}
    for name, table in TABLES.items():
        hints = hints_for(name) if strategy == "neighbors" else ()
        for seed in SEEDS:
            costs[strategy].append(configs_to_reach(strategy, table, seed, hints))
            costs["random"].append(configs_to_reach("random", table, seed))
    mean = {k: sum(v) / len(v) for k, v in costs.items()}
    assert mean[strategy] < mean["random"], mean


def test_neighbors_climbs_from_hints_and_stops_at_a_local_optimum():
    cands = [{"B": b, "w": w} for b in (16, 32, 64, 128, 256) for w in (1, 2, 4, 8)]
    # A bowl with its bottom at B=64, w=4 (index 10).
    times = {i: 1 + abs(c["B"].bit_length() - 7) + abs(c["w"].bit_length() - 3) for i, c in enumerate(cands)}
    result = search(cands, lambda b: {i: times[i] for i in b}, strategy="neighbors", hints=[0])
    assert result.measured[0] == 0
    assert result.best == 10 and result.stopped == "converged"
    assert len(result.measured) < len(cands)


def test_encoding_orders_numbers_and_steps_over_constraint_gaps():
    cands = [{"B": b, "m": m} for b in (128, 16, 64) for m in (None, 64)]  # B=32 cut by a constraint
    enc = Encoding(cands)
    assert enc.levels["B"] == (16, 64, 128) and enc.ordered["B"]
    assert enc.levels["m"] == (None, 64) and not enc.ordered["m"]
    i16 = cands.index({"B": 16, "m": None})
    assert {tuple(cands[j].values()) for j in enc.neighbors(i16, 1)} == {(64, None), (16, 64)}
    book_form = Encoding([{"kwargs": {"B": 16}, "num_warps": 4}])
    assert book_form.names == ("B", "num_warps")


def test_hints_come_first_for_every_strategy():
    cands = [{"B": b} for b in range(100)]
    for strategy in STRATEGIES:
        assert make_strategy(strategy, cands, hints=[42, 7, 42]).ask(2) == [42, 7], strategy


def test_auto_rule():
    assert choose_strategy(SMALL_SPACE) == "exhaustive"
    assert choose_strategy(5000, Budget(max_configs=100), hints=[3]) == "neighbors"
    assert choose_strategy(5000) == "exhaustive"  # no budget: measure everything
    assert choose_strategy(5000, Budget(max_configs=5000)) == "exhaustive"
    assert choose_strategy(5000, Budget(max_configs=200)) == "bayes"
    assert choose_strategy(5000, Budget(max_seconds=60)) == "bayes"


def test_auto_without_optuna_is_random_and_bayes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    monkeypatch.setattr("tunebook._search._driver._optuna_installed", lambda: False)
    assert choose_strategy(5000, Budget(max_configs=200)) == "random"
    with pytest.raises(ImportError) as info:
        make_strategy("bayes", [{"B": 1}, {"B": 2}])
    assert "pip install 'tunebook[optuna]'" in [line.strip() for line in str(info.value).splitlines()]


def test_bayes_never_measures_outside_a_constrained_candidate_list():
    cands = [{"B": b, "C": c} for b in range(12) for c in range(12) if (b + c) % 3 == 0]
    calls: list[int] = []

    def measure(batch):
        calls.extend(batch)
        return {i: 1.0 + (cands[i]["B"] - 5) ** 2 + (cands[i]["C"] - 7) ** 2 for i in batch}

    result = search(cands, measure, strategy="bayes", budget=Budget(max_configs=len(cands)), seed=0)
    assert_no_duplicates(calls)
    assert len(calls) == len(cands) and result.stopped == "exhausted"


def test_progress_and_time_budget():
    table = TABLES[sorted(TABLES)[0]]
    seen = []
    now = [0.0]

    def measure(batch):
        now[0] += 1.0  # each batch "takes" a second
        return {i: table.timings()[i] for i in batch}

    result = search(
        table.candidates(),
        measure,
        strategy="random",
        budget=Budget(max_seconds=3.5),
        known={0: 9.0},
        batch_size=5,
        clock=lambda: now[0],
        on_progress=lambda done, total, best: seen.append((done, total, best)),
    )
    assert result.stopped == "max_seconds" and len(result.measured) == 20
    assert [d for d, _, _ in seen] == [6, 11, 16, 21]
    assert all(total == len(table.rows) for _, total, _ in seen)
    assert seen[-1][2] == result.best_ms


def test_bad_inputs_are_explained():
    cands = [{"B": 1}, {"B": 2}]
    with pytest.raises(ValueError, match=r"unknown strategy 'simulated-annealing'.*bayes"):
        search(cands, lambda b: {}, strategy="simulated-annealing")
    with pytest.raises(IndexError, match="not an index"):
        search(cands, lambda b: {}, known={5: 1.0})
    with pytest.raises(ValueError, match="hints must be indices"):
        search(cands, lambda b: {}, strategy="random", hints=[9])
    s = make_strategy("random", cands)
    s.tell(0, 1.0)
    with pytest.raises(ValueError, match="already told"):
        s.tell(0, 2.0)
    assert set(strategy_names()) >= set(STRATEGIES)


def test_table_round_trip(tmp_path):
    rows = (TableRow({"B": 16}, 2.0), TableRow({"B": 32}, None, "OOR"))
    table = Table("k", {"N": 8}, {"backend": "cuda"}, rows, space={"B": [16, 32]})
    path = tmp_path / "t.json"
    table.dump(path)
    again = Table.load(path)
    assert again == table and again.space == {"B": [16, 32]}
    assert json.loads(path.read_text())["results"][1] == {"config": {"B": 32}, "ms": None, "error": "OOR"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_seconds": math.nan}, "max_seconds must be a positive number of seconds or None; found nan"),
        ({"max_seconds": "5"}, "max_seconds must be a positive number of seconds or None; found '5'"),
        ({"max_seconds": 0}, "max_seconds must be a positive number"),
        ({"max_seconds": True}, "max_seconds must be a positive number"),
        ({"max_configs": math.nan}, "max_configs must be a positive integer or None; found nan"),
        ({"max_configs": 2.5}, "max_configs must be a positive integer or None; found 2.5"),
        ({"max_configs": True}, "max_configs must be a positive integer or None; found True"),
        ({"max_configs": -1}, "max_configs must be a positive integer"),
    ],
)
def test_a_budget_refuses_what_autotune_refuses(kwargs, match):
    """Found by a search review: Budget (public) took NaN as no budget at all, 2.5 failed
    inside the search, and True was a budget of one config."""
    with pytest.raises(ValueError, match=re.escape(match)):
        Budget(**kwargs)
    assert Budget(max_configs=3, max_seconds=math.inf).max_configs == 3  # inf: as autotune() takes it


def test_a_time_budget_is_read_only_after_the_first_batch():
    """A budget spent before the first batch (the clock moved on, a tiny max_seconds) still
    measures one batch: a time budget never means that nothing is tuned."""
    ticks = itertools.count()  # each read of the clock a second later

    result = search(
        [{"B": b} for b in range(20)],
        lambda batch: {i: float(i + 1) for i in batch},
        strategy="exhaustive",
        budget=Budget(max_seconds=0.5),
        batch_size=4,
        clock=lambda: float(next(ticks)),
    )
    assert result.measured == (0, 1, 2, 3) and result.stopped == "max_seconds"


@pytest.mark.parametrize("seed", [-1, 2**40, 1796500479560501460])
def test_bayes_takes_any_integer_seed_as_random_does(seed):
    """Found by a search review: a seed outside 0..2**32-1 (``seed=-1``, ``time.time_ns()``)
    passed decoration, then failed the first call of every new key inside Optuna."""
    cands = [{"B": b, "W": w} for b in range(8) for w in range(4)]

    def order(s):
        return search(
            cands,
            lambda batch: {i: 1.0 + i for i in batch},
            strategy="bayes",
            seed=s,
            budget=Budget(max_configs=6),
        ).measured

    assert order(seed) == order(seed % 2**32)  # documented: the seed modulo 2**32
