"""The short-kernel measurement policy (``TUNEBOOK_TIMER=short``, ``_short.py``).

The rule is tested with deterministic injected timings: a clock that drifts and spikes
the way launch noise does, so that a naive one-at-a-time median is fooled and the policy
must not be; a real 10% gap; a tie that the tie-aware choice settles; early stopping and
the bound. Then the whole path on the CPU interpreter with the wall-clock stand-in.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

import tunebook
from conftest import book_files
from small_kernels import add_kernel, grid_1d, vectors
from tunebook import _short
from tunebook._bench import Timers, choose_timers
from tunebook._book.records import Entry, Result
from tunebook._short import Rule, ShortPolicy, interleave, verdict
from tunebook._tuner import KeyTuning, Persist, tune_key


class Clock:
    """Injected timings: contender -> true us per call, seen through a shared clock that
    drifts (each sample taken moves it), jitters, and spikes (a share ``spikes`` of the
    samples, drawn from a seeded generator, are ``spike`` times slower: a launch that
    waited on the host)."""

    def __init__(
        self,
        true_us: dict[str, float],
        drift: Callable[[int], float] = lambda t: 1.0,
        spikes: float = 0.0,
        spike: float = 3.0,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.true_us, self.drift, self.spikes, self.spike = true_us, drift, spikes, spike
        self.jitter, self.rng, self.t = jitter, random.Random(seed), 0
        self.calls: list[str] = []

    def sample(self, name: str) -> float:
        self.t += 1
        self.calls.append(name)
        value = self.true_us[name] * self.drift(self.t) * (1 + self.rng.uniform(-self.jitter, self.jitter))
        if self.rng.random() < self.spikes:
            value *= self.spike
        return value

    def samplers(self) -> dict[str, Callable[[], float]]:
        return {name: (lambda name=name: self.sample(name)) for name in self.true_us}


def ramp(hi: float, lo: float, steps: int) -> Callable[[int], float]:
    """A clock that slows from ``hi`` to ``lo`` over ``steps`` samples (thermal drift)."""
    return lambda t: hi + (lo - hi) * min(t, steps) / steps


def test_rounds_interleave_every_contender_in_a_rotated_order() -> None:
    clock = Clock({"a": 10.0, "b": 10.0, "c": 10.0})
    rounds = interleave(clock.samplers(), Rule(min_rounds=4, max_rounds=4))
    assert clock.calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert rounds.calls == clock.calls and all(len(s) == 4 for s in rounds.samples.values())


def test_drift_and_spikes_that_fool_a_naive_median_do_not_fool_the_policy() -> None:
    true = {"fast": 10.0, "slow": 11.0}
    rule = Rule()
    n = rule.max_rounds
    # One at a time, as a full timer measures contenders: all of one, then all of the other.
    naive = Clock(true, drift=ramp(1.3, 0.7, 2 * n), spikes=0.2, jitter=0.03)
    medians = {k: statistics.median(naive.sample(k) for _ in range(n)) for k in true}
    assert min(medians, key=medians.__getitem__) == "slow"  # the noise flips a naive median

    clock = Clock(true, drift=ramp(1.3, 0.7, 2 * n), spikes=0.2, jitter=0.03)
    rounds = interleave(clock.samplers(), rule)
    assert rounds.verdict.leader == "fast" and rounds.verdict.beaten == {"slow"}
    assert 1.07 < rounds.verdict.ratios["slow"] < 1.13


@pytest.mark.parametrize("seed", range(5))
def test_a_real_ten_percent_gap_is_found_and_stops_early(seed: int) -> None:
    clock = Clock({"a": 5.0, "b": 5.5, "c": 5.6}, spikes=0.15, jitter=0.05, seed=seed)
    rule = Rule()
    rounds = interleave(clock.samplers(), rule)
    assert rounds.verdict.leader == "a" and rounds.verdict.beaten == {"b", "c"}
    assert rounds.verdict.decided and rounds.verdict.rounds < rule.max_rounds


def test_a_small_gap_is_a_tie_not_a_win() -> None:
    clock = Clock({"a": 10.0, "b": 10.05}, jitter=0.01, spikes=0.2)
    rounds = interleave(clock.samplers(), Rule())
    assert not rounds.verdict.beaten and rounds.verdict.decided
    assert set(rounds.verdict.tied) | {rounds.verdict.leader} == {"a", "b"}


def test_an_undecided_contender_is_measured_to_the_bound_and_not_beaten() -> None:
    # b's per-round ratio alternates 0.99 and 1.05: median 1.02, lost half the rounds, and
    # an interval wider than the margin: neither beaten nor a confident tie.
    pattern = itertools.cycle([0.99, 1.05])
    samplers = {"a": lambda: 10.0, "b": lambda: 10.0 * next(pattern)}
    rule = Rule(min_rounds=10, max_rounds=40)
    rounds = interleave(samplers, rule)
    assert rounds.verdict.rounds == 40 and not rounds.verdict.decided
    assert rounds.verdict.undecided == {"b"} and not rounds.verdict.beaten


def test_the_leader_is_the_contender_no_other_beats_in_paired_ratio() -> None:
    # a has the lowest raw median, but b is faster than a in 4 rounds of 5.
    samples = {"a": [5.0, 5.0, 5.0, 20.0, 20.0], "b": [4.9, 4.9, 4.9, 19.0, 19.0]}
    assert verdict(samples, Rule(min_rounds=1)).leader == "b"


def test_recorded_estimates_agree_with_the_rule() -> None:
    clock = Clock({"a": 10.0, "b": 11.0}, drift=ramp(1.2, 0.8, 40), jitter=0.02)
    rounds = interleave(clock.samplers(), Rule())
    (a, a20, a80), (b, b20, b80) = rounds.estimate_ms("a"), rounds.estimate_ms("b")
    assert a20 <= a <= a80 and b20 <= b <= b80
    assert b / a == pytest.approx(rounds.verdict.ratios["b"]) and b > a * 1.02


# ------------------------------------------------------------------ through tune_key


class Token:
    """A stand-in launch: which config it is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> None:
        pass


