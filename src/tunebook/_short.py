"""Measuring microsecond kernels: the short-kernel policy (opt-in, ``TUNEBOOK_TIMER=short``).

A decode-time kernel runs for 3-30 us. Timed one sample at a time, launch overhead, clock
and thermal drift are as large as the gaps between configs (DESIGN.md: one RMSNorm config
read 5.1-14.1 us across five samples on an H200), so the winner is noise. When the
contenders' quick timings are below ``TUNEBOOK_SHORT_KERNEL_US`` (50 us by default), their
final measurement is, instead of one full timing each:

* **many launches per sample**: each contender's launch is captured ``launches`` times in
  one CUDA graph, and a sample is one replay / ``launches`` (host launch cost amortized);
* **interleaved rounds**: round r samples every contender once, in an order rotated by r,
  so drift hits every contender alike and no contender always runs first;
* **a confidence rule** (:func:`verdict`): per round, each contender's time over the
  leader's. A contender is *beaten* only if its median ratio exceeds ``1 + margin`` **and**
  it lost in at least ``beat_share`` of the rounds; it is *tied* once a distribution-free
  interval of its median ratio lies within ``margin`` of 1. Rounds stop when every
  contender is beaten or tied (at least ``min_rounds``), or after ``max_rounds``;
  undecided ones count as tied. The winner is the existing tie-aware choice among the
  leader and the contenders the rounds cannot tell from it (:attr:`Verdict.slower`): a
  hinted config is kept within ``TIE_TOLERANCE`` of the fastest only while the interval
  of its ratio still reaches 1. Why: that tolerance absorbs noise, and this measurement
  has little; re-timed in fresh processes on an H200, a hint kept 1% behind the leader
  came out 3.2% behind it, past the 3% a winner is allowed.

The rule is pure (:func:`verdict`, :func:`interleave` over injected samplers), so it is
tested with deterministic timings on a CPU; under Triton's interpreter the samplers are the
host clock (:func:`wall_sampler`), on a GPU CUDA-graph replays (:func:`graph_sampler`).

The recorded time of each contender is the leader's median times the contender's median
per-round ratio (a paired estimate: drift cancels), so the book's read-time choice
(``Entry.best``) agrees with the rule's. Books tuned this way live under their own timer
id (``<timer>-interleaved``), never mixed with timings of another method.

>>> rule = Rule(min_rounds=3, max_rounds=3)
>>> v = verdict({"a": [10.0, 10.1, 9.9], "b": [11.0, 11.2, 10.9]}, rule)
>>> v.leader, sorted(v.beaten), v.decided
('a', ['b'], True)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from . import _settings
from ._book.records import TIE_TOLERANCE, Result

K = TypeVar("K", bound=Hashable)
Sampler = Callable[[], float]  # one sample: the time of one call, in microseconds
# (a launch of the candidate, calls per sample) -> a sampler of it
Prepare = Callable[[Callable[[], Any], int], Sampler]

ID_SUFFIX = "-interleaved"
DEFAULT_SHORT_US = 50.0


@dataclass(frozen=True)
class Rule:
    """When a contender is beaten, when the measurement stops."""

    margin: float = TIE_TOLERANCE  # within this fraction of the leader: a tie
    beat_share: float = 0.75  # a contender is beaten only if it lost at least this share of rounds
    min_rounds: int = 10
    max_rounds: int = 60
    z: float = 1.645  # the tie interval's width: a two-sided ~90% sign-test interval of the median


@dataclass(frozen=True)
class Verdict(Generic[K]):
    """The rule applied to the rounds so far."""

    leader: K
    rounds: int
    beaten: frozenset[K]
    tied: frozenset[K]  # confidently within the margin of the leader
    ratios: dict[K, float]  # median per-round time over the leader's (the leader: 1.0)
    decided: bool
    # the beaten, and those whose ratio's interval lies above 1: told apart from the leader
    slower: frozenset[K] = frozenset()

    @property
    def undecided(self) -> frozenset[K]:
        return frozenset(self.ratios) - self.beaten - self.tied - {self.leader}


def verdict(samples: Mapping[K, Sequence[float]], rule: Rule) -> Verdict[K]:
    """The rule over ``samples`` (contender -> its time in each round, rounds aligned).

    The leader is the contender no other beats in median per-round ratio (found from the
    lowest median by at most one step per contender: medians of ratios need not be transitive).
    """
    if not samples:
        raise ValueError("verdict: expected at least one contender's samples, found none")
    n = min(len(s) for s in samples.values())
    if n == 0:
        raise ValueError("verdict: expected at least one round of samples, found none")
    series = {k: list(s[:n]) for k, s in samples.items()}
    leader = min(series, key=lambda k: statistics.median(series[k]))
    for _ in range(len(series)):
        ratios = {k: statistics.median(_ratios(series[k], series[leader])) for k in series}
        faster = min(series, key=lambda k: ratios[k])
        if ratios[faster] >= 1.0 or faster == leader:
            break
        leader = faster
    ratios = {k: statistics.median(_ratios(series[k], series[leader])) for k in series}
    beaten, tied, slower = set(), set(), set()
    enough = n >= rule.min_rounds
    for k in series:
        if k == leader or not enough:
            continue
        per_round = _ratios(series[k], series[leader])
        lost = sum(r > 1.0 for r in per_round) / n
        lo, hi = median_interval(per_round, rule.z)
        if lo > 1.0:
            slower.add(k)
        if ratios[k] > 1 + rule.margin and lost >= rule.beat_share:
            beaten.add(k)
            continue
        if 1 / (1 + rule.margin) <= lo and hi <= 1 + rule.margin:
            tied.add(k)
    decided = enough and len(beaten) + len(tied) == len(series) - 1
    return Verdict(leader, n, frozenset(beaten), frozenset(tied), ratios, decided, frozenset(slower | beaten))


def _ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y if y > 0 else math.inf for x, y in zip(a, b)]


def median_interval(values: Sequence[float], z: float) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (the sign test's order
    statistics, normal approximation): wide for few values, narrowing as sqrt(n).

    >>> median_interval([float(v) for v in range(1, 31)], 1.645)
    (11.0, 20.0)
    """
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return ordered[min(k, n - 1)], ordered[max(n - 1 - k, 0)]


