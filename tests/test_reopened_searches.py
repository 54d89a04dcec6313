"""A search that starts over a decided key (a larger budget, a config added to a list)
reopens it: its full measurements replace its own screenings and its choice replaces the
one it started over, through every path a write takes (a key's lock, pending news, a group
of ranks), and only while that choice still stands, so that two processes resuming one key
end on the same winner; the old choice keeps its place on a tie."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import tunebook
from test_pagedir import META, _holding
from test_tuning import SPACE, Landscape, call, entry_of, near_tie, tuned
from tunebook import _collective
from tunebook._book import Entry, Result, config_id, pagedir
from tunebook._tuner import Persist, tie_aware_choice


def cfg(block: int) -> dict[str, Any]:
    return {"kwargs": {"BLOCK": block}, "num_warps": 4}


def res(block: int, ms: float, quick: bool = False) -> Result:
    return Result(cfg(block), (ms, ms, ms), quick=quick)


X, Y, Z = config_id(cfg(64)), config_id(cfg(32)), config_id(cfg(16))
# A decided entry: X chosen, Y only screened (a search with a small budget).
DECIDED = Entry((1,), {X: res(64, 2.0), Y: res(32, 0.9, quick=True)}, chosen=X)
# The search resumed over it: Y confirmed in full and chosen.
NEWS = Entry((1,), {X: res(64, 2.0), Y: res(32, 1.0)}, chosen=Y, reopens=X)


def test_reopening_news_replaces_the_screening_and_the_choice_it_started_over() -> None:
    merged = NEWS.merged_over(DECIDED)
    assert merged.chosen == Y and not merged.results[Y].quick and merged.best() == Y
    ordinary = Entry((1,), NEWS.results, chosen=Y)  # a write that did not start over X
    stands = ordinary.merged_over(DECIDED)
    assert stands.chosen == X and stands.results[Y].quick


def test_reopening_news_left_pending_by_a_busy_lock_still_reopens(tmp_path: Path) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    pagedir.merge_key(page, META, "[1]", DECIDED)
    lock = pagedir._hidden(page, "locks") / f"{pagedir._stem(pagedir.key_file_name('[1]'))}.lock"
    holder = _holding(lock)
    try:
        pagedir.merge_key(page, META, "[1]", NEWS)  # the lock is busy: the news goes to pending/
    finally:
        holder.kill()
        holder.wait()
    assert pagedir.read_key(page, META, "[1]").chosen == Y  # type: ignore[union-attr]  # read: folded
    pagedir.merge_key(page, META, "[1]", Entry((1,), misses=1))  # the next write folds it in
    stored = pagedir.read_key(page, META, "[1]")
    assert stored is not None and stored.chosen == Y and not stored.results[Y].quick
    assert '"reopens"' not in (page / pagedir.key_file_name("[1]")).read_text()  # a file never keeps it


def test_news_merged_over_earlier_news_keep_what_either_reopens() -> None:
    """A store that refused a write keeps it with the next (Layer.push, a sweep driver's
    unwritten news): the two stay one write, which reopens what either reopened."""
    later = Entry((1,), misses=1)
    assert later.merged_over(NEWS).reopens == X
    assert NEWS.merged_over(Entry((1,), {Z: res(16, 3.0)})).reopens == X


def test_a_groups_search_over_a_decided_key_reopens_it() -> None:
    """The group's leader tunes without a page (Persist with the books' entry as known); the
    decision every rank records is built again over that entry (_collective._decided_entry)."""
    tuned_entry = Persist(None, "[1]", (1,), X, DECIDED)({Y: res(32, 1.0)}, Y, 1.0)
    assert tuned_entry.chosen == Y and not tuned_entry.results[Y].quick
    decided = _collective._decided_entry((1,), tuned_entry, [X, Y], time.perf_counter(), DECIDED)
    assert decided.chosen == Y and decided.best([X, Y]) == Y


def test_a_reopened_search_keeps_the_old_choice_within_the_tie_tolerance(book_dir) -> None:  # type: ignore[no-untyped-def]
    """Key 300 chose BLOCK=64, 1% slower than 128 (its neighbour's winner). A config is added
    to the list and the neighbour's entry is gone. The reopened search measures only the new
    config and keeps 64: processes that decided before go on serving what the book serves."""

    call(tuned(SPACE, Landscape(near_tie(1000))), 1000)
    call(tuned(SPACE, Landscape(near_tie(300))), 300)
    assert entry_of(book_dir, 300).chosen.startswith("BLOCK=64|")
    (page,) = [p for p in book_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for f in page.glob("*1000*"):
        f.unlink()
    added = tunebook.Space(BLOCK=[16, 32, 64, 128, 256, 512, 1024], num_warps=[1, 2, 4, 8])
    land = Landscape(near_tie(300))
    call(tuned(added, land), 300)
    assert land.measured and all(b == 1024 for b, _ in land.measured)  # only the added configs
    assert entry_of(book_dir, 300).chosen.startswith("BLOCK=64|")


def test_two_processes_reopening_one_key_end_on_the_first_ones_choice() -> None:
    """Configs Y and Z added to a decided list, deployed to two processes of a host: both
    start over X. B decides Y first; C's writes then no longer reopen (the choice they
    started over is gone), so C's full measurement of Z leaves B's screening, and C chooses
    from the book as it stands: Y, which B serves."""
    ids = [X, Y, Z]
    stored = Entry((1,), {X: res(64, 2.0)}, chosen=X)
    # B screens Y and Z, confirms Y (Z's screening is 20% slower: no contender), chooses Y
    stored = Entry((1,), {Y: res(32, 0.95, True), Z: res(16, 1.2, True)}, reopens=X).merged_over(stored)
    stored = Entry((1,), {Y: res(32, 1.0)}, reopens=X).merged_over(stored)
    stored = Entry((1,), {}, chosen=tie_aware_choice(stored.results, ids, []) or "", reopens=X).merged_over(
        stored
    )
    b_serves = stored.best(ids)
    assert b_serves == Y
    # C screened Y 0.97, Z 0.9: both contenders; confirmed in full, Z is 1.5% ahead
    stored = Entry((1,), {Y: res(32, 0.97, True), Z: res(16, 0.9, True)}, reopens=X).merged_over(stored)
    stored = Entry((1,), {Y: res(32, 1.01), Z: res(16, 0.985)}, reopens=X).merged_over(stored)
    c_choice = tie_aware_choice(stored.results, ids, [])
    stored = Entry((1,), {}, chosen=c_choice or "", reopens=X).merged_over(stored)
    assert stored.chosen == Y and stored.best(ids) == b_serves and c_choice == Y
