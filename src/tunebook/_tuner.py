"""Tuning one key: which candidates to measure, how, and which one wins.

    strategy proposes a batch ─► compile the batch ahead, in parallel ─► quick measurement
      ▲                                                                   │ persisted at once
      └───────────── told the results ◄───────────────────────────────────┘
    then: full measurement of the contenders ─► tie-aware choice ─► persisted

* **Resumable.** Every batch is persisted as soon as it is measured; a run killed halfway
  starts again from the book's results for the key (``known``), which are never re-measured.
* **Failures are data.** A config that fails to compile or run is stored with its reason
  and never retried for the key. A wrong result under ``check=`` is a verdict that holds
  while what it was judged under does (the reference config, the settings): a key whose
  verdicts were judged otherwise is tuned again from scratch (``judged_again``). A failure
  of the moment (``is_transient``: another thread's launch collided with this one on
  Triton's interpreter) is measured once more at once, and if it fails so again, it is not
  stored: a later tuning of the key measures the config.
* **Adaptive.** With a GPU timer, candidates get a short screening measurement; only those
  within CONTENDER_MARGIN of the best are measured in full (successive halving in one step).
* **Tie-aware.** Among contenders within measurement noise of the fastest, the winner of a
  neighbouring key (a hint) is preferred, so that similar keys get the same config and the
  same book gives the same winner run after run.
* **Where a batch is measured is injected**, nothing else: ``KeyTuning.exchange`` gets each
  batch (and the contenders' full measurement) and a way to time candidates here; a group's
  leader deals the batch across the ranks (``_collective.py``), so a group runs this very
  loop, strategy and choice.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import _failures, _stats, _warnings
from ._bench import Timers, as_triple
from ._book import Entry, Page, Result, now_iso
from ._book.records import TIE_TOLERANCE
from ._errors import NoRecordedGrid
from ._failures import (
    ERROR_LIMIT,
    NO_TIMING,
    by_reference_search,
    doubted_reference,
    is_wrong_result,
    judged_under,
    no_timing,
    says_nothing,
    superseded,
    to_measure_again,
)
from ._jsonio import stored_key
from ._progress import Progress
from ._search import Budget, choose_strategy, search
from ._short import confirm_results
from ._version import __version__

log = logging.getLogger("tunebook")

# Contenders: successful configs whose quick median is within this fraction of the best.
CONTENDER_MARGIN = 0.10
MAX_CONTENDERS = 8
# Persist measured results after this many configs, or this many seconds, whichever first.
SAVE_EVERY = 4
SAVE_EVERY_S = 1.0
# Candidates a search asks for at a time (an exhaustive one without a time budget: all).
BATCH = 16
# While no config of a key has run, this many measured configs failing with one and the same
# exception (type and text) that is not a config's own is the call's bug (an always-raising
# grid function or hook): said now, not after the whole search, each config compiled first.
SAME_FAILURE_LIMIT = 8


# Measures candidates (indices) in this process: ``(indices, full) -> {index: result}``; a
# result is None for a candidate not measured (skipped, or a failure of the moment).
Here = Callable[[list[int], bool], dict[int, Result | None]]
# Measures a batch of candidates somewhere: ``(indices, full, here) -> {index: result}``.
Exchange = Callable[[list[int], bool, Here], dict[int, Result | None]]


@dataclass
class KeyTuning:
    """Everything the tuning of one key needs from its autotuner."""

    key_text: str
    key: Sequence[Any]
    configs: Sequence[Any]
    ids: Sequence[str]
    records: Sequence[dict[str, Any]]
    known: Entry | None
    timers: Timers
    bench: Callable[[Callable[..., Any], Any], Any]  # (timer, config) -> timing; raises on failure
    persist: Callable[[dict[str, Result], str, float], Entry]  # (new results, chosen, seconds)
    is_unexpected: Callable[[BaseException], bool]
    # Why a failure is one of the moment, not the config's (None: it is the config's).
    is_transient: Callable[[BaseException], str | None] = lambda exc: None
    precompile: Callable[[list[Any]], None] | None = None
    strategy: str = "auto"
    budget: Budget = field(default_factory=Budget)
    hints: Sequence[int] = ()
    # The config fallback= picks (_miss.rule_hint): measured first and kept on a tie like a
    # hint, after the hints, but it leaves the strategy as the hints alone would choose it.
    rule: int | None = None
    # Measured before everything else, never kept on a tie (_miss.earlier_seeds): what other
    # versions of the kernel found fastest for the key.
    seeds: Sequence[int] = ()
    seed: int = 0
    progress: Progress | None = None
    # How each batch is measured (None: here). A group's leader deals it across the ranks
    # (_collective.py); ``here`` measures a part of it in this process.
    exchange: Exchange | None = None
    label: str = "kernel"  # the kernel's name in messages
    # The kernel's page on this device's platform (its file name; "" without one): what is
    # said once per key is said once per key and platform.
    where: str = ""


class Observer(Protocol):
    """Told about each candidate of every tuning in this process (a worker process reports them
    to its supervisor, which blames the candidate that was running if the process dies)."""

    def candidate(
        self, key_text: str, key: Sequence[Any], cid: str, record: Mapping[str, Any], reference: bool = False
    ) -> None:
        """``reference``: launched as check='s would-be reference, not measured."""

    def result(self, key_text: str, key: Sequence[Any], cid: str, result: Result, kept: bool = True) -> None:
        """``kept``: False for a failure held out of the book (``tune_key``'s ``held``)."""


