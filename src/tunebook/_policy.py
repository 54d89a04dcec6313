"""What a miss does: the rule, as pure functions over book entries (no I/O, no logging).

A key is answered from the book when every candidate config has a result there, or when a
budgeted search already ran for it and ended with a choice (in ``serve`` mode, any search
that ended with a choice: a book tuned with another budget, or a search that converged
early, still serves its tuned config; in ``tune`` mode too where a read-only book holds
that choice and the kernel sets no budget of its own: books shipped with an application
are answers, not a start to search from again), unless, in ``tune`` mode, its wrong
results under ``check=`` were judged under other settings or another reference than a
tuning would judge them under now (``judged_again``). Otherwise ``TUNEBOOK_MODE``
decides: ``tune`` measures what the book lacks; ``serve`` answers at once with the best
config it can justify without measuring (the user's ``fallback=``, the key's own partial
results, the entry of a table imported from this GPU (``tables=``), the key's winner on this
GPU under another Triton release, the winner of the nearest remembered key, the key's
winner on another GPU of this architecture, an edited source's winner for the key, the
first config, in that order: ``serve_choice``; with ``prefer_nearest=`` the user's
``fallback=`` takes the first config's place);
``off`` measures every candidate and remembers nothing.

>>> from tunebook._book import Entry, Result
>>> ok = lambda ms: Result({"kwargs": {}}, (ms, ms, ms))
>>> tuned = Entry(key=(1024,), results={"a": ok(2.0), "b": ok(1.0)})
>>> decide(tuned, ["a", "b"], "serve", Budget()), decide(None, ["a", "b"], "serve", Budget())
('book', 'serve')
>>> serve_choice(["a", "b"], None, nearest=[tuned])
('b', 'the winner of the nearest remembered key [1024]')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ._book import Entry
from ._jsonio import as_scalar, parse_key_texts, stored_key
from ._search import SMALL_SPACE, Budget

Decision = Literal["book", "tune", "serve"]

# How many of the nearest remembered keys seed a search of a new key.
NEAREST_HINTS = 4
# How many of an earlier kernel version's fastest configs for the same key seed its re-tune,
# and how many of all earlier versions' (a book may keep several): seeds are measured first
# whatever the budget, so they must leave it room.
SEEDS_PER_VERSION = 3
MAX_SEEDS = 6


def decide(
    entry: Entry | None,
    ids: Sequence[str],
    mode: str,
    budget: Budget,
    settled: Entry | None = None,
    judged_again: bool = False,
) -> Decision:
    """``book`` (answered without measuring), ``tune`` or ``serve`` for a key with candidates ``ids``.

    ``judged_again``: the key's wrong results under ``check=`` were judged under other settings
    or another reference than a tuning now would judge them under
    (``_failures.stale_verdicts``); ``tune`` mode tunes it again, however answered it is.

    ``settled``: the key's entry in a read-only book. Where tunebook's default budget
    applies (more than SMALL_SPACE candidates, no budget declared by the kernel), its search's
    choice answers ``tune`` mode as it answers ``serve`` mode. Without this, a shipped key
    whose search stopped early (a converged neighbour search, a smaller budget) would be
    searched again at its first call in every new process. A declared budget keeps the rule
    of every book (a search smaller than it is unfinished), and so does a small space, where
    every candidate is measured: a config added to it is measured, and only that one.
    """
    if mode == "tune" and judged_again:
        return "tune"
    if mode != "off" and entry is not None:
        if answered(entry, ids, budget) or (mode == "serve" and chosen_among(entry, ids)):
            return "book"
        budgeted_by_default = budget.unlimited and len(ids) > SMALL_SPACE
        if mode == "tune" and settled is not None and budgeted_by_default and chosen_among(settled, ids):
            return "book"
    return "serve" if mode == "serve" else "tune"


def chosen_among(entry: Entry, ids: Sequence[str]) -> bool:
    """Whether a search of this key ended with a choice that runs and is one of ``ids``."""
    result = entry.results.get(entry.chosen) if entry.chosen else None
    return result is not None and result.ok and entry.chosen in ids


def answered(entry: Entry, ids: Sequence[str], budget: Budget) -> bool:
    """Whether the book answers this key: every candidate measured and the search that
    measured them ended, or a budgeted search done.

    Every candidate screened is not enough while a screening is unconfirmed and no search
    has chosen: that search is still confirming its contenders (in another process), or
    was killed before it did. A process that read such a key as answered served the
    screens' winner, never confirmed in full, and the key stayed so in the book for good.

    >>> from dataclasses import replace
    >>> from tunebook._book import Entry, Result
    >>> screened = Entry(key=(1,), results={"a": Result({"kwargs": {}}, (1.0, 1.0, 1.0), quick=True)})
    >>> answered(screened, ["a"], Budget()), answered(replace(screened, chosen="a"), ["a"], Budget())
    (False, True)

    Nor is it while no candidate has run: such a key served its first config, which no
    measurement chose, and is tuned again in ``tune`` mode (what failed for the config's own
    reasons stays measured; ``_tuner.none_ran``).

    >>> failed = Entry(key=(1,), results={"a": Result({"kwargs": {}}, None, "OutOfResources: shared memory")})
    >>> answered(failed, ["a"], Budget())
    False
    """
    if not any((result := entry.results.get(cid)) is not None and result.ok for cid in ids):
        return False
    if all(cid in entry.results for cid in ids) and (entry.chosen or not _screened_only(entry, ids)):
        return True
    return search_done(entry, ids, budget)


def _screened_only(entry: Entry, ids: Sequence[str]) -> bool:
    """Whether some candidate of ``ids`` has only a quick screening in ``entry``."""
    return any((result := entry.results.get(cid)) is not None and result.quick for cid in ids)


def effective_budget(budget: Budget, n: int) -> Budget:
    """The user's budget, or for a space of more than SMALL_SPACE configs without one: 10% of
    it, between 64 and 500 configs.

    >>> effective_budget(Budget(), 48).unlimited, effective_budget(Budget(), 5000).max_configs
    (True, 500)
    """
    if not budget.unlimited or n <= SMALL_SPACE:
        return budget
    return Budget(max_configs=min(n, max(SMALL_SPACE, min(500, n // 10))))


def search_done(entry: Entry, ids: Sequence[str], budget: Budget) -> bool:
    """Whether a budgeted search already ran for this key (it need not measure everything).

    A search ends with a choice; with a time budget alone (no cap on configs) that choice
    is final, or every new process would spend its time budget again.
    """
    if budget.unlimited and len(ids) <= SMALL_SPACE:
        return False
    measured = sum(1 for cid in ids if cid in entry.results)
    cap = effective_budget(budget, len(ids)).max_configs
    return bool(entry.chosen) and (cap is None or measured >= min(cap, len(ids)))


def key_distance(a: Sequence[Any], b: Sequence[Any]) -> float:
    """How far apart two keys are: the sum of log2-distances of their numeric elements;
    infinite if they differ in length or in any non-numeric element (a dtype, a string).

    >>> key_distance([1024, "fp16"], [4096, "fp16"]) < key_distance([1024, "fp16"], [1 << 20, "fp16"])
    True
    >>> key_distance([1024, "fp16"], [1024, "bf16"])
    inf
    """
    if len(a) != len(b):
        return math.inf
    total = 0.0
    for x, y in zip(a, b):
        x, y = as_scalar(x), as_scalar(y)
        numeric = isinstance(x, int | float) and isinstance(y, int | float)
        if numeric and not isinstance(x, bool) and not isinstance(y, bool):
            total += abs(math.log2(abs(x) + 1) - math.log2(abs(y) + 1))
        elif x != y:
            return math.inf
    return total


def nearest(key: Sequence[Any], entries: Iterable[Entry]) -> list[Entry]:
    """Other remembered keys comparable with ``key``, nearest first (ties in book order)."""
    own = stored_key(key)
    ranked = [
        (d, n, e)
        for n, e in enumerate(entries)
        if tuple(e.key) != own and (d := key_distance(key, e.key)) < math.inf
    ]
    return [e for _, _, e in sorted(ranked, key=lambda t: t[:2])]


def nearest_texts(key: Sequence[Any], texts: Iterable[str] | Mapping[str, Any]) -> list[str]:
    """Key texts (as a book names keys) of keys comparable with ``key``, nearest first, ties
    in text order. ``texts`` may map each text to its key already parsed (Page.key_names).

    >>> nearest_texts([1000, "fp16"], ['[4096,"fp16"]', '[1024,"fp16"]', '[1024,"bf16"]', 'junk'])
    ['[1024,"fp16"]', '[4096,"fp16"]']
    """
    own = list(stored_key(key))
    logs = [_log2(v) for v in own]
    if isinstance(texts, Mapping):
        pairs: Iterable[tuple[str, Any]] = texts.items()
    else:
        names = list(texts)
        pairs = zip(names, parse_key_texts(names))
    ranked = []
    for text, other in pairs:
        if not isinstance(other, list) or len(other) != len(own) or other == own:
            continue
        total = 0.0
        for x, lx, y in zip(own, logs, other):
            if lx is not None and (type(y) is int or type(y) is float):  # a book's keys are JSON scalars
                total += abs(lx - math.log2(abs(y) + 1))
            elif x != y:
                break
        else:
            ranked.append((total, text))
    return [t for _, t in sorted(ranked)]


def _log2(value: Any) -> float | None:
    """log2(|value| + 1) of a number (not a bool), as key_distance measures; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return math.log2(abs(value) + 1)