def injected_job(clock: Clock, quick_us: dict[str, float], hints: list[int], rule: Rule) -> KeyTuning:
    names = list(quick_us)

    def quick(call: Token, quantiles: Any = None) -> list[float]:
        return [quick_us[call.name] / 1e3] * 3

    def full(call: Token, quantiles: Any = None) -> list[float]:
        raise AssertionError("the policy measures short contenders, not the full timer")

    def prepare(call: Callable[[], Any], launches: int) -> Callable[[], float]:
        name = call.name  # type: ignore[attr-defined]
        return lambda: clock.sample(name)

    policy = ShortPolicy(rule=rule, prepare=prepare)
    return KeyTuning(
        key_text="k",
        key=(1,),
        configs=names,
        ids=names,
        records=[{"kwargs": {"name": n}} for n in names],
        known=None,
        timers=Timers(quick, full, "test-interleaved", True, short=policy),
        bench=lambda timer, config: timer(Token(config), quantiles=None),
        persist=Persist(None, "k", (1,), names[0], None),
        is_unexpected=lambda exc: True,
        hints=hints,
    )


def test_tune_key_measures_short_contenders_interleaved_and_drops_the_beaten() -> None:
    # Quick timings (one sample each, noisy) put b first; interleaved rounds find a.
    clock = Clock({"a": 5.0, "b": 5.5}, drift=ramp(1.2, 0.9, 60), jitter=0.03)
    outcome = tune_key(injected_job(clock, {"a": 5.4, "b": 5.1}, [], Rule()))
    assert outcome.entry.chosen == "a" and outcome.entry.best() == "a"
    assert set(clock.calls) == {"a", "b"}
    assert not any(r.quick for r in outcome.entry.results.values())


def test_a_tie_goes_to_the_tie_aware_choice() -> None:
    # whatever the noise, the hinted config of a tie the rounds cannot break wins
    for seed in range(3):
        clock = Clock({"a": 5.0, "b": 5.005}, jitter=0.03, seed=seed)
        outcome = tune_key(injected_job(clock, {"a": 5.0, "b": 5.0}, [1], Rule()))
        assert outcome.entry.chosen == "b" and outcome.entry.best() == "b"


