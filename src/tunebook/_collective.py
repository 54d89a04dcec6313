"""Tuning one key together: one search for the whole group, its batches measured across the
ranks; one rank decides and writes the book, and every rank launches the same config.

Over the group's store (see ``_distributed.py``), for each key a rank misses in ``tune`` mode
(a round is one key over one list of candidates: ``namespace``):

1. a decision already published for the key is adopted, with no measuring;
2. otherwise the rank *arrives* (an atomic counter). The first to arrive is the leader: it
   waits up to ``TUNEBOOK_DISTRIBUTED_JOIN_S`` for the rest of the group, then closes the
   round with the number of ranks that came, ``p``;
3. the leader runs the key's ordinary tuning (``tune_key``: the strategy, budget and hints a
   lone rank would use, over every candidate), from what its book and the others' hold for
   the key (each rank that is not the leader publishes its entry, ``known/<i>``, as it
   arrives). Only the measuring of a batch differs: the leader publishes the batch
   (``batch/<b>``) dealt over the ranks that take part (each config to the same rank key
   after key where it can: ``Lead``), measures its own part, and gathers the others'
   (``timings/<b>/<i>``). The full re-timing of the contenders is
   dealt the same way, except under the short-kernel policy, whose interleaved rounds
   compare them on one device: the leader's;
4. every other rank that came (the ``i``-th to arrive, ``i <= p``) follows: it waits for
   each batch, measures its part and publishes the results, writing nothing to the book,
   until the leader ends the search;
5. the leader merges the search's entry over what its book holds for the key (what a lone
   rank would record), publishes that decision, ends the search, then records the key in
   its book (the only write; the others need not wait for it); the first decision
   published for a key stands. Every rank, the leader and one that arrived after the round
   closed included, launches it as published; a rank whose own book is another directory
   than the one the decision was written to (another host, or a book per rank) records it
   there too, so that a later job finds the
   key on every rank alike (a hit on one rank and a miss on another would tune the missing
   rank alone, after the join wait, and could choose otherwise).

With ``p`` ranks each measures about ``1/p`` of what the search measures: the search and its
stopping point are a lone rank's, and a batch of ``k`` configs costs the time of
``ceil(k/p)``.

**No deadlock.** Every wait has a deadline. A key only some ranks reach is tuned by those
that come (after the join wait). A follower whose part has not come back within
``late_after`` of the leader's own part (at most ``TUNEBOOK_DISTRIBUTED_WAIT_S``) is late:
the leader measures that part itself and deals the rank nothing more for the key; so it
does at once for a follower that wrote ``gone/<i>`` (its measuring raised). A leader that
fails before closing the round closes it with no one (``participants`` = 0), and a round
that stays open past the join time and a margin has lost its leader: the ranks that came
tune the key alone at once. A rank
that waits longer than ``TUNEBOOK_DISTRIBUTED_WAIT_S`` for the leader's next batch or
decision (the leader died or hangs) tunes the key alone and publishes its own decision;
since the first published decision stands, every rank still launches the same config.
Hits and ``serve`` mode never touch the store: with the same books, every rank reaches the
same answer by the same rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import _settings
from ._book import Entry, Page, Result, now_iso
from ._distributed import Team, trace, wait, waited_for
from ._errors import BookFormatError, TuningFailed
from ._jsonio import stored_key, strict_loads
from ._tuner import Exchange, Here, KeyTuning, Outcome, Timing, inputs_restored, tune_key
from ._version import __version__
from ._warnings import warn_once

log = logging.getLogger("tunebook")

# How often the leader looks at the arrival counter while it waits for the group.
_POLL_S = 0.005
# A follower's part of a batch is late once the leader has waited this long after measuring
# its own part of the same size: LATE_FACTOR times as long, and at least LATE_MIN_S
# (compiling and timing vary between devices; a false alarm costs time, never agreement).
LATE_FACTOR = 4.0
LATE_MIN_S = 30.0
# A rank writes its global rank right after it arrives: a longer wait means it died there.
_RANK_WAIT_S = 5.0
# How often the leader, waiting for a rank's part, looks whether that rank said it failed.
GONE_CHECK_S = 0.5

# The key's tuning job (``_miss.py`` builds it): every candidate, persisting nowhere, each
# batch measured through the exchange (None: here), starting from what is known of the key.
Jobs = Callable[[Exchange | None, Entry | None], KeyTuning]


def namespace(page: Page, key_text: str, ids: Sequence[str]) -> str:
    """The store keys of one key of one kernel on one platform, over one list of candidates:
    two autotuners of one function with other configs (or a call whose pruning leaves
    others) never share a round or a decision, which could name a config one of them lacks.

    >>> class P: file_name = "k--p.json"
    >>> namespace(P(), "[7]", ["a", "b"]) == namespace(P(), "[7]", ["b", "a"]) != namespace(P(), "[7]", ["a"])
    True
    """
    listed = "\0".join(sorted(ids))
    digest = hashlib.sha256(f"{page.file_name}\0{key_text}\0{listed}".encode()).hexdigest()[:24]
    return f"tunebook/{digest}/"


def late_after(own_seconds: float) -> float:
    """How long the leader waits for a follower's part after measuring its own part."""
    return min(_settings.distributed_wait_s(), max(LATE_MIN_S, LATE_FACTOR * own_seconds))