_observer: Observer | None = None


@contextlib.contextmanager
def observed(observer: Observer) -> Iterator[None]:
    """Tell ``observer`` about every candidate measured in this process meanwhile."""
    global _observer
    previous, _observer = _observer, observer
    try:
        yield
    finally:
        _observer = previous


class Persist:
    """The persist step of one key: record news in the book, return the entry as it now stands.

    What is known for the key (e.g. from a shipped read-only book) is carried into the
    writable book, so that it stands on its own. With no page (``TUNEBOOK_MODE=off``) results
    are remembered for this call only.
    """

    def __init__(self, page: Page | None, key_text: str, key: Sequence[Any], first: str, known: Entry | None):
        self.page = page
        self.key_text = key_text
        self.key = stored_key(key)
        self.first = first
        self.entry = known
        self._seconds = 0.0
        # A search that starts over a decided entry reopens it (Entry.merged_over).
        self._reopens = known.chosen if known is not None else ""

    def __call__(self, fresh: dict[str, Result], chosen: str, seconds: float) -> Entry:
        stamp = now_iso()
        previous = self.entry
        news = Entry(
            key=self.key,
            results={**(previous.results if previous is not None else {}), **fresh},
            tuning_seconds=seconds - self._seconds,
            tuned_at=previous.tuned_at if previous is not None and previous.tuned_at else stamp,
            updated_at=stamp,
            tunebook=__version__,
            chosen=chosen,
            first=self.first,
            reopens=self._reopens,
        )
        self._seconds = seconds
        if self.page is None:
            merged = replace(
                news.merged_over(previous), chosen=chosen or (previous.chosen if previous else "")
            )
        else:
            merged = self.page.record(self.key_text, news)
        self.entry = merged
        return merged


@dataclass
class Outcome:
    entry: Entry
    measured: int  # configs timed in this call
    failures: int
    seconds: float
    # Why the search ended: SearchResult.stopped, and in words for the lines a user reads
    # (why_stopped); both "" where another process or rank searched.
    stopped: str = ""
    why: str = ""
    # Where no config of the key ran (none_ran): that, in words, for the error of a launch
    # of the first config in their place.
    none_ran: str = ""