def test_a_hint_the_rounds_tell_apart_as_slower_is_not_kept() -> None:
    # b is hinted and 1% slower, within the 2% tie tolerance, but measured precisely enough
    # that every interval of its ratio lies above 1: the leader wins, and the book agrees.
    for seed in range(3):
        clock = Clock({"a": 5.0, "b": 5.05}, jitter=0.002, seed=seed)
        outcome = tune_key(injected_job(clock, {"a": 5.0, "b": 5.0}, [1], Rule()))
        assert outcome.entry.chosen == "a" and outcome.entry.best() == "a"
    samples = {"a": [5.0] * 10, "b": [5.05] * 10, "c": [5.0, 5.1] * 5}
    v = verdict(samples, Rule())
    assert v.slower == {"b"} and v.tied == {"b", "c"}  # c: its interval still reaches 1


def test_a_hint_outside_the_fastest_few_is_measured_before_it_can_win_a_tie() -> None:
    # Nine configs lead on quick timings; the hinted one is 1.8% behind them, within the tie
    # tolerance but not among the eight contenders. It must join the rounds, which tell it
    # apart, instead of winning the tie on its quick timing.
    quick = {f"c{k}": 5.0 for k in range(9)} | {"h": 5.09}
    clock = Clock({f"c{k}": 5.0 + 0.001 * k for k in range(9)} | {"h": 5.09}, jitter=0.002)
    outcome = tune_key(injected_job(clock, quick, [9], Rule()))
    assert "h" in clock.calls and outcome.entry.chosen != "h" and outcome.entry.best() != "h"


def test_a_hint_the_book_holds_in_full_is_not_timed_again_and_readers_pick_the_same() -> None:
    # h, 1% behind on the screening and ninth, was measured in full by an earlier process: a
    # new number for it could not replace the book's, so it is not re-timed, and the choice is
    # made on the numbers the book keeps, as Entry.best reads them.
    quick = {f"c{k}": 4.90 for k in range(8)} | {"h": 4.95}
    known = Entry(key=(1,), results={"h": Result({"kwargs": {"name": "h"}}, (0.00495,) * 3, None, "t0")})
    clock = Clock({"c0": 5.10, "h": 5.16} | {f"c{k}": 5.6 for k in range(1, 8)}, jitter=0.002)
    job = injected_job(clock, quick, [8], Rule())
    job.known, job.persist = known, Persist(None, "k", (1,), "c0", known)
    entry = tune_key(job).entry
    assert "h" not in clock.calls and entry.results["h"].ms == (0.00495,) * 3
    assert entry.chosen == entry.best() == entry.best(list(quick)) == "h"


@pytest.mark.parametrize("hints", [[], [8]])
def test_a_config_timed_only_quickly_never_wins_over_full_measurements(hints: list[int]) -> None:
    # x screened 2.5% behind the eight fastest (neither a contender nor within the tie); the
    # rounds then read those eight 4% higher than their screening. x, hinted or not, keeps only
    # its screening number, which must not beat the full measurements, here or when read.
    quick = {f"c{k}": 5.0 for k in range(8)} | {"x": 5.125}
    clock = Clock({"c0": 5.2, "x": 5.5} | {f"c{k}": 5.6 for k in range(1, 8)}, jitter=0.002)
    entry = tune_key(injected_job(clock, quick, hints, Rule())).entry
    assert "x" not in clock.calls and entry.results["x"].quick
    assert entry.chosen == entry.best() == "c0"


def test_long_kernels_confirm_a_hint_within_the_tie_with_the_full_timer() -> None:
    clock = Clock({})
    job = injected_job(clock, {f"c{k}": 100.0 for k in range(9)} | {"h": 101.5}, [9], Rule())
    true = {f"c{k}": 100.0 for k in range(9)} | {"h": 103.0}
    used: list[str] = []

    def full(call: Token, quantiles: Any = None) -> list[float]:
        used.append(call.name)
        return [true[call.name] / 1e3] * 3

    job.timers = Timers(job.timers.quick, full, "test", True, short=job.timers.short)
    outcome = tune_key(job)
    assert "h" in used and outcome.entry.chosen == "c0" and outcome.entry.best() == "c0"