def hints(ids: Sequence[str], near: Sequence[Entry], siblings: Sequence[Entry] = ()) -> list[int]:
    """Candidate indices of the winners of the nearest keys (the first NEAREST_HINTS) and of
    the same key on other platforms, in that order, without repeats."""
    index = {cid: i for i, cid in enumerate(ids)}
    out: list[int] = []
    for e in [*near[:NEAREST_HINTS], *siblings]:
        best = e.best(ids)
        if best is not None and index[best] not in out:
            out.append(index[best])
    return out


def seeds(
    ids: Sequence[str], earlier: Sequence[Entry], renamed: Mapping[str, str] | None = None
) -> list[int]:
    """Candidate indices of the fastest SEEDS_PER_VERSION configs of each earlier version's
    entry for the key (in the order given: the most telling first), fastest first, without
    repeats, MAX_SEEDS at most: after an edit the old ranking is the best guess, though not
    the winner alone (the edit may reorder the top). ``renamed`` maps an earlier version's
    config id to this version's id of the same config (``_miss.renamed_configs``).

    >>> from tunebook._book import Entry, Result
    >>> ok = lambda ms: Result({"kwargs": {}}, (ms, ms, ms))
    >>> old = Entry(key=(8,), results={"a": ok(3.0), "b": ok(1.0), "c": ok(2.0), "d": ok(4.0), "x": ok(0.5)})
    >>> seeds(["a", "b", "c", "d"], [old])   # "x" is no longer a candidate
    [1, 2, 0]
    """
    index = {cid: i for i, cid in enumerate(ids)}
    index.update((old, index[new]) for old, new in (renamed or {}).items() if new in index)
    out: list[int] = []
    for entry in earlier:
        timed = sorted(
            (result.median, cid)
            for cid, result in entry.results.items()
            if cid in index and result.ok and not result.quick
        )
        for _, cid in timed[:SEEDS_PER_VERSION]:
            if index[cid] not in out:
                out.append(index[cid])
    return out[:MAX_SEEDS]