def tune_together(
    team: Team,
    page: Page,
    key: Sequence[Any],
    key_text: str,
    ids: Sequence[str],
    jobs: Jobs,
    known: Entry | None = None,
) -> Outcome:
    """Resolve a miss with the group (see the module docstring). ``jobs(exchange, known)`` is
    the key's tuning over every candidate (``ids``) from what is ``known`` of it, persisting
    nowhere; ``known`` is what this rank's book holds for the key. The result is the key's
    entry as decided."""
    start = time.perf_counter()
    store, ns = team.store, namespace(page, key_text, ids)
    decision = _decision(store, ns, key)
    if decision is not None:
        _remember(page, key_text, decision, ids[0] if ids else "")
        return _launched(key, ids, decision.entry, 0, 0, start)
    arrival = int(store.add(ns + "arrivals", 1))
    if arrival > 1:  # the leader's search starts from every rank's book (written before rank/)
        store.set(ns + f"known/{arrival}", json.dumps(_entry_json(known)))
    store.set(ns + f"rank/{arrival}", str(team.rank))  # who arrived i-th: the leader deals by rank
    measured = failures = 0
    searched: Outcome | None = None  # this rank's own search of the key, if it ran one
    if arrival == 1:
        lead: Lead | None = None
        closed = False
        try:
            participants = _close_round(store, ns, team.world)
            closed = True
            if participants < team.world:
                _short_round(page, key, participants, team.world)
            base = _current(page, key_text)
            if participants > 1:
                ranks = _ranks_by_arrival(store, ns, participants)
                lead = Lead(store, ns, ids, ranks, team.world)
                base = _with_others(base, key, store, ns, ranks)
            outcome = _tune(jobs(lead, base))
            # What a lone rank would record: the search's results over what the books hold
            # for the key (this rank's standing first: a config added to a tuned kernel keeps
            # the earlier choice where it is within the tie tolerance; another rank's results
            # of a tuning it did alone are counted, so its book agrees with the decision).
            # Every rank launches this, as published.
            entry = _decided_entry(key, outcome.entry, ids, start, base)
            published = _publish(store, ns, entry, book_id(page))
        finally:
            if not closed:  # failed before the round closed: the others tune alone at once
                store.set(ns + "participants", "0")
            if lead is not None:
                # The followers stop waiting for batches and read the decision; ended before
                # this rank's book write, which they need not wait for.
                lead.end()
        decided = _keep(page, key_text, entry, published)
        measured, failures, searched = outcome.measured, outcome.failures, outcome
    else:
        came = _participants(store, ns)
        if came is not None and arrival <= came:
            measured, failures = follow(store, ns, arrival, jobs(None, known))
            # published before the search ended; none: the leader failed, tune alone now
            waited = _decision(store, ns, key)
        elif not came:
            # The round never closed (the leader died while the group arrived: no leader is
            # searching), or the leader failed before closing it: nobody will decide.
            waited = _decision(store, ns, key)
        else:  # came after the round closed: the leader is searching
            waited = _wait_for_decision(store, ns, key)
        if waited is None:  # no decision in time: tune alone, and let the first decision stand
            current = _current(page, key_text)
            alone = searched = _tune(jobs(None, current))
            measured += alone.measured
            failures += alone.failures
            entry = _decided_entry(key, alone.entry, ids, start, current)
            decided = _settle(store, ns, page, key_text, entry)
        else:
            _remember(page, key_text, waited, ids[0] if ids else "")
            decided = waited.entry
    return _launched(key, ids, decided, measured, failures, start, searched)


