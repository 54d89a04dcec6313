"""The miss rule (``tunebook._policy``): pure functions over book entries, no kernel needed."""

from __future__ import annotations

import math

from tunebook._book import Entry, Result
from tunebook._policy import (
    answered,
    decide,
    effective_budget,
    hints,
    key_distance,
    nearest,
    search_done,
    serve_choice,
)
from tunebook._search import Budget

IDS = ["a", "b", "c"]


def ok(ms: float) -> Result:
    return Result({"kwargs": {}}, (ms, ms, ms))


def failed() -> Result:
    return Result({"kwargs": {}}, None, "OutOfResources")


def entry(key: tuple, chosen: str = "", **results: Result) -> Entry:
    return Entry(key=key, results=dict(results), chosen=chosen)


def test_a_fully_measured_key_is_answered_by_the_book_in_every_mode_but_off():
    full = entry((1024, "fp16"), a=ok(3.0), b=ok(1.0), c=failed())
    for mode in ("tune", "serve"):
        assert decide(full, IDS, mode, Budget()) == "book"
    assert decide(full, IDS, "off", Budget()) == "tune"  # off: measure, remember nothing


def test_a_partly_measured_key_is_tuned_or_served_by_mode():
    partial = entry((1024, "fp16"), a=ok(3.0))
    assert decide(partial, IDS, "tune", Budget()) == "tune"
    assert decide(partial, IDS, "serve", Budget()) == "serve"
    assert decide(None, IDS, "serve", Budget()) == "serve"


def test_a_budgeted_search_that_ended_with_a_choice_answers_the_key():
    ids = [f"c{i}" for i in range(1000)]
    measured = {cid: ok(1.0 + i) for i, cid in enumerate(ids[:100])}
    done = Entry(key=(1,), results=measured, chosen="c0")
    assert effective_budget(Budget(), 1000).max_configs == 100
    assert search_done(done, ids, Budget()) and answered(done, ids, Budget())
    assert not search_done(Entry(key=(1,), results=measured), ids, Budget())  # no choice: not done
    assert not search_done(done, ids, Budget(max_configs=200))  # a larger budget: more to measure
    assert search_done(done, ids, Budget(max_seconds=5.0))  # time budget alone: the choice is final


def test_serve_mode_serves_a_finished_search_whatever_its_budget():
    ids = [f"c{i}" for i in range(1000)]
    converged = Entry(key=(1,), results={cid: ok(1.0 + i) for i, cid in enumerate(ids[:12])}, chosen="c0")
    assert decide(converged, ids, "serve", Budget()) == "book"  # 12 measured, the budget says 100
    assert decide(converged, ids, "tune", Budget()) == "tune"  # tuning may go on: resumes from the 12
    unfinished = Entry(key=(1,), results=converged.results)
    assert decide(unfinished, ids, "serve", Budget()) == "serve"
    elsewhere = Entry(key=(1,), results=converged.results, chosen="c0")
    assert decide(elsewhere, ids[1:], "serve", Budget()) == "serve"  # its choice is not allowed here


def test_a_read_only_books_choice_answers_tune_mode_without_a_budget_of_the_kernels_own():
    ids = [f"c{i}" for i in range(100)]  # more than SMALL_SPACE: the default budget is 64 configs
    short = Entry(key=(1,), results={"c0": ok(2.0), "c1": ok(1.0)}, chosen="c1")
    assert decide(short, ids, "tune", Budget()) == "tune"  # a short search in a writable book
    assert decide(short, ids, "tune", Budget(), settled=short) == "book"
    assert decide(short, ids, "tune", Budget(max_configs=10), settled=short) == "tune"  # the kernel's own
    assert decide(short, ids, "off", Budget(), settled=short) == "tune"
    elsewhere = Entry(key=(1,), results={"x": ok(1.0)}, chosen="x")  # a choice this call does not allow
    assert decide(short, ids, "tune", Budget(), settled=elsewhere) == "tune"
    # A small space is measured whole: a config added to it is measured (and only that one).
    assert decide(short, ids[:3], "tune", Budget(), settled=short) == "tune"


def test_serve_chain_in_order_user_own_results_nearest_first_config():
    own = entry((1024, "fp16"), b=ok(2.0), a=ok(1.5))
    near = entry((2048, "fp16"), c=ok(0.1))
    far = entry((1 << 20, "fp16"), b=ok(0.1))
    assert serve_choice(IDS, own, [near, far], picked="c")[0] == "c"
    assert serve_choice(IDS, own, [near, far], picked="zzz")[0] == "a"  # not a candidate: ignored
    assert serve_choice(IDS, own, [near, far]) == ("a", "the best of its own partial results")
    assert serve_choice(IDS, None, [near, far])[0] == "c"
    assert serve_choice(IDS, entry((1024, "fp16"), a=failed()), [far])[0] == "b"  # own results all failed
    assert serve_choice(IDS, None, []) == (
        None,
        "the first config (nothing comparable remembered for this kernel on this platform)",
    )


def test_nearest_keys_rank_by_log_distance_and_never_cross_dtypes():
    key = (1000, "torch.float16")
    entries = [
        entry((1 << 20, "torch.float16")),
        entry((1024, "torch.bfloat16")),
        entry((4096, "torch.float16")),
        entry((1024, "torch.float16")),
        entry((1000, "torch.float16")),  # the key itself
    ]
    assert [e.key for e in nearest(key, entries)] == [
        (1024, "torch.float16"),
        (4096, "torch.float16"),
        (1 << 20, "torch.float16"),
    ]
    assert key_distance([1, "x"], [1, "x", 2]) == math.inf


def test_hints_are_the_winners_of_the_nearest_keys_then_other_platforms_without_repeats():
    near = [entry((1,), a=ok(2.0), b=ok(1.0)), entry((2,), b=ok(1.0)), entry((3,), c=ok(1.0))]
    sibling = [entry((0,), a=ok(1.0))]
    assert hints(IDS, near, sibling) == [1, 2, 0]
    many = [entry((i,), c=ok(1.0)) for i in range(3)] + [entry((9,), a=ok(1.0))] + [entry((10,), b=ok(1.0))]
    assert hints(IDS, many) == [2, 0]  # only the first four nearest keys count


def test_seeds_rank_each_versions_fastest_full_measurements_and_leave_the_budget_room():
    from tunebook._policy import MAX_SEEDS, seeds

    ids = [f"c{i}" for i in range(10)]
    quick = Result({"kwargs": {}}, (0.1, 0.1, 0.1), quick=True)
    newest = Entry(
        key=(1,), results={"c5": ok(2.0), "c7": ok(1.0), "c1": quick, "c2": ok(3.0), "c9": ok(4.0)}
    )
    older = Entry(key=(1,), results={"c7": ok(1.0), "c0": ok(1.5), "c3": ok(2.5), "c4": ok(3.5)})
    assert seeds(ids, [newest, older]) == [7, 5, 2, 0, 3]  # c1 was only screened
    many = [Entry(key=(1,), results={f"c{i}": ok(1.0)}) for i in range(10)]
    assert seeds(ids, many) == list(range(MAX_SEEDS))