def serve_choice(
    ids: Sequence[str],
    entry: Entry | None,
    nearest: Sequence[Entry],
    picked: str | None = None,
    table: tuple[str, str] | None = None,
    upgraded: Sequence[tuple[str, str]] = (),
    edited: Sequence[tuple[str, str]] = (),
    same_arch: Sequence[tuple[str, str]] = (),
    own_ids: Sequence[str] | None = None,
) -> tuple[str | None, str]:
    """(config id, how it was chosen) for ``serve`` mode; None means the first candidate.

    ``picked`` is the id the user's ``fallback=`` chose, if it chose one of ``ids``;
    ``table`` the (id, how) an imported table of this GPU gives; ``upgraded`` the (id, how)
    of this key's winners under another Triton release or runtime on this GPU, ``edited``
    those of another source of the kernel on this platform, ``same_arch`` those of this
    kernel and release on another GPU of this architecture. The key's own results answer among
    ``own_ids`` (default ``ids``): a process may keep other answers from configs it set aside
    for the key, never its own measurements. With ``prefer_nearest=`` the
    caller asks without ``picked`` first, and with it alone (nothing else) only when that
    answers None.

    The order is the strength of the evidence: the key's own results; a table tuned on this
    GPU for the key; the key's winner on this GPU under the Triton release before an
    upgrade (the same source compiled by another release: what a fleet that upgraded
    without re-tuning has); a neighbouring key's winner; the key's winner on another GPU of
    this architecture (a page shipped for an H200, served on an H100); the key's winner for
    an edited source (an edit may move the best tile, a neighbour of the same source less so).

    >>> serve_choice(["a", "b"], None, [], upgraded=[("b", "this key's winner under Triton 3.5")])
    ('b', "this key's winner under Triton 3.5")
    """
    if picked is not None and picked in ids:
        return picked, "the config chosen by fallback="
    own = entry.best(ids if own_ids is None else own_ids) if entry is not None else None
    if own is not None:
        return own, "the best of its own partial results"
    if table is not None and table[0] in ids:
        return table
    for cid, how in upgraded:
        if cid in ids:
            return cid, how
    for other in nearest:
        best = other.best(ids)
        if best is not None:
            return best, f"the winner of the nearest remembered key {list(other.key)}"
    for cid, how in (*same_arch, *edited):
        if cid in ids:
            return cid, how
    return None, "the first config (nothing comparable remembered for this kernel on this platform)"