def _launched(
    key: Sequence[Any],
    ids: Sequence[str],
    decided: Entry,
    measured: int,
    failures: int,
    start: float,
    searched: Outcome | None = None,
) -> Outcome:
    """The outcome every rank launches: the published decision (never this rank's own merge
    of it, which an older entry in its book could turn), with why ``searched``, this rank's
    search of the key, ended."""
    if decided.best(ids) is None:
        raise TuningFailed(
            f"tunebook: no config ran for key {list(key)} on any rank of the group; `tunebook show` lists "
            "each config's reason"
        )
    why = (searched.stopped, searched.why) if searched is not None else ("", "")
    return Outcome(decided, measured, failures, time.perf_counter() - start, *why)


def _current(page: Page, key_text: str) -> Entry | None:
    """What this rank's book holds for the key now (another process may have written it)."""
    page.refresh(key_text)
    return page.get(key_text)


def _with_others(
    base: Entry | None, key: Sequence[Any], store: Any, ns: str, ranks: Sequence[int | None]
) -> Entry | None:
    """``base`` with what the other ranks' books hold for the key (``known/<i>``, written
    before they announced their rank); ``base`` stands where both hold a config."""
    for i in range(2, len(ranks) + 1):
        if ranks[i - 1] is None or not store.check([ns + f"known/{i}"]):
            continue
        other = _decision_from(stored_key(key), store.get(ns + f"known/{i}"))
        if other is not None and other.entry.results:
            base = other.entry.merged_over(base)
    return base


def _entry_json(entry: Entry | None) -> dict[str, Any]:
    if entry is None:
        return {}
    return {"chosen": entry.chosen, "results": _results_json(entry.results)}


def _tune(job: KeyTuning) -> Outcome:
    with inputs_restored(job):
        return tune_key(job)