def order(contenders: Sequence[K], round_: int) -> list[K]:
    """Round ``round_``'s order: the contenders rotated by the round number.

    >>> order(["a", "b", "c"], 0), order(["a", "b", "c"], 1), order(["a", "b", "c"], 4)
    (['a', 'b', 'c'], ['b', 'c', 'a'], ['b', 'c', 'a'])
    """
    if not contenders:
        return []
    r = round_ % len(contenders)
    return [*contenders[r:], *contenders[:r]]


@dataclass
class Rounds(Generic[K]):
    """What :func:`interleave` measured: every sample in us, and the final verdict."""

    samples: dict[K, list[float]]
    verdict: Verdict[K]
    calls: list[K] = field(default_factory=list)  # the order samples were taken in

    def estimate_ms(self, k: K) -> tuple[float, float, float]:
        """(median, p20, p80) of ``k`` in ms: the leader's median times ``k``'s median ratio
        to it; p20 and p80 keep the proportions of ``k``'s own samples."""
        own = self.samples[k]
        lead = statistics.median(self.samples[self.verdict.leader])
        median = lead * self.verdict.ratios[k]
        raw = statistics.median(own)
        scale = median / raw if raw > 0 else 1.0
        return (median / 1e3, _quantile(own, 0.2) * scale / 1e3, _quantile(own, 0.8) * scale / 1e3)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def interleave(samplers: Mapping[K, Sampler], rule: Rule) -> Rounds[K]:
    """Sample every contender once per round, rotating the order, until the rule decides
    (from ``rule.min_rounds`` on) or ``rule.max_rounds``. One contender needs
    ``min_rounds`` rounds only: there is nothing to decide."""
    names = list(samplers)
    samples: dict[K, list[float]] = {k: [] for k in names}
    calls: list[K] = []
    for r in range(max(rule.max_rounds, 1)):
        for k in order(names, r):
            samples[k].append(samplers[k]())
            calls.append(k)
        if r + 1 >= rule.min_rounds and verdict(samples, rule).decided:
            break
    return Rounds(samples, verdict(samples, rule), calls)


# ------------------------------------------------------------------ samplers


def launches_for(quick_us: float, sample_us: float = 1000.0, lo: int = 8, hi: int = 1000) -> int:
    """Calls per sample: about ``sample_us`` of GPU time, at least ``lo``, at most ``hi``.

    >>> launches_for(5.0), launches_for(0.1), launches_for(400.0)
    (200, 1000, 8)
    """
    if not quick_us > 0:
        return hi
    return max(lo, min(hi, math.ceil(sample_us / quick_us)))


def wall_sampler(call: Callable[[], Any], launches: int) -> Sampler:
    """The CPU stand-in (Triton's interpreter): ``launches`` calls on the host clock."""
    call()

    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(launches):
            call()
        return (time.perf_counter() - t0) * 1e6 / launches

    return sample