def why_stopped(stopped: str, budget: Budget) -> str:
    """A search's end in words, for the lines a user reads (progress, TRITON_PRINT_AUTOTUNING).

    >>> why_stopped("converged", Budget(max_configs=24))
    'the search converged: no untried config near the best'
    >>> why_stopped("max_configs", Budget(max_configs=24)), why_stopped("max_seconds", Budget(max_seconds=5))
    ('the budget of 24 configs', 'the time budget of 5 s')
    """
    if stopped == "converged":
        return "the search converged: no untried config near the best"
    if stopped == "max_configs" and budget.max_configs is not None:
        return f"the budget of {budget.max_configs} configs"
    if stopped == "max_seconds" and budget.max_seconds is not None:
        return f"the time budget of {budget.max_seconds:g} s"
    return "every config measured"


class Timing:
    """Times candidates of one key in this process: the config's result as the book stores
    it, a failure of the moment (``is_transient``) measured once more, every candidate told
    to the observer. Counts what it screened (``measured``), the failures, and the
    exceptions that point at the call rather than the config (``unexpected``)."""

    def __init__(self, job: KeyTuning) -> None:
        self.job = job
        self.measured = 0
        self.failures = 0
        self.unexpected: list[BaseException] = []
        self.unexpected_ids: list[str] = []
        self.expected_ids: set[str] = set()  # timed here, failed with the backend's "cannot run"
        self.said = False  # the first unexpected failure recorded was said

    def say_recorded(self) -> None:
        """Say once that an unexpected failure goes into the book: it is never retried, and
        its cause may be the call's (a grid function or a hook that raises for one config)."""
        if self.said or not self.unexpected:
            return
        self.said = True
        exc = self.unexpected[0]
        log.warning(
            "tunebook: key %s: config %s raised %s: %s. It is recorded in the book as this config's "
            "failure for the key and never measured again. If the cause is in the call (the grid "
            "function, a hook, the timer) rather than the config, fix it and delete the key's file "
            "in the page, so that the key is tuned again",
            list(self.job.key),
            self.unexpected_ids[0],
            type(exc).__name__,
            str(exc)[:300],
        )

    def says_nothing(self, cid: str, result: Result) -> bool:
        """Whether ``result`` may not be its config's failure: by the exception raised here
        where it was timed here, else (another rank's) by what it says (``_failures.py``)."""
        if cid in self.expected_ids:
            return False
        return cid in self.unexpected_ids or says_nothing(result)

    def one(self, i: int, timer: Callable[..., Any], quick: bool) -> Result | None:
        """Time candidate ``i``; None if it was not measured (neither persisted nor a failure)."""
        job = self.job
        if _observer is not None:
            # check='s reference first: its search names the configs it launches itself
            find_reference = getattr(job.bench, "find_reference", None)
            if find_reference is not None:
                find_reference()
            _observer.candidate(job.key_text, job.key, job.ids[i], job.records[i])
        result, exc = time_candidate(job.bench, timer, job.configs[i], job.records[i], quick)
        if exc is not None and job.is_transient(exc):
            result, exc = time_candidate(job.bench, timer, job.configs[i], job.records[i], quick)
            why = job.is_transient(exc) if exc is not None else None
            if why is not None:
                self.failures += 1
                log.warning(
                    "tunebook: key %s: config %s failed twice %s (%s: %s); not recorded, so a later "
                    "tuning of the key measures it",
                    list(job.key),
                    job.ids[i],
                    why,
                    type(exc).__name__,
                    exc,
                )
                return None
        if exc is not None and job.is_unexpected(exc):
            self.unexpected.append(exc)
            self.unexpected_ids.append(job.ids[i])
        elif exc is not None:
            self.expected_ids.add(job.ids[i])
        if result is not None and not result.ok:
            self.failures += 1
        return result

    def batch(
        self,
        indices: list[int],
        full: bool = False,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> dict[int, Result | None]:
        """Time ``indices``: a screening (compiled ahead first), or ``full`` for contenders.
        ``on_result(i, result)`` hears of each measured one as soon as it is."""
        job = self.job
        if not full and job.precompile is not None:
            begun = time.perf_counter()
            job.precompile([job.configs[i] for i in indices])
            _stats.add("compile_seconds", time.perf_counter() - begun)
        timer, quick = (job.timers.full, False) if full else (job.timers.quick, job.timers.adaptive)
        out: dict[int, Result | None] = {}
        for i in indices:
            out[i] = result = self.one(i, timer, quick)
            if result is None:
                continue
            if not full:
                self.measured += 1
            if on_result is not None:
                on_result(i, result)
        return out


def tune_key(job: KeyTuning) -> Outcome:
    start = time.perf_counter()
    n = len(job.configs)
    results: dict[str, Result] = dict(job.known.results) if job.known is not None else {}
    # Failures that may not be the config's (_failures.py) that a book holds while no config
    # of the key ran (a worker's, another rank's, an older tunebook's): measured again.
    for cid in to_measure_again(results, job.ids):
        del results[cid]
    # Wrong results judged otherwise than this tuning judges: each candidate is measured and
    # judged again, as a config that agreed with a wrong reference is as doubtful as one that
    # did not; the new results replace the old in the book (Entry.merged_over).
    rejudged = judged_again(job, results)
    if rejudged:
        for cid in job.ids:
            results.pop(cid, None)
    known = {i: results[cid].median for i, cid in enumerate(job.ids) if cid in results}
    # Failures check='s reference search recorded: no search chose them (_failures.py).
    uncounted = {i for i in known if by_reference_search(results[job.ids[i]])}
    timing = Timing(job)
    entry = job.known

    # Failures that may not be the config's (an exception that is not the backend's "cannot
    # run", a timer's NaN or inf), kept out of the book while no config of the key has run:
    # if none runs, they are the call's or the timer's, and a later tuning measures them again.
    held: dict[str, Result] = {}
    ran = any(results[cid].ok for cid in known_ids(job, results))

    def save(fresh: dict[str, Result]) -> None:
        nonlocal entry, ran
        ran = ran or any(r.ok for r in fresh.values())
        if not ran:
            doubtful = {cid for cid, r in fresh.items() if timing.says_nothing(cid, r)}
            held.update((cid, fresh[cid]) for cid in doubtful)
            fresh = {cid: r for cid, r in fresh.items() if cid not in doubtful}
        elif held:
            fresh = {**held, **fresh}
            held.clear()
        if set(fresh) & set(timing.unexpected_ids):
            timing.say_recorded()
        if fresh:
            results.update(fresh)
            entry = job.persist(fresh, "", time.perf_counter() - start)

    def measure(batch: list[int]) -> dict[int, float]:
        if job.exchange is not None:
            got = job.exchange(batch, False, timing.batch)
            fresh = {job.ids[i]: r for i, r in got.items() if r is not None}
            if fresh:
                save(fresh)
            return {i: r.median if r is not None else math.inf for i, r in got.items()}
        pending: dict[str, Result] = {}
        last_save = time.perf_counter()

        def measured(i: int, result: Result) -> None:
            nonlocal pending, last_save
            pending[job.ids[i]] = result
            if not ran and not any(r.ok for r in pending.values()) and same_failure(timing.unexpected):
                none_ran(job, timing, held, {**results, **pending})  # raises the call's exception
            # Persist as we go (a killed run loses at most this much), but not after every
            # config: each save is a locked, fsynced file write.
            # In a worker (observed) every result is saved at once: the next candidate may
            # take the process down.
            every = 1 if _observer is not None else SAVE_EVERY
            if len(pending) >= every or time.perf_counter() - last_save > SAVE_EVERY_S:
                save(pending)
                pending, last_save = {}, time.perf_counter()
            if _observer is not None:
                # A result held back is not for the book, there either (_worker/isolated.py).
                _observer.result(job.key_text, job.key, job.ids[i], result, kept=job.ids[i] not in held)

        got = timing.batch(batch, on_result=measured)
        if pending:
            save(pending)
        return {i: r.median if r is not None else math.inf for i, r in got.items()}

    def on_progress(done: int, total: int, best_ms: float) -> None:
        if job.progress is not None:
            job.progress.update(done, total, best_ms)

    if job.strategy == "auto":
        name = choose_strategy(n, job.budget, search_order(job.seeds, job.hints))
    else:
        name = job.strategy
    started_over = job.known.chosen if job.known is not None else ""
    hints = keeping(started_over, job.ids, with_rule(job.hints, job.rule))
    # An exhaustive search is one batch, every candidate compiled in parallel up front,
    # unless a time budget must be checked between batches.
    whole = name == "exhaustive" and job.budget.max_seconds is None
    found = search(
        _Flat(job.records),
        measure,
        strategy=name,
        budget=job.budget,
        known=known,
        hints=search_order(job.seeds, hints),
        seed=job.seed,
        on_progress=on_progress,
        batch_size=n if whole else BATCH,
        uncounted=uncounted,
    )
    said = "" if ran else none_ran(job, timing, held, results)

    # Full measurement of the contenders that so far only have a quick one.
    to_confirm = contenders(results, job.ids, hints)
    slower: set[str] = set()  # contenders the short-kernel policy's rounds told apart as slower
    confirmed: dict[str, Result | None] = {}
    if to_confirm:
        if job.progress is not None:
            timed = [results[cid].median for cid in job.ids if cid in results]
            best_ms = min(timed, default=math.inf)
            job.progress.update(len(timed), len(timed), best_ms, f"confirming {len(to_confirm)} contenders")
        quick_ms = min(results[job.ids[i]].median for i in to_confirm)
        short = job.timers.short
        if short is not None and short.applies(quick_ms):
            # Interleaved rounds compare the contenders on one device: never dealt out.
            confirmed, slower = confirm_results(short, job.ids, to_confirm, quick_ms, timing.one)
        elif job.exchange is not None:
            got = job.exchange(to_confirm, True, timing.batch)
            confirmed = {job.ids[i]: r for i, r in got.items()}
        else:
            confirmed = {job.ids[i]: r for i, r in timing.batch(to_confirm, full=True).items()}
        save({cid: r for cid, r in confirmed.items() if r is not None})

    # Choose on what the book now holds, as every reader will (Entry.best): where the merge
    # kept an earlier full result over this process's, the rounds' verdict is not about it.
    stored = entry.results if entry is not None else results
    slower = {cid for cid in slower if cid in confirmed and stored.get(cid) == confirmed[cid]}
    choosable = {cid: r for cid, r in stored.items() if cid not in slower}
    chosen = tie_aware_choice(choosable, job.ids, hints)
    say_doubted_reference(stored, job.ids, job.label, job.key, f"{job.where or job.label}:{job.key_text}")
    seconds = time.perf_counter() - start
    # Old verdicts a budgeted search did not replace (_failures.superseded).
    untagged = superseded(stored, job.ids, judging_now(job), now_iso()) if rejudged else {}
    if entry is None or chosen or timing.measured or untagged:
        entry = job.persist(untagged, chosen or "", seconds)
    why = why_stopped(found.stopped, job.budget)
    if job.progress is not None:
        final = min((r.median for r in results.values()), default=math.inf)
        job.progress.close(len(results), n, final, why)
    return Outcome(entry, timing.measured, timing.failures, seconds, found.stopped, why, said)


def judged_again(job: KeyTuning, results: Mapping[str, Result]) -> bool:
    """Whether the key's wrong results (``check=``) were judged otherwise than this tuning
    judges: against another reference config than the one its bench runs now, under other
    settings, or with ``check=`` off now (_failures.judged_again)."""
    # A checking bench's (_check.CheckedBench); none where check= is off.
    return _failures.judged_again(results, job.ids, getattr(job.bench, "judging", None))


def judging_now(job: KeyTuning) -> Any:
    """What the tuning judges under (a ``_failures.Judging``): None where ``check=`` is off
    or no candidate runs."""
    judging = getattr(job.bench, "judging", None)
    return judging() if judging is not None else None


def say_doubted_reference(
    results: Mapping[str, Result], ids: Sequence[str], label: str, key: Sequence[Any], where: str
) -> None:
    """Say :func:`doubted_reference_warning` once per key (``where``: its page and key text), as
    a BookWarning: where the key was tuned, and, from the results its worker process reports,
    in the process that asked for the tuning (isolate=True), whose user never sees the
    worker's warnings (``tunebook tune`` and a Ray sweep's driver print it)."""
    text = doubted_reference_warning(results, ids, label, key)
    if text:
        _warnings.warn_once(f"doubted-reference:{where}", "%s", text)


def doubted_reference_warning(
    results: Mapping[str, Result], ids: Sequence[str], label: str, key: Sequence[Any]
) -> str:
    """What to say when every other candidate of ``ids`` checked against the reference config,
    two at least, disagreed with it while none agreed: the reference is then the likelier one
    to be wrong (_failures.doubted_reference); "" otherwise. One that disagreed with its own
    earlier run is the kernel's nondeterminism, which ``none_ran`` tells. Under a search
    budget the reference may have run only as the reference, never measured: it agreed with
    itself then, and the others' verdicts say as much as if it had been."""
    reference = doubted_reference(results, ids)
    if reference is None or (reference in results and not results[reference].ok):
        return ""
    wrong = sum(1 for cid in ids if cid in results and cid != reference and is_wrong_result(results[cid]))
    return (
        f"tunebook: {label} key {list(key)}: the {wrong} other configs checked against the reference config "
        f"{reference} all computed a different result (check=), and none agreed with it: the reference may "
        "itself be wrong. Put a config you trust first in the list: the key's wrong results are judged "
        "again against it at its next tuning (in a new process)"
    )


def same_failure(unexpected: list[BaseException]) -> bool:
    """Whether the first ``SAME_FAILURE_LIMIT`` unexpected failures are one exception, type
    and text: the call's, whichever configs raised it.

    >>> same_failure([ValueError("grid")] * 8), same_failure([ValueError("grid")] * 7)
    (True, False)
    >>> same_failure([ValueError("BLOCK 32"), *[ValueError("BLOCK 64")] * 7])
    False
    """
    if len(unexpected) < SAME_FAILURE_LIMIT:
        return False
    first = unexpected[:SAME_FAILURE_LIMIT]
    return len({(type(e), str(e)) for e in first}) == 1


def known_ids(job: KeyTuning, results: Mapping[str, Result]) -> set[str]:
    """The candidates of ``job`` that ``results`` holds (a book's entry may hold others)."""
    return set(results).intersection(job.ids)


def none_ran(
    job: KeyTuning, timing: Timing, held: Mapping[str, Result], results: Mapping[str, Result]
) -> str:
    """Say that no candidate of the key ran, once per key, and return it in words; raise the
    first exception that may be the call's (a grid function, a hook, the timer) if there was
    one: it is then the likely cause, whatever the order in which the configs were measured.

    The backend's "cannot run" failures (out of resources, a failed ``tl.static_assert``) are
    the configs' and stay in the book; failures ``held`` back are not recorded, so a later
    tuning of the key measures them again (once the timer or the call is fixed)."""
    failed = {cid: results[cid] for cid in known_ids(job, results)}
    failed.update(held)
    n = len(failed)
    if not n:  # nothing measured (a replay without the grids): nothing to say
        return ""
    what = f"key {list(job.key)}: none of the {n} configs measured ran ({common_reasons(failed.values())})"
    if timing.unexpected:
        exc = timing.unexpected[0]
        text = (
            f"tunebook: {job.label} {what}. This is the exception of config {timing.unexpected_ids[0]}; "
            f"{len(timing.unexpected)} of the failures are not the backend's errors for a config that "
            "cannot run here, so the cause is most likely in the call (the grid function, a hook, the "
            "timer): nothing was recorded for them, fix it and call again"
        )
        add_note = getattr(exc, "add_note", None)  # Python 3.11+
        if add_note is not None:
            add_note(text)
        else:  # pragma: no cover - Python 3.10
            log.error("%s", text)
        raise exc
    untimed = sum(1 for r in held.values() if no_timing(r))
    raised = len(held) - untimed  # another rank's exceptions that may be the call's
    fixes = []
    if untimed:
        fixes.append(
            f"{untimed} gave no valid timing (NaN or inf from the timer, do_bench=): fix the timer; "
            "they are not recorded, so the next process that tunes the key measures them again"
        )
    if raised:
        fixes.append(
            f"{raised} raised errors that may be the call's (another rank's): not recorded, so the "
            "next process that tunes the key measures them again"
        )
    recorded = [r for cid, r in failed.items() if cid not in held]
    wrong = sum(1 for r in recorded if is_wrong_result(r))
    if wrong:
        fixes.append(wrong_results_fix(wrong, failed))
    if len(recorded) - wrong:
        fixes.append(
            f"{len(recorded) - wrong} cannot run here (recorded in the book): add configs this device can "
            "run (smaller blocks, fewer stages or warps)"
        )
    text = f"tunebook: {job.label} {what}. {'; '.join(fixes)}. The first config is launched in their place"
    _warnings.warn_once(f"none-ran:{job.where or job.label}:{job.key_text}", "%s", text)
    return text


def wrong_results_fix(wrong: int, failed: Mapping[str, Result]) -> str:
    """What ``none_ran`` says of ``wrong`` configs that computed another result than the
    reference under ``check=``, and the fix: these configs ran."""
    references = {j.reference for r in failed.values() if (j := judged_under(r)) is not None}
    reference = next(iter(references)) if len(references) == 1 else ""
    what = f"the reference config {reference}" if reference else "the reference config"
    own = failed.get(reference)
    if own is not None and is_wrong_result(own):
        what += ", which differed even from its own first run: the kernel's results vary from run to run"
    return (
        f"{wrong} computed a different result (check=) from {what}. Loosen check='s rtol/atol if such "
        "results are meant to agree, ignore the arguments that legitimately differ (check={'ignore': "
        "[...]}), or put a config you trust first: the key's wrong results are judged again under the "
        "new settings at its next tuning"
    )


def common_reasons(failed: Iterable[Result]) -> str:
    """The three most common reasons of ``failed``, counted: ``6x ValueError: ...; 2x ...``."""
    reasons = collections.Counter(_first_line(r.error) for r in failed)
    return "; ".join(f"{count}x {why}" for why, count in reasons.most_common(3))


def _first_line(error: str | None) -> str:
    """A failure's reason as a message counts it: its first line, 160 characters at most."""
    lines = (error or "").strip().splitlines()
    text = lines[0] if lines else "failed"
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def inputs_restored(job: KeyTuning) -> Iterator[None]:
    """Measure for ``job`` inside; afterwards the caller's own launch sees its original inputs
    (a checking benchmark, ``check=``, keeps them aside and puts them back)."""
    try:
        yield
    finally:
        restore = getattr(job.bench, "restore", None)
        if restore is not None:
            restore()


def time_candidate(
    bench: Callable[[Callable[..., Any], Any], Any],
    timer: Callable[..., Any],
    config: Any,
    record: Mapping[str, Any],
    quick: bool,
) -> tuple[Result | None, Exception | None]:
    """Time one config: (its result, the exception it raised if it failed by raising).

    The result is None for a replay without this config's grid (skipped, not a failure).
    A config that cannot run is data, not a crash: its result carries the reason.
    """
    try:
        ms = as_triple(bench(timer, config))
    except NoRecordedGrid:
        return None, None
    except Exception as exc:
        return failure(record, exc), exc
    if not all(math.isfinite(v) and v >= 0 for v in ms):
        # A timer's inf or nan means the config did not run (Triton's do_bench and
        # autotuner use inf that way); it is not a time to compare.
        return Result(dict(record), None, f"{NO_TIMING}: {list(ms)}", now_iso()), None
    return Result(dict(record), ms, None, now_iso(), quick=quick), None


def failure(record: Mapping[str, Any], exc: BaseException) -> Result:
    """The result of a config whose launch raised ``exc``, as the book stores it."""
    return Result(dict(record), None, f"{type(exc).__name__}: {exc}".strip()[:ERROR_LIMIT], now_iso())


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config as one flat dict of parameters, for the strategies."""
    return {**record.get("kwargs", {}), **{k: v for k, v in record.items() if k != "kwargs"}}


class _Flat(Sequence[dict[str, Any]]):
    """The stored configs as the strategies read them (``_flat``), each made when read: the
    random strategy reads the few it proposes of a Space's 10^5 points."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _flat(self._records[i])


def search_order(seeds: Sequence[int], hints: Sequence[int]) -> list[int]:
    """What a search measures first: the seeds, then the hints, without repeats."""
    return list(dict.fromkeys([*seeds, *hints]))


def with_rule(hints: Sequence[int], rule: int | None) -> list[int]:
    """The hints, then the fallback rule's config (if not among them): what a search measures first."""
    return search_order(hints, [] if rule is None else [rule])


def keeping(chosen: str, ids: Sequence[str], hints: Sequence[int]) -> list[int]:
    """``hints`` with ``chosen`` first, if it is a candidate: a search resumed over a decided
    key keeps the choice it started over on a tie, as a read of the book would (Entry.best),
    so processes that decided before it go on serving the same config (``tune_key`` and a
    Ray sweep's decision alike)."""
    return search_order([ids.index(chosen)], hints) if chosen in ids else list(hints)


def contenders(results: Mapping[str, Result], ids: Sequence[str], hints: Sequence[int]) -> list[int]:
    """What a search's end measures in full (``tune_key`` and a Ray sweep alike): the
    MAX_CONTENDERS fastest within CONTENDER_MARGIN of the best, and every hinted config within
    TIE_TOLERANCE of it, even outside those few, since the tie-aware choice can keep it (on an
    H200 a neighbour key's winner, 1.9% behind on its quick timing, won a tie that way and
    re-timed 3.4% behind the best); of these, the ones timed only quickly so far."""
    timings = {i: results[cid].median for i, cid in enumerate(ids) if cid in results}
    best_ms = min(timings.values(), default=math.inf)
    near = sorted((ms, i) for i, ms in timings.items() if ms <= best_ms * (1 + CONTENDER_MARGIN))
    top = [i for _, i in near[:MAX_CONTENDERS]]
    tie = best_ms * (1 + TIE_TOLERANCE)
    hinted = [h for h in dict.fromkeys(hints) if h in timings and timings[h] <= tie and h not in top]
    return [i for i in (*top, *hinted) if results[ids[i]].quick]


def tie_aware_choice(results: Mapping[str, Result], ids: Sequence[str], hints: Sequence[int]) -> str | None:
    """The fastest config, unless a hinted one, measured in full, is within TIE_TOLERANCE of it.

    A hint with a quick timing only never wins the tie, and a config timed only quickly is the
    fastest only where no config was measured in full: the best may have moved in the
    contenders' full measurement. The same rules decide at read time (Entry.best), so the
    process that tuned and every process that reads the book agree.
    """
    ok = [(results[cid].median, k, cid) for k, cid in enumerate(ids) if cid in results and results[cid].ok]
    if not ok:
        return None
    # As Entry.best: quick screenings compete only where nothing was measured in full.
    best_ms, _, best_id = min([t for t in ok if not results[t[2]].quick] or ok)
    noise = TIE_TOLERANCE
    for h in hints:
        cid = ids[h] if 0 <= h < len(ids) else None
        if (
            cid is not None
            and cid in results
            and results[cid].ok
            and not results[cid].quick
            and results[cid].median <= best_ms * (1 + noise)
        ):
            return cid
    return best_id