class Lead:
    """The leader's exchange: deals each batch over the ranks that take part, measures its
    own part, gathers the others' and measures a late rank's part itself.

    Ranks are named by their arrival (1: the leader). Batch ``b`` is published as
    ``{"full": bool, "parts": {"<i>": [config id, ...]}}`` under ``batch/<b>``; rank ``i``
    answers under ``timings/<b>/<i>`` with ``{"results": {config id: result}}``; the end of
    the search is ``{"end": true}``. Config ids, not indices: a rank that somehow holds
    other candidates measures none it does not know.

    **Dealing.** A config goes to its *owner*, a rank fixed by the config's id alone
    (``owner``), whenever the owner takes part and has fewer than ``ceil(k / p)`` of the
    batch's ``k`` configs; otherwise to the rank with the fewest. Why an owner: measuring a
    config first compiles it (three quarters of a lone rank's tuning time on an H200), and
    one compiled config serves every key it is measured on (keys that differ in a runtime
    size). Dealt to the same rank key after key, each rank compiles its share of the
    kernel's configs once; dealt round-robin, every rank ends up compiling nearly all of them
    (on 2 x H200, 0.49 of the configs each but 0.81 of the wall time). Why no slack over
    ``ceil(k / p)``: the ranks wait for each other at the end of every batch, so an uneven
    batch costs its whole excess, more than the compile a moved config may cost.
    """

    def __init__(
        self, store: Any, ns: str, ids: Sequence[str], ranks: Sequence[int | None], world: int
    ) -> None:
        self.store = store
        self.ns = ns
        self.ids = ids
        self.ranks = list(range(1, len(ranks) + 1))  # arrivals still dealt to
        # The arrival of each global rank that came (a rank whose id did not arrive in time
        # owns nothing and is dealt only what balance gives it).
        self.arrival_of = {rank: i for i, rank in enumerate(ranks, start=1) if rank is not None}
        self.owners = [owner(cid, world) for cid in ids]
        self.batches = 0

    def __call__(self, indices: list[int], full: bool, here: Here) -> dict[int, Result | None]:
        b, self.batches = self.batches, self.batches + 1
        parts = self.deal(indices)
        dealt = {str(r): [self.ids[i] for i in part] for r, part in parts.items() if r != 1 and part}
        self.store.set(self.ns + f"batch/{b}", json.dumps({"full": full, "parts": dealt}))
        begun, mine = time.monotonic(), parts.get(1, [])
        out = here(mine, full)
        own = time.monotonic() - begun
        trace("measure", own, batch=b, full=full, configs=len(mine), dealt=len(indices))
        deadline = time.monotonic() + late_after(own)
        for r, part in parts.items():
            if r != 1 and part:
                out.update(self._gather(b, r, part, deadline, full, here))
        return out

    def deal(self, indices: list[int]) -> dict[int, list[int]]:
        """The batch's configs by the arrival that measures them (class docstring)."""
        parts: dict[int, list[int]] = {r: [] for r in self.ranks}
        cap = -(-len(indices) // len(self.ranks))
        for i in indices:
            r = self.arrival_of.get(self.owners[i])
            if r not in parts or len(parts[r]) >= cap:
                r = min(self.ranks, key=lambda a: len(parts[a]))  # the first of the least loaded
            parts[r].append(i)
        return parts

    def _gather(
        self, b: int, r: int, part: list[int], deadline: float, full: bool, here: Here
    ) -> dict[int, Result | None]:
        name = self.ns + f"timings/{b}/{r}"
        came = self._answered(name, self.ns + f"gone/{r}", deadline, b, r)
        answer = _loads(self.store.get(name)) if came else None
        if answer is None:
            log.warning(
                "tunebook: the rank that arrived %d-th for this key %s its %d configs; measuring them "
                "here and dealing it nothing more for this key",
                r,
                "failed before it measured" if came is None else "sent no timings in time for",
                len(part),
            )
            self.ranks.remove(r)
            return here(part, full)
        with contextlib.suppress(Exception):  # read once, by this rank only: the store need not keep it
            self.store.delete_key(name)
        results = _results_from(answer.get("results", {}))
        # A config the rank did not measure (skipped, or a failure of the moment) stays unmeasured.
        return {i: results.get(self.ids[i]) for i in part}

    def _answered(self, name: str, gone: str, deadline: float, b: int, r: int) -> bool | None:
        """Whether rank ``r``'s part came (``name``) before ``deadline``; None where it said it
        failed (``gone``) first. Waits in slices, so that a failed rank costs at most one."""
        while True:
            left = deadline - time.monotonic()
            if wait(self.store, [name], min(left, GONE_CHECK_S), "gather", batch=b, arrival=r):
                return True
            if self.store.check([gone]):
                return None
            if left <= GONE_CHECK_S:
                return False

    def end(self) -> None:
        self.store.set(self.ns + f"batch/{self.batches}", json.dumps({"end": True}))


def follow(store: Any, ns: str, arrival: int, job: KeyTuning) -> tuple[int, int]:
    """A rank that came but does not lead: measure each part the leader deals it, until the
    search ends or the leader is silent for ``TUNEBOOK_DISTRIBUTED_WAIT_S``. Returns (configs
    screened, failures)."""
    timing = Timing(job)
    index = {cid: i for i, cid in enumerate(job.ids)}
    try:
        _follow_batches(store, ns, arrival, job, timing, index)
    except BaseException:
        # Interrupted or failed mid-search: the leader stops waiting for this rank's part
        # (and measures it itself) instead of waiting for it to be late.
        with contextlib.suppress(Exception):
            store.set(ns + f"gone/{arrival}", "1")
        raise
    return timing.measured, timing.failures


def _follow_batches(
    store: Any, ns: str, arrival: int, job: KeyTuning, timing: Timing, index: dict[str, int]
) -> None:
    b = 0
    with inputs_restored(job):
        while wait(store, [ns + f"batch/{b}"], _settings.distributed_wait_s(), "batch", batch=b):
            batch = _loads(store.get(ns + f"batch/{b}")) or {"end": True}
            if batch.get("end"):
                break
            mine = batch.get("parts", {}).get(str(arrival), [])
            if mine:
                begun = time.monotonic()
                got = timing.batch([index[c] for c in mine if c in index], bool(batch.get("full")))
                trace(
                    "measure",
                    time.monotonic() - begun,
                    batch=b,
                    full=bool(batch.get("full")),
                    configs=len(mine),
                )
                results = {job.ids[i]: r for i, r in got.items() if r is not None}
                store.set(ns + f"timings/{b}/{arrival}", json.dumps({"results": _results_json(results)}))
            b += 1


def _close_round(store: Any, ns: str, world: int) -> int:
    """The leader: wait for the group (at most the join time), then fix who takes part."""
    begun = time.monotonic()
    deadline = begun + _settings.distributed_join_s()
    came = 1
    while time.monotonic() < deadline:
        came = int(store.add(ns + "arrivals", 0))
        if came >= world:
            break
        time.sleep(_POLL_S)
    came = min(world, int(store.add(ns + "arrivals", 0)))
    waited_for("join", time.monotonic() - begun, came=came)
    store.set(ns + "participants", str(came))
    return came


def owner(config_id: str, world: int) -> int:
    """The global rank a config is dealt to when it can be (``Lead``): a hash of the config's
    id alone, so the same for every key and every leader. Not a position in the key's list of
    candidates: a Space's argument constraints allow other configs at other sizes (RMSNorm's
    ``ROWS <= rows``), and positions would shift with them. Even over many configs; a batch's
    share is evened out by ``Lead.deal``.

    >>> [owner(f"BLOCK={b}", 2) for b in range(1000)].count(0)
    498
    """
    return int.from_bytes(hashlib.blake2b(config_id.encode(), digest_size=8).digest(), "big") % world


def _ranks_by_arrival(store: Any, ns: str, participants: int) -> list[int | None]:
    """The global rank of each arrival that takes part (each writes it as it arrives, before
    the round can close on it; None for one that could not be read in time)."""
    ranks: list[int | None] = []
    for i in range(1, participants + 1):
        name = ns + f"rank/{i}"
        ranks.append(int(store.get(name)) if wait(store, [name], _RANK_WAIT_S, "join") else None)
    return ranks


def _short_round(page: Page, key: Sequence[Any], came: int, world: int) -> None:
    """Say once per kernel that a round closed short of the group: each such key costs its
    leader the whole join time, and the ranks that come later tune with no one (ranks in
    other modes, serving from other books, or reaching other keys; DEBUG records of the
    ``tunebook.group`` logger list every round)."""
    warn_once(
        f"short-round:{page.kernel.name}",
        "tunebook: %s key %s: %d of the group's %d ranks came within TUNEBOOK_DISTRIBUTED_JOIN_S (%g s); "
        "the others tune it alone if they reach it, and each such key costs its leader the join time. "
        "Ranks in other TUNEBOOK_MODEs, with other books, or calling other keys do this "
        "(said once per kernel)",
        page.kernel.name,
        list(key),
        came,
        world,
        _settings.distributed_join_s(),
    )


def _participants(store: Any, ns: str) -> int | None:
    # The leader closes the round within its join time; the margin covers a slow store.
    join_s = _settings.distributed_join_s()
    if not wait(store, [ns + "participants"], join_s + min(30.0, max(5.0, join_s)), "join"):
        return None
    return int(store.get(ns + "participants"))


def _settle(store: Any, ns: str, page: Page, key_text: str, entry: Entry) -> Entry:
    """Publish ``entry`` as the decision and keep the one that stands (``_keep``)."""
    return _keep(page, key_text, entry, _publish(store, ns, entry, book_id(page)))


def _keep(page: Page, key_text: str, entry: Entry, decided: Decision) -> Entry:
    """If this rank's ``entry`` is the published decision, write it to the book (the one
    write for this key); else record the decision that stands. Returns that decision, which
    this rank launches as every other rank does."""
    if decided.entry is entry:
        page.record(key_text, entry)
    else:
        _remember(page, key_text, decided, entry.first)
    return decided.entry


def _decided_entry(
    key: Sequence[Any], tuned: Entry, ids: Sequence[str], start: float, base: Entry | None
) -> Entry:
    """The key's entry as decided, over ``base`` (what the books hold for it: it stands, as
    in a lone rank's record)."""
    stamp = now_iso()
    entry = Entry(
        key=stored_key(key),
        results=dict(tuned.results),
        tuning_seconds=time.perf_counter() - start,
        tuned_at=stamp,
        updated_at=stamp,
        tunebook=__version__,
        chosen=tuned.chosen,
        first=ids[0] if ids else "",
        reopens=base.chosen if base is not None else "",  # a search over a decided key reopens it
    )
    return entry.merged_over(base) if base is not None else entry


@dataclass(frozen=True)
class Decision:
    """A key's decision as published: the entry, and the book it was written to."""

    entry: Entry
    book: str


def book_id(page: Page) -> str:
    """Which directory this rank's book writes to: host and real path (not a file id: the
    directory may not exist before the first write). Two ranks with the same id share the
    book, so the key is written once; bind mounts or a network disk seen under two paths
    read as two books and get one more write each, which merges to the same entry."""
    directory = page.book.directory
    where = os.path.realpath(directory) if directory is not None else ""
    return f"{socket.gethostname()}:{where}"


def _remember(page: Page, key_text: str, decided: Decision, first: str) -> None:
    """Record a decision another rank wrote in this rank's own book, unless it is the same book."""
    if page.book.directory is None or decided.book == book_id(page):
        return
    stamp = now_iso()
    entry = replace(decided.entry, tuned_at=stamp, updated_at=stamp, tunebook=__version__, first=first)
    page.record(key_text, entry)


def _publish(store: Any, ns: str, entry: Entry, book: str) -> Decision:
    """Publish ``entry`` as the key's decision unless one stands already; return the one that stands."""
    text = json.dumps({**_entry_json(entry), "book": book})
    stored = store.compare_set(ns + "decision", "", text)
    stored_text = stored.decode() if isinstance(stored, bytes) else str(stored)
    if stored_text == text:
        return Decision(entry, book)
    return _decision_from(entry.key, stored_text) or Decision(entry, book)


def _decision(store: Any, ns: str, key: Sequence[Any]) -> Decision | None:
    if not store.check([ns + "decision"]):
        return None
    return _decision_from(stored_key(key), store.get(ns + "decision"))


def _wait_for_decision(store: Any, ns: str, key: Sequence[Any]) -> Decision | None:
    if not wait(store, [ns + "decision"], _settings.distributed_wait_s(), "decision"):
        return None
    return _decision_from(stored_key(key), store.get(ns + "decision"))


def _decision_from(key: Sequence[Any], raw: Any) -> Decision | None:
    """A published decision, or a rank's ``known/<i>`` (no book; an empty one for none)."""
    data = _loads(raw)
    chosen = data.get("chosen", "") if data is not None else None
    if data is None or not isinstance(chosen, str):
        return None
    entry = Entry(key=tuple(key), results=_results_from(data.get("results", {})), chosen=chosen)
    return Decision(entry, str(data.get("book", "")))


def _results_json(results: Mapping[str, Result]) -> dict[str, Any]:
    return {cid: r.to_json() for cid, r in results.items()}


def _results_from(data: Any) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for cid, raw in data.items() if isinstance(data, dict) else ():
        try:
            out[cid] = Result.from_json(raw, f"a rank's result for {cid}")
        except BookFormatError:
            continue
    return out


def _loads(raw: Any) -> dict[str, Any] | None:
    try:
        data = strict_loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