def graph_sampler(call: Callable[[], Any], launches: int) -> Sampler:
    """``launches`` calls captured in one CUDA graph; a sample is one replay timed with CUDA
    events, per call. The graph (and its memory pool) lives as long as the sampler."""
    import torch  # deferred: only a GPU tuning gets here

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch advises
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            call()
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample() -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) * 1e3 / launches

    sample.graph = graph  # type: ignore[attr-defined]
    return sample


# ------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class ShortPolicy:
    """The policy a tuning uses: below ``short_us`` the contenders are measured by
    :func:`interleave` with ``prepare``'s samplers; above it, as without the policy."""

    short_us: float = DEFAULT_SHORT_US
    rule: Rule = Rule()
    prepare: Prepare = graph_sampler
    sample_us: float = 1000.0  # time per sample, sizing the launches per sample
    min_launches: int = 8

    def applies(self, quick_ms: float) -> bool:
        return quick_ms * 1e3 < self.short_us

    def timer_id(self, base: str) -> str:
        """The platform's timer id under this policy: a page of its own."""
        return base + ID_SUFFIX


def policy_from_settings(interpreting: bool) -> ShortPolicy:
    """The policy ``TUNEBOOK_TIMER=short`` selects: host-clock samples under Triton's
    interpreter (no CUDA graphs there), CUDA-graph replays on a GPU."""
    short_us = _settings.short_kernel_us()
    if interpreting:  # an interpreted call takes about a millisecond: one per sample, always
        # (sizing by time would give 2 where a fast host runs a call in under 1,000 us)
        return ShortPolicy(short_us=short_us, prepare=wall_sampler, min_launches=1, sample_us=0.0)
    return ShortPolicy(short_us=short_us, prepare=graph_sampler)


Measure = Callable[[int, Callable[..., Any]], Any]  # (contender, timer) -> its Result or None


class _Preparing:
    """A timer with Triton's benchmarker signature that builds a contender's sampler and
    answers one sample of it (ms), so that a contender that cannot run fails the usual way."""

    def __init__(self, prepare: Prepare, launches: int) -> None:
        self.prepare, self.launches = prepare, launches
        self.sampler: Sampler | None = None

    def __call__(self, call: Callable[[], Any], quantiles: Any = None) -> float:
        self.sampler = self.prepare(call, self.launches)
        return self.sampler() / 1e3


TimeOne = Callable[[int, Callable[..., Any], bool], Result | None]  # tune_key's (i, timer, quick)


def confirm_results(
    policy: ShortPolicy, ids: Sequence[str], contenders: Sequence[int], quick_ms: float, time_one: TimeOne
) -> tuple[dict[str, Result | None], set[str]]:
    """``tune_key``'s full measurement of ``contenders`` under the policy: their results by
    config id (failures as measured) and the ids the rounds told apart from the leader as
    slower (:attr:`Verdict.slower`), which the tie-aware choice then leaves out."""
    measured: dict[int, Result | None] = {}

    def measure(i: int, timer: Callable[..., Any]) -> Result | None:
        measured[i] = time_one(i, timer, False)
        return measured[i]

    timings, slower, _ = confirm(policy, contenders, quick_ms, measure)
    out: dict[str, Result | None] = {ids[i]: r for i, r in measured.items()}
    for i, ms in timings.items():
        first = measured[i]
        if first is not None:
            out[ids[i]] = replace(first, ms=ms)
    return out, {ids[i] for i in slower}


def confirm(
    policy: ShortPolicy, contenders: Sequence[int], quick_ms: float, measure: Measure
) -> tuple[dict[int, tuple[float, float, float]], set[int], Rounds[int] | None]:
    """Measure ``contenders`` under the policy: (their (median, p20, p80) in ms, the ones
    told apart from the leader as slower, the rounds). ``measure(i, timer)`` runs the
    tuning's usual path for contender ``i`` with a *preparing* timer (which builds its
    sampler and takes one sample), so that a contender that fails is recorded as a failure
    the usual way and left out here."""
    launches = launches_for(quick_ms * 1e3, policy.sample_us, policy.min_launches)
    samplers: dict[int, Sampler] = {}
    for i in contenders:
        preparing = _Preparing(policy.prepare, launches)
        result = measure(i, preparing)
        if preparing.sampler is not None and result is not None and getattr(result, "ok", False):
            samplers[i] = preparing.sampler
    if not samplers:
        return {}, set(), None
    rounds = interleave(samplers, policy.rule)
    return {i: rounds.estimate_ms(i) for i in samplers}, set(rounds.verdict.slower), rounds