def test_long_kernels_keep_the_full_timer() -> None:
    clock = Clock({"a": 100.0, "b": 100.0})
    job = injected_job(clock, {"a": 100.0, "b": 101.0}, [], Rule())
    used: list[str] = []

    def full(call: Token, quantiles: Any = None) -> list[float]:
        used.append(call.name)
        return [0.1, 0.1, 0.1]

    job.timers = Timers(job.timers.quick, full, "test", True, short=job.timers.short)
    tune_key(job)
    assert sorted(used) == ["a", "b"] and not clock.calls


# ------------------------------------------------------------------ settings and identity


def test_the_policy_is_off_by_default_and_changes_the_timer_id(monkeypatch: pytest.MonkeyPatch) -> None:
    factory, timer_id = choose_timers(None, None, None, use_cuda_graph=True)
    assert timer_id == "wallclock" and factory().short is None  # the interpreter's timer
    monkeypatch.setenv("TUNEBOOK_TIMER", "short")
    factory, timer_id = choose_timers(None, None, None, use_cuda_graph=True)
    assert timer_id == "wallclock-interleaved" and factory().short is not None
    assert factory().short.prepare is _short.wall_sampler
    custom, custom_id = choose_timers(lambda f, quantiles=None: [1.0] * 3, None, None, False)
    assert custom_id.startswith("custom:") and custom().short is None  # a user do_bench decides alone


def test_an_unknown_timer_is_refused_at_decoration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOOK_TIMER", "fast")
    with pytest.raises(tunebook.ConfigurationError, match=r"TUNEBOOK_TIMER=.fast.*expected .short."):
        tunebook.autotune([tunebook.Config({"BLOCK": 32})], key=["n"])(add_kernel)


def test_a_bad_threshold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOOK_TIMER", "short")
    monkeypatch.setenv("TUNEBOOK_SHORT_KERNEL_US", "-3")
    with pytest.raises(tunebook.ConfigurationError, match="number of microseconds"):
        choose_timers(None, None, None, False)


def test_on_the_interpreter_the_policy_tunes_a_real_kernel_on_its_own_page(
    book_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = [tunebook.Config({"BLOCK": b}) for b in (32, 64, 128)]
    plain = tunebook.autotune(configs, key=["n"])(add_kernel).identity()
    monkeypatch.setenv("TUNEBOOK_TIMER", "short")
    monkeypatch.setenv("TUNEBOOK_SHORT_KERNEL_US", "1e9")  # every interpreted call is "short"
    kernel = tunebook.autotune(configs, key=["n"])(add_kernel)
    calls: list[int] = []
    sampler = _short.wall_sampler

    def counting(call: Callable[[], Any], launches: int) -> Callable[[], float]:
        sample = sampler(call, launches)
        return lambda: calls.append(launches) or sample()

    monkeypatch.setattr(_short, "wall_sampler", counting)
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    ident = kernel.identity()
    assert ident.platform["timer"] == "wallclock-interleaved" and ident.platform_id != plain.platform_id
    assert calls and set(calls) == {1} and len(calls) >= Rule().min_rounds  # one call per sample, rounds
    entry = kernel.page().get(next(iter(kernel.page().keys())))
    assert entry is not None and entry.chosen and entry.best() == entry.chosen
    assert kernel.config_index.id_of(kernel.best_config) == entry.chosen
    assert [p for p in book_files(book_dir) if plain.platform_id in p.name] == []


def test_on_the_interpreter_a_sample_is_one_call_however_fast_the_host() -> None:
    """Sized by time, a host that interprets a call in under 1,000 us got two calls a sample
    (a CI run of the test above failed on it): the interpreter's policy takes one, always."""
    policy = _short.policy_from_settings(interpreting=True)
    for quick_us in (50.0, 600.0, 5_000.0):
        assert _short.launches_for(quick_us, policy.sample_us, policy.min_launches) == 1
