"""Tuning one key together: the ranks of a group split the candidates, one rank decides and
writes the book, and every rank launches the same config.

Over the group's store (see ``_distributed.py``), for each key a rank misses in ``tune`` mode:

1. a decision already published for the key is adopted, with no measuring;
2. otherwise the rank *arrives* (an atomic counter). The first to arrive is the leader: it
   waits up to ``TUNEBOOK_DISTRIBUTED_JOIN_S`` for the rest of the group, then closes the
   round with the number of ranks that came, ``p``;
3. the ``i``-th rank to arrive (``i <= p``) measures the candidates ``j`` with
   ``j % p == i - 1`` and publishes its results; it writes nothing to the book;
4. the leader gathers every share, applies the same choice as a lone tuning (the fastest,
   or a neighbouring key's winner within 2%), records the key in its book (the only write)
   and publishes the decision; the first decision published for a key stands;
5. every other rank, including one that arrived after the round closed, waits for the
   decision and launches it; a rank whose own book is another directory than the one the
   decision was written to (another host, or a book per rank) records it there too, so
   that a later job finds the key on every rank alike (a hit on one rank and a miss on
   another would tune the missing rank alone, after the join wait, and could choose
   otherwise).

**No deadlock.** Every wait has a deadline. A key only some ranks reach is tuned by those
that come (after the join wait); a rank that waits longer than
``TUNEBOOK_DISTRIBUTED_WAIT_S`` for a decision (a rank died or hangs) tunes the key alone
and publishes its own decision; since the first published decision stands, every rank
still launches the same config. Hits and ``serve`` mode never touch the store: with the
same books, every rank reaches the same answer by the same rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import _settings
from ._book import Entry, Page, Result, now_iso
from ._distributed import Team, wait
from ._errors import BookFormatError, TuningFailed
from ._jsonio import stored_key, strict_loads
from ._tuner import Outcome, tie_aware_choice
from ._version import __version__

# How often the leader looks at the arrival counter while it waits for the group.
_POLL_S = 0.005

ShareTuner = Callable[[list[int]], Outcome]


def namespace(page: Page, key_text: str) -> str:
    """The store keys of one key of one kernel on one platform."""
    digest = hashlib.sha256(f"{page.file_name}\0{key_text}".encode()).hexdigest()[:24]
    return f"tunebook/{digest}/"


def tune_together(
    team: Team,
    page: Page,
    key: Sequence[Any],
    key_text: str,
    ids: Sequence[str],
    hints: Sequence[int],
    known: Entry | None,
    tune_share: ShareTuner,
) -> Outcome:
    """Resolve a miss with the group (see the module docstring).

    ``tune_share(indices)`` measures the candidates at those indices and returns their
    outcome without writing to the book. The result is the key's entry as decided.
    """
    start = time.perf_counter()
    store, ns = team.store, namespace(page, key_text)
    decision = _decision(store, ns, key)
    if decision is not None:
        _remember(page, key_text, decision, ids[0] if ids else "")
        return Outcome(decision.entry, 0, 0, time.perf_counter() - start)
    arrival = int(store.add(ns + "arrivals", 1))
    participants = _close_round(store, ns, team.world) if arrival == 1 else _participants(store, ns)
    mine: Outcome | None = None
    if participants is not None and arrival <= participants:
        share = [j for j in range(len(ids)) if j % participants == arrival - 1]
        mine = _measure_and_publish(store, ns, arrival, share, tune_share)
    measured = mine.measured if mine is not None else 0
    failures = mine.failures if mine is not None else 0
    if arrival == 1 and participants is not None:
        decided = _decide(team, page, ns, key, key_text, ids, hints, known, participants, start)
    else:
        waited = _wait_for_decision(store, ns, key)
        if waited is None:  # no decision in time: tune alone, and let the first decision stand
            alone = tune_share(list(range(len(ids))))
            measured += alone.measured
            failures += alone.failures
            chosen = tie_aware_choice(alone.entry.results, ids, hints)
            decided = _settle(
                store, ns, page, key_text, _decided_entry(key, alone.entry.results, chosen, ids, start)
            )
        else:
            _remember(page, key_text, waited, ids[0] if ids else "")
            decided = waited.entry
    if decided.best(ids) is None:
        raise TuningFailed(
            f"tunebook: no config ran for key {list(key)} on any rank of the group; `tunebook show` lists "
            "each config's reason"
        )
    return Outcome(decided, measured, failures, time.perf_counter() - start)


def _close_round(store: Any, ns: str, world: int) -> int:
    """The leader: wait for the group (at most the join time), then fix who takes part."""
    deadline = time.monotonic() + _settings.distributed_join_s()
    came = 1
    while time.monotonic() < deadline:
        came = int(store.add(ns + "arrivals", 0))
        if came >= world:
            break
        time.sleep(_POLL_S)
    came = min(world, int(store.add(ns + "arrivals", 0)))
    store.set(ns + "participants", str(came))
    return came


def _participants(store: Any, ns: str) -> int | None:
    # The leader closes the round within its join time; the margin covers a slow store.
    if not wait(store, [ns + "participants"], _settings.distributed_join_s() + 30.0):
        return None
    return int(store.get(ns + "participants"))


def _measure_and_publish(
    store: Any, ns: str, arrival: int, share: list[int], tune_share: ShareTuner
) -> Outcome | None:
    """Measure this rank's share and publish it; a failure is published too, then raised."""
    try:
        outcome = tune_share(share) if share else None
    except Exception as exc:
        store.set(ns + f"results/{arrival}", json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    results = outcome.entry.results if outcome is not None else {}
    store.set(ns + f"results/{arrival}", json.dumps({"results": _results_json(results)}))
    return outcome


def _decide(
    team: Team,
    page: Page,
    ns: str,
    key: Sequence[Any],
    key_text: str,
    ids: Sequence[str],
    hints: Sequence[int],
    known: Entry | None,
    participants: int,
    start: float,
) -> Entry:
    """The leader: gather every share, choose, write the book, publish the decision."""
    store = team.store
    results: dict[str, Result] = dict(known.results) if known is not None else {}
    deadline = time.monotonic() + _settings.distributed_wait_s()
    for arrival in range(1, participants + 1):
        name = ns + f"results/{arrival}"
        if not wait(store, [name], deadline - time.monotonic()):
            continue  # a rank that died or hangs: decide with the shares that came
        share = _loads(store.get(name))
        results.update(_results_from(share.get("results", {})) if share is not None else {})
    chosen = tie_aware_choice(results, ids, hints)
    return _settle(store, ns, page, key_text, _decided_entry(key, results, chosen, ids, start))


def _settle(store: Any, ns: str, page: Page, key_text: str, entry: Entry) -> Entry:
    """Publish ``entry`` as the decision; if it is the one that stands, write it to the book
    (the one write for this key); return the decision that stands."""
    decided = _publish(store, ns, entry, book_id(page))
    if decided.entry is entry:
        return page.record(key_text, entry)
    _remember(page, key_text, decided, entry.first)
    return decided.entry


def _decided_entry(
    key: Sequence[Any], results: Mapping[str, Result], chosen: str | None, ids: Sequence[str], start: float
) -> Entry:
    stamp = now_iso()
    return Entry(
        key=stored_key(key),
        results=dict(results),
        tuning_seconds=time.perf_counter() - start,
        tuned_at=stamp,
        updated_at=stamp,
        tunebook=__version__,
        chosen=chosen or "",
        first=ids[0] if ids else "",
    )


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
    text = json.dumps({"chosen": entry.chosen, "results": _results_json(entry.results), "book": book})
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
    if not wait(store, [ns + "decision"], _settings.distributed_wait_s()):
        return None
    return _decision_from(stored_key(key), store.get(ns + "decision"))


def _decision_from(key: Sequence[Any], raw: Any) -> Decision | None:
    data = _loads(raw)
    if data is None or not isinstance(data.get("chosen"), str):
        return None
    entry = Entry(key=tuple(key), results=_results_from(data.get("results", {})), chosen=data["chosen"])
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
