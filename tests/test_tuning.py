"""Tuning a key through the autotuner: spaces, strategies, budgets, adaptive timing,
resumption, failures and tie-aware choice, on real kernels in the CPU interpreter."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from typing import Any

import pytest
import torch
import triton

import tunebook
from conftest import book_files
from small_kernels import Replay, add_kernel, add_wrong_at_128_kernel, block_configs, grid_1d, vectors
from tunebook._book import read_document


class Landscape:
    """A ``do_bench`` that runs each candidate once and reports ``f(config)`` ms.

    Pass ``landscape.pre_hook`` as the autotuner's pre_hook so it knows the config.
    ``fail`` lists configs (as dicts) that raise like a config out of resources;
    ``stop_after`` raises KeyboardInterrupt after that many measurements (a kill).
    """

    def __init__(self, f, fail=(), stop_after: int | None = None) -> None:
        self.f, self.fail, self.stop_after = f, list(fail), stop_after
        self.measured: list[tuple[int, int]] = []
        self._now: dict[str, Any] = {}

    def pre_hook(self, nargs: dict[str, Any], reset_only: bool = False) -> None:
        self._now = nargs

    def __call__(self, kernel_call, quantiles=None):
        if self.stop_after is not None and len(self.measured) >= self.stop_after:
            raise KeyboardInterrupt("killed")
        kernel_call()
        cfg = {"BLOCK": self._now["BLOCK"], "num_warps": self._now["num_warps"]}
        self.measured.append((cfg["BLOCK"], cfg["num_warps"]))
        if cfg in self.fail:
            raise RuntimeError(f"config {cfg} cannot run")
        ms = self.f(cfg)
        return [ms, ms * 0.995, ms * 1.005]


def bowl(cfg: dict[str, int]) -> float:
    """A smooth landscape with its minimum at BLOCK=128, num_warps=4."""
    return 1.0 + (math.log2(cfg["BLOCK"]) - 7) ** 2 * 0.3 + (math.log2(cfg["num_warps"]) - 2) ** 2 * 0.2


SPACE = tunebook.Space(BLOCK=[16, 32, 64, 128, 256, 512], num_warps=[1, 2, 4, 8])


def tuned(space_or_configs, landscape: Landscape, **options):
    return tunebook.autotune(
        space_or_configs, key=["n"], do_bench=landscape, pre_hook=landscape.pre_hook, **options
    )(add_kernel)


def call(kernel, n: int = 300) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def entry_of(book_dir, n: int = 300):
    (path,) = book_files(book_dir)
    doc = read_document(path)
    return next(e for e in doc.entries.values() if e.key[0] == n)


def test_a_space_is_tuned_exhaustively_when_small(book_dir):
    land = Landscape(bowl)
    kernel = tuned(SPACE, land)
    call(kernel)
    assert len(land.measured) == len(SPACE) == 24
    assert kernel.best_config.kwargs == {"BLOCK": 128} and kernel.best_config.num_warps == 4
    assert len(entry_of(book_dir).results) == 24


def test_space_arg_constraints_see_the_call(book_dir):
    land = Landscape(bowl)
    space = tunebook.Space(
        BLOCK=[16, 32, 64, 128, 256, 512],
        num_warps=[1, 2, 4, 8],
        arg_constraints=[lambda c, a: c["BLOCK"] <= a["n"]],
    )
    kernel = tuned(space, land)
    call(kernel, 100)
    assert {b for b, _ in land.measured} == {16, 32, 64}
    assert kernel.best_config.kwargs == {"BLOCK": 64}


@pytest.mark.parametrize("strategy", ["random", "neighbors", "exhaustive"])
def test_budget_caps_configs_measured_per_key(strategy, book_dir):
    land = Landscape(bowl)
    kernel = tuned(SPACE, land, strategy=strategy, max_configs=7)
    call(kernel)
    assert len(land.measured) == 7
    assert len(set(land.measured)) == 7  # never the same config twice
    assert tunebook.stats()["benchmarked"] == 7
    # A new process with the same budget finds the search done: nothing measured again.
    again = Landscape(bowl)
    call(tuned(SPACE, again, strategy=strategy, max_configs=7))
    assert again.measured == []


def test_a_time_budget_is_spent_once_per_key(book_dir):
    import time

    def slow(cfg):
        time.sleep(0.01)
        return bowl(cfg)

    first = Landscape(slow)
    call(tuned(SPACE, first, strategy="random", max_seconds=0.05))
    assert 1 <= len(first.measured) < 24
    again = Landscape(slow)
    call(tuned(SPACE, again, strategy="random", max_seconds=0.05))
    assert again.measured == []  # the search for this key is done; the book answers


def test_random_strategy_is_seeded(tmp_path, monkeypatch):
    runs = []
    for i in range(2):
        monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / f"b{i}"))
        land = Landscape(bowl)
        call(tuned(SPACE, land, strategy="random", max_configs=6, seed=3))
        runs.append(land.measured)
    assert runs[0] == runs[1]


def test_a_killed_tuning_resumes_without_remeasuring(book_dir):
    killed = Landscape(bowl, stop_after=10)
    with pytest.raises(KeyboardInterrupt):
        call(tuned(SPACE, killed))
    persisted = entry_of(book_dir).results
    assert 8 <= len(persisted) <= 10  # persisted batch by batch, as measured
    resumed = Landscape(bowl)
    kernel = tuned(SPACE, resumed)
    call(kernel)
    done = {(r.config["kwargs"]["BLOCK"], r.config["num_warps"]) for r in persisted.values()}
    assert not done & set(resumed.measured)
    assert len(resumed.measured) == 24 - len(persisted)
    assert kernel.best_config.kwargs == {"BLOCK": 128}


def test_a_tuning_killed_before_it_confirmed_its_screens_is_confirmed_by_the_next(book_dir, monkeypatch):
    """Every config screened, then the process killed before its full measurements: the key
    is not answered by the screens. The next process measures the contenders in full and
    decides on them (before, it served the screens' winner, unconfirmed, for good)."""
    from tunebook import _bench

    now: dict[str, int] = {}
    screens, fulls = {32: 1.0, 64: 1.05, 128: 1.5}, {32: 1.2, 64: 1.0, 128: 1.5}
    measured: list[tuple[int, str]] = []

    def clock(kernel_call, quantiles=None, *, min_reps=3, max_reps=10, budget_s=0.2):
        full = min_reps != 1
        if full and kill:
            raise KeyboardInterrupt  # killed as its confirmation begins
        kernel_call()
        measured.append((now["BLOCK"], "full" if full else "screen"))
        ms = (fulls if full else screens)[now["BLOCK"]]
        return [ms, ms, ms]

    def pre_hook(nargs: dict[str, Any], reset_only: bool = False) -> None:
        if not reset_only:
            now["BLOCK"] = nargs["BLOCK"]

    monkeypatch.setattr(_bench, "wallclock_bench", clock)
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (32, 64, 128)]
    kill = True
    with pytest.raises(KeyboardInterrupt):
        call(tunebook.autotune(configs, key=["n"], pre_hook=pre_hook)(add_kernel), 64)
    screened = entry_of(book_dir, 64)
    assert len(screened.results) == 3 and all(r.quick for r in screened.results.values())
    assert not screened.chosen
    kill, measured = False, []
    resumed = tunebook.autotune(configs, key=["n"], pre_hook=pre_hook)(add_kernel)
    call(resumed, 64)
    assert sorted(measured) == [(32, "full"), (64, "full")]  # the contenders, nothing screened again
    assert resumed.best_config.kwargs == {"BLOCK": 64}
    assert entry_of(book_dir, 64).chosen == next(
        cid for cid, r in entry_of(book_dir, 64).results.items() if r.config["kwargs"] == {"BLOCK": 64}
    )


def test_failures_are_recorded_with_their_reason_and_never_retried(book_dir):
    bad = [{"BLOCK": 512, "num_warps": 8}, {"BLOCK": 16, "num_warps": 1}]
    land = Landscape(bowl, fail=bad)
    call(tuned(SPACE, land))
    entry = entry_of(book_dir)
    failed = {cid: r for cid, r in entry.results.items() if not r.ok}
    assert len(failed) == 2 and all("cannot run" in r.error for r in failed.values())
    again = Landscape(bowl, fail=bad)
    call(tuned(SPACE, again, max_configs=None), 301)  # another key measures them, this one never again
    call(tuned(SPACE, Landscape(bowl, fail=bad)))
    assert tunebook.stats()["failures"] == 4


def test_adaptive_timing_confirms_contenders_in_full(book_dir, monkeypatch):
    """Every config is screened; only those within 10% of the best screen are measured in
    full, and the full measurement decides (here it overturns the screen's order)."""
    from tunebook import _bench

    land = Landscape(bowl)
    quick = {(128, 4): 1.0, (64, 4): 1.08}  # (64, 4) looks 8% slower on a short screen...
    full = {(128, 4): 1.0, (64, 4): 0.9}  # ...but is faster when measured properly
    measured: list[tuple[tuple[int, int], str]] = []

    def clock(kernel_call, quantiles=None, *, min_reps=3, max_reps=10, budget_s=0.2):
        kernel_call()
        cfg = (land._now["BLOCK"], land._now["num_warps"])
        effort = "quick" if min_reps == 1 else "full"
        measured.append((cfg, effort))
        ms = (quick if effort == "quick" else full).get(cfg, 2.0 + bowl(dict(BLOCK=cfg[0], num_warps=cfg[1])))
        return [ms, ms, ms]

    monkeypatch.setattr(_bench, "wallclock_bench", clock)  # the interpreter's timer, both efforts
    kernel = tunebook.autotune(SPACE, key=["n"], pre_hook=land.pre_hook)(add_kernel)
    call(kernel, 64)
    assert sorted(c for c, e in measured if e == "quick") == sorted(
        (b, w) for b in SPACE.params["BLOCK"] for w in SPACE.params["num_warps"]
    )
    assert sorted(c for c, e in measured if e == "full") == [(64, 4), (128, 4)]
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    entry = entry_of(book_dir, 64)
    assert not entry.results[entry.best()].quick
    assert sum(1 for r in entry.results.values() if r.quick) == 22


def test_not_adaptive_measures_everything_in_full(book_dir):
    call(tunebook.autotune(SPACE, key=["n"], adaptive=False)(add_kernel), 64)
    assert not any(r.quick for r in entry_of(book_dir, 64).results.values())


def near_tie(n: int) -> Any:
    """Two configs within 1% of each other: 128 fastest at n=300, 64 at any other n."""

    def f(cfg: dict[str, int]) -> float:
        if (cfg["BLOCK"], cfg["num_warps"]) == (64, 4):
            return 1.00 if n == 300 else 0.99
        if (cfg["BLOCK"], cfg["num_warps"]) == (128, 4):
            return 0.99 if n == 300 else 1.00
        return 5.0

    return f


def test_tie_aware_choice_prefers_the_neighbouring_keys_winner(book_dir):
    # The neighbouring key chose the config 1% slower here.
    first = tuned(SPACE, Landscape(near_tie(1000)))
    call(first, 1000)
    assert first.best_config.kwargs == {"BLOCK": 64}
    second = tuned(SPACE, Landscape(near_tie(300)))
    call(second, 300)
    assert second.best_config.kwargs == {"BLOCK": 64}  # 1% slower, but the neighbour's winner
    entry = entry_of(book_dir, 300)
    assert entry.chosen.startswith("BLOCK=64|")
    # A later process reads the same choice from the book.
    third = tuned(SPACE, Landscape(near_tie(300)))
    call(third, 300)
    assert third.best_config.kwargs == {"BLOCK": 64}


def test_neighbors_starts_from_the_nearest_keys_winner(book_dir):
    big = tunebook.Space(BLOCK=[16, 32, 64, 128, 256, 512, 1024, 2048], num_warps=[1, 2, 4, 8, 16, 32])
    call(tuned(big, Landscape(bowl), max_configs=None, strategy="exhaustive"), 1000)
    land = Landscape(bowl)
    kernel = tuned(big, land, strategy="neighbors", max_configs=10)
    call(kernel, 900)
    assert land.measured[0] == (128, 4)  # the hint comes first
    assert kernel.best_config.kwargs == {"BLOCK": 128}


def test_default_budget_for_a_large_space_is_a_tenth(book_dir):
    big = tunebook.Space(
        BLOCK=[16, 32, 64, 128, 256, 512, 1024, 2048],
        num_warps=[1, 2, 4, 8, 16, 32, 64, 128],
        num_stages=[1, 2, 3, 4, 5],
    )
    assert len(big) == 320
    land = Landscape(bowl)
    call(tuned(big, land, strategy="random"))
    assert len(land.measured) == 64  # max(64, 320 // 10)


def test_progress_is_shown_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    call(tuned(SPACE, Landscape(bowl)))
    err = capsys.readouterr().err
    assert "tunebook: add_kernel [300" in err and "24/24 configs" in err and "done" in err


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown strategy .genetic.*exhaustive"):
        tuned(SPACE, Landscape(bowl), strategy="genetic")


def test_a_plain_config_list_still_works_with_strategies(book_dir):
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (32, 64, 128) for w in (2, 4)]
    land = Landscape(bowl)
    kernel = tuned(configs, land, strategy="random", max_configs=3, seed=1)
    call(kernel)
    assert len(land.measured) == 3
    assert json.loads((book_files(book_dir)[0] / "page.json").read_text())["format"] == "tunebook-page"


def test_check_excludes_a_fast_config_that_computes_the_wrong_answer(book_dir):
    from small_kernels import Replay, block_configs

    fast_and_wrong = {32: 3.0, 64: 2.0, 128: 1.0}
    replay = Replay(fast_and_wrong)
    unchecked = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_wrong_at_128_kernel)
    x, y, out = vectors(300)
    unchecked[grid_1d(300)](x, y, out, 300)
    assert unchecked.best_config.kwargs == {"BLOCK": 128}  # the control: speed alone picks it

    replay = Replay(fast_and_wrong)
    checked = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook, check=True
    )(add_wrong_at_128_kernel)
    x, y, out = vectors(301)
    checked[grid_1d(301)](x, y, out, 301)
    torch.testing.assert_close(out, x + y)
    assert checked.best_config.kwargs == {"BLOCK": 64}
    entry = entry_of(book_dir, 301)
    (wrong,) = [r for r in entry.results.values() if not r.ok]
    assert wrong.config["kwargs"] == {"BLOCK": 128} and wrong.error.startswith(
        "WrongResult: wrong result: out_ptr"
    )


def test_check_with_an_empty_dict_checks_with_the_default_tolerances(book_dir):
    # check={} (a dict of optional overrides, none given) used to turn checking off.
    from small_kernels import Replay, block_configs

    replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
    checked = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook, check={}
    )(add_wrong_at_128_kernel)
    x, y, out = vectors(302)
    checked[grid_1d(302)](x, y, out, 302)
    torch.testing.assert_close(out, x + y)
    assert checked.best_config.kwargs == {"BLOCK": 64}


def test_check_with_an_in_place_kernel_keeps_the_callers_inputs(book_dir):
    from small_kernels import accumulate_kernel, block_configs

    kernel = tunebook.autotune(block_configs(16, 32, 64), key=["n"], restore_value=["acc_ptr"], check=True)(
        accumulate_kernel
    )
    x, acc = torch.ones(50), torch.arange(50, dtype=torch.float32)
    expected = acc + x
    kernel[grid_1d(50)](x, acc, 50)
    torch.testing.assert_close(acc, expected)
    assert all(r.ok for r in entry_of(book_dir, 50).results.values())


def test_check_rejects_unknown_options():
    with pytest.raises(ValueError, match="check= takes rtol, atol, ignore and max_bytes; found tolerance"):
        tunebook.autotune(SPACE, key=["n"], check={"tolerance": 1})(add_kernel)


@pytest.mark.parametrize("b_starts", ["with A", "after A screened"])
def test_processes_tuning_one_key_at_once_serve_what_the_book_says(b_starts, book_dir, monkeypatch):
    """Two tuners of one key, their writes interleaved deterministically (issue 10 item 8).

    ``with A``: both read the key before either measured. A screens first and decides on
    its full measurements of its contenders; B screens after (A's screen stands), finds
    another contender from its own screen and confirms it in full only after A decided.
    ``after A screened`` (as a loaded CI machine started B's thread): B reads the key once A
    screened every config, screens nothing and confirms A's contenders itself, again only
    after A decided. Either way B's full measurements must not overturn the decision A
    serves: A, B and a later process serve the same config. (Before _policy.answered
    counted a search still confirming as unfinished, B served A's unconfirmed screens
    without measuring, and A waited for B's full measurement in vain.)"""
    import threading

    from tunebook import _bench

    screens = {"A": {32: 1.0, 64: 1.05, 128: 1.5}, "B": {32: 1.5, 64: 1.5, 128: 1.0}}
    fulls = {"A": {32: 1.0, 64: 1.05, 128: 1.5}, "B": {32: 1.5, 64: 1.5, 128: 0.5}}
    a_screened, b_screened, a_done = threading.Event(), threading.Event(), threading.Event()
    b_ready = threading.Event()
    now: dict[str, int] = {}
    b_screens: list[int | None] = []
    # A wait that times out fails the measurement it is in, and the tuner goes on: the final
    # assertion names the waits that did, with where every other thread stood then.
    timed_out: list[str] = []

    def wait(event: threading.Event, what: str) -> None:
        if not event.wait(60):
            timed_out.append(f"{what}\n{other_threads()}")
            raise AssertionError(what)

    def clock(kernel_call, quantiles=None, *, min_reps=3, max_reps=10, budget_s=0.2):
        me = threading.current_thread().name
        full = min_reps != 1
        if me == "A" and not full and b_starts == "with A":
            wait(b_ready, "A's screen: B never began its screen")  # B read the key before A wrote it
        if me == "B" and not full:
            b_ready.set()
            # Before B launches, not after: two threads' launches collide on Triton's
            # interpreter (a collision raised out of B's first launch once skipped this
            # wait). One thread launches at a time.
            wait(a_screened, f"B's screen of BLOCK={now.get('B')}: A never began its full measurements")
            b_screens.append(now.get("B"))
        kernel_call()
        if full and me == "A" and not a_screened.is_set():
            a_screened.set()
            wait(b_screened, f"A's full BLOCK={now.get('A')}: B never began its full measurements")
        if full and me == "B" and not b_screened.is_set():
            b_screened.set()
            wait(a_done, "B's first full measurement: A never finished")
        ms = (fulls if full else screens)[me][now[me]]
        return [ms, ms, ms]

    def hook(me: str):
        def pre_hook(nargs: dict[str, Any], reset_only: bool = False) -> None:
            if not reset_only:
                now[me] = nargs["BLOCK"]

        return pre_hook

    monkeypatch.setattr(_bench, "wallclock_bench", clock)
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (32, 64, 128)]
    kernels = {me: tunebook.autotune(configs, key=["n"], pre_hook=hook(me))(add_kernel) for me in "AB"}
    threads = {me: threading.Thread(target=call, args=(kernels[me], 64), name=me) for me in "AB"}
    threads["A"].start()
    if b_starts == "after A screened":
        wait(a_screened, "A never began its full measurements")
    threads["B"].start()
    threads["A"].join(120)
    a_done.set()
    threads["B"].join(120)
    served = {me: kernels[me].best_config.kwargs["BLOCK"] for me in "AB"}
    later = tunebook.autotune(configs, key=["n"])(add_kernel)
    call(later, 64)
    assert served == {"A": 32, "B": 32} and later.best_config.kwargs["BLOCK"] == 32, (served, *timed_out)
    assert len(b_screens) == (0 if b_starts == "after A screened" else 3), b_screens


def other_threads() -> str:
    """Where every thread but the calling one stands: their stacks, for a test's message."""
    import sys
    import threading
    import traceback

    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
        if ident != me
    )


def interpreter_collision() -> Exception:
    """The exception a launch on Triton's interpreter raises when another thread's launch
    collides with it (Triton 3.9): the other launch, ending, put ``triton.language`` back as it
    is outside a kernel, so this one's ``tl.arange`` meets the error of a call outside
    @triton.jit, wrapped as the interpreter wraps every error of a launch. (Triton 3.4 leaves
    the language patched after a first launch, so there the error is made from its text.)"""
    from triton.runtime.errors import InterpreterError

    try:
        triton.language.arange(0, 16)  # outside a launch: what the collided launch meets
        cause = ValueError(
            "Did you forget to add @triton.jit ? "
            "(`_semantic` argument must be provided outside of JIT functions.)"
        )
    except ValueError as exc:
        cause = exc
    wrapped = InterpreterError(repr(cause))
    wrapped.__cause__ = cause
    return wrapped


class Collided(Replay):
    """``Replay``, but the first ``collisions[BLOCK]`` launches of a block collide."""

    def __init__(self, table: dict[int, float], collisions: dict[int, int]) -> None:
        super().__init__(table)
        self.collisions = dict(collisions)

    def __call__(self, kernel_call: Any, quantiles: Any = None) -> list[float]:
        kernel_call()  # the pre-hook tells which config this is
        block = self._current["BLOCK"]
        if self.collisions.get(block, 0) > 0:
            self.collisions[block] -= 1
            self.measured.append(block)
            raise interpreter_collision()
        return super().__call__(kernel_call, quantiles)


def test_a_config_whose_launch_another_thread_collided_with_is_measured_again(book_dir):
    """A config that failed only because another thread's interpreter launch collided with it
    is not stored as failed forever (issue 10 item 11): it is measured once more at once."""
    bench = Collided({32: 3.0, 64: 1.0, 128: 2.0}, collisions={64: 1})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook
    )(add_kernel)
    call(kernel)
    assert sorted(bench.measured) == [32, 64, 64, 128]
    entry = entry_of(book_dir)
    assert all(r.ok for r in entry.results.values())
    assert entry.results[entry.best()].config["kwargs"] == {"BLOCK": 64}


def test_a_config_that_collides_twice_is_left_for_a_later_tuning(book_dir):
    """Collided twice in a row, the config is not recorded at all: this process serves the best
    of the others, and the next tuning of the key measures that config alone."""
    bench = Collided({32: 3.0, 64: 1.0, 128: 2.0}, collisions={64: 2})
    first = tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook)(
        add_kernel
    )
    call(first)
    assert first.best_config.kwargs == {"BLOCK": 128}
    stored = entry_of(book_dir).results.values()
    assert sorted(r.config["kwargs"]["BLOCK"] for r in stored) == [32, 128]
    assert all(r.ok for r in stored)
    bench.measured.clear()
    later = tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook)(
        add_kernel
    )
    call(later)
    assert bench.measured == [64]
    assert later.best_config.kwargs == {"BLOCK": 64}


def test_a_config_out_of_memory_is_not_recorded_and_measured_again_later(book_dir, caplog):
    """Found by a misuse review: an out-of-memory error of the moment (other allocations
    held the memory) was recorded as the config's failure, never measured again."""

    class Tight(Replay):
        def __call__(self, kernel_call: Any, quantiles: Any = None) -> list[float]:
            kernel_call()  # its pre_hook says which config runs
            if self._current["BLOCK"] == 64 and self.full:
                self.measured.append(64)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().__call__(lambda: None, quantiles)

    def kernel(bench: Replay) -> Any:
        return tunebook.autotune(
            block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook
        )(add_kernel)

    tight = Tight({32: 3.0, 64: 1.0, 128: 2.0})
    tight.full = True
    with caplog.at_level(logging.WARNING, logger="tunebook"):
        call(kernel(tight))
    assert tight.measured.count(64) == 2  # once more, then left out
    assert "failed twice because the device was out of memory (OutOfMemoryError" in caplog.text
    assert len(entry_of(book_dir).results) == 2 and "recorded in the book" not in caplog.text
    roomy = Tight({32: 3.0, 64: 1.0, 128: 2.0})
    roomy.full = False
    later = kernel(roomy)
    call(later)
    assert roomy.measured == [64] and later.best_config.kwargs == {"BLOCK": 64}


def test_a_failure_that_is_not_the_configs_is_recorded_and_said(book_dir, caplog):
    """Found by a misuse review: a grid function that raised for one config had that config
    recorded as failed, never measured again, and nothing said."""
    bench = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook
    )(add_kernel)
    x, y, out = vectors(300)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        if meta["BLOCK"] == 64:
            raise ZeroDivisionError("the grid divides by zero at BLOCK=64")
        return (triton.cdiv(300, meta["BLOCK"]),)

    with caplog.at_level(logging.WARNING, logger="tunebook"):
        kernel[grid](x, y, out, 300)
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    (said,) = [r.getMessage() for r in caplog.records if "recorded in the book" in r.getMessage()]
    assert "raised ZeroDivisionError: the grid divides by zero at BLOCK=64" in said
    assert "delete the key's file" in said


def test_a_real_failure_under_the_interpreter_is_still_recorded(book_dir):
    """Only the collision's signature is transient: another interpreter error is the config's."""
    from triton.runtime.errors import InterpreterError

    class Broken(Replay):
        def __call__(self, kernel_call: Any, quantiles: Any = None) -> list[float]:
            kernel_call()
            if self._current["BLOCK"] == 64:
                self.measured.append(64)
                raise InterpreterError(repr(IndexError("index 64 is out of bounds")))
            return super().__call__(kernel_call, quantiles)

    bench = Broken({32: 3.0, 128: 2.0})
    call(
        tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=bench, pre_hook=bench.pre_hook)(
            add_kernel
        )
    )
    assert bench.measured.count(64) == 1
    failed = [r for r in entry_of(book_dir).results.values() if not r.ok]
    assert len(failed) == 1 and "out of bounds" in str(failed[0].error)


BLOCKS = [16, 32, 64, 128, 256, 512, 1024, 2048]
BIG = tunebook.Space(BLOCK=BLOCKS, num_warps=[1, 2, 4, 8], num_stages=[2, 3, 4])


def pick_rule(key, configs):
    """A kernel's hand-written rule (``fallback=``): BLOCK=512 with one warp, for every key."""
    return next(c for c in configs if c.kwargs["BLOCK"] == 512 and c.num_warps == 1)


def test_the_fallback_rules_config_is_measured_first_and_kept_on_a_tie(book_dir, monkeypatch):
    # The best config is 1% faster than the rule's: within the tie tolerance, so the tuned key
    # keeps what serve mode would have launched untuned, and never ends slower than it.
    def f(cfg):
        return {(128, 4): 1.00, (512, 1): 1.01}.get((cfg["BLOCK"], cfg["num_warps"]), 5.0)

    chose = []
    real = tunebook._tuner.choose_strategy
    monkeypatch.setattr(
        tunebook._tuner, "choose_strategy", lambda n, b, h: chose.append(list(h)) or real(n, b, h)
    )
    land = Landscape(f)
    kernel = tuned(BIG, land, fallback=pick_rule, max_configs=None)
    call(kernel)
    assert land.measured[0] == (512, 1)
    assert (128, 4) in land.measured
    assert (kernel.best_config.kwargs["BLOCK"], kernel.best_config.num_warps) == (512, 1)
    assert entry_of(book_dir).chosen.startswith("BLOCK=512|")
    # The rule is no measured neighbour: it does not turn the search into a local one.
    assert chose == [[]]


def test_a_config_clearly_faster_than_the_rules_wins(book_dir):
    def f(cfg):
        return {(128, 4): 1.00, (512, 1): 1.10}.get((cfg["BLOCK"], cfg["num_warps"]), 5.0)

    land = Landscape(f)
    kernel = tuned(BIG, land, fallback=pick_rule, max_configs=None)
    call(kernel)
    assert land.measured[0] == (512, 1)
    assert (kernel.best_config.kwargs["BLOCK"], kernel.best_config.num_warps) == (128, 4)


def test_a_fallback_that_raises_does_not_stop_tuning(book_dir, caplog):
    def broken(key, configs):
        raise ZeroDivisionError("the rule divides by the key")

    land = Landscape(bowl)
    kernel = tuned(BIG, land, fallback=broken, strategy="random", max_configs=5, seed=1)
    with pytest.warns(tunebook.BookWarning, match=r"fallback= failed \(ZeroDivisionError: the rule divides"):
        call(kernel)
    assert len(land.measured) == 5
    assert entry_of(book_dir).chosen is not None


def test_a_fallback_that_returns_no_config_is_named_for_it(book_dir, monkeypatch):
    """Found by a misuse review: a dict returned (a config's kwargs) ended in "'dict' object
    has no attribute 'kwargs'" in serve mode, and "fallback= raised AttributeError" in tune mode."""

    def as_dict(key, configs):
        return {"BLOCK": 64}

    kernel = tuned(block_configs(32, 64), Landscape(bowl), fallback=as_dict, max_configs=None)
    with pytest.warns(
        tunebook.BookWarning, match="fallback= failed .TypeError: add_kernel: fallback= returned dict"
    ):
        call(kernel)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    served = tuned(block_configs(32, 64), Landscape(bowl), fallback=as_dict)
    with pytest.raises(
        TypeError, match=r"fallback= returned dict \{'BLOCK': 64\}; it must return one of the configs"
    ):
        call(served, 999)


RULE_MODULE = """
import torch, triton, tunebook
from small_kernels import add_kernel, grid_1d

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

def pick_rule(key, configs):
    return next(c for c in configs if c.kwargs["BLOCK"] == 512 and c.num_warps == 1)

add = tunebook.autotune(
    tunebook.Space(BLOCK=[16, 64, 256, 512, 2048], num_warps=[1, 2, 4, 8], num_stages=[2, 3, 4, 5]),
    key=["n"], fallback=pick_rule, max_configs=10, inputs=inputs,
)(add_kernel)
"""


def test_a_sweeps_plan_measures_the_rules_config_first_without_a_local_search(tmp_path, monkeypatch):
    # A Ray sweep plans each key in a worker (tunebook._worker.units.plan): the same hints as
    # tune_key, the rule's config among them, and the strategy the hints alone would choose.
    from tunebook._worker.units import plan

    (tmp_path / "rulekern.py").write_text(RULE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    p = plan({"module": "rulekern", "attr": "add", "key_text": "n=300", "call": None, "key": {"n": 300}})
    (hint,) = p["hints"]
    assert p["ids"][hint].startswith("BLOCK=512|") and "num_warps=1" in p["ids"][hint]
    assert p["strategy"] in ("bayes", "random")


def screened_then_full(land: Landscape, times: dict[tuple[int, int], float], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The interpreter's timer replaced: (BLOCK, num_warps) in ``times`` take that long, the
    rest follow the bowl 2 ms higher, screened (quick) or measured in full alike."""
    from tunebook import _bench

    def clock(kernel_call, quantiles=None, *, min_reps=3, max_reps=10, budget_s=0.2):  # type: ignore[no-untyped-def]
        kernel_call()
        cfg = (land._now["BLOCK"], land._now["num_warps"])
        land.measured.append(cfg)
        ms = times.get(cfg, 2.0 + bowl({"BLOCK": cfg[0], "num_warps": cfg[1]}))
        return [ms, ms, ms]

    monkeypatch.setattr(_bench, "wallclock_bench", clock)


def test_a_faster_config_added_to_a_decided_list_wins(book_dir, monkeypatch):
    """The added config is screened, confirmed in full, and chosen: the decided search is
    reopened (its screening used to stay one, which never competes with full measurements)."""
    land = Landscape(bowl)
    screened_then_full(land, {(32, 8): 1.0}, monkeypatch)
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128, 256)]
    call(tunebook.autotune(configs, key=["n"], pre_hook=land.pre_hook)(add_kernel), 64)
    assert entry_of(book_dir, 64).chosen == "BLOCK=128|num_ctas=1,num_stages=3,num_warps=4"
    land.measured.clear()
    added = [*configs, triton.Config({"BLOCK": 32}, num_warps=8)]
    kernel = tunebook.autotune(added, key=["n"], pre_hook=land.pre_hook)(add_kernel)
    call(kernel, 64)
    assert land.measured == [(32, 8), (32, 8)]  # screened, then confirmed in full
    assert kernel.best_config.kwargs == {"BLOCK": 32} and kernel.best_config.num_warps == 8
    entry = entry_of(book_dir, 64)
    assert entry.chosen == "BLOCK=32|num_ctas=1,num_stages=3,num_warps=8"
    assert not entry.results[entry.chosen].quick


def test_a_search_resumed_with_a_larger_budget_chooses_what_it_finds(book_dir, monkeypatch):
    land = Landscape(bowl)
    screened_then_full(land, {(32, 8): 1.0}, monkeypatch)
    options = {"key": ["n"], "pre_hook": land.pre_hook, "strategy": "random"}
    call(tunebook.autotune(SPACE, max_configs=3, **options)(add_kernel), 64)
    assert (32, 8) not in land.measured  # this seed's first three: the old winner is another
    kernel = tunebook.autotune(SPACE, max_configs=8, **options)(add_kernel)
    call(kernel, 64)
    assert kernel.best_config.kwargs == {"BLOCK": 32} and kernel.best_config.num_warps == 8
    assert entry_of(book_dir, 64).chosen == "BLOCK=32|num_ctas=1,num_stages=3,num_warps=8"
    # and the next process serves it, benchmarking nothing
    land.measured.clear()
    call(tunebook.autotune(SPACE, max_configs=8, **options)(add_kernel), 64)
    assert land.measured == []


@pytest.mark.parametrize("stderr", ["none", "closed", "broken pipe"])
def test_progress_never_fails_the_call_whatever_stderr_is(monkeypatch, stderr):
    """Found by a misuse review: with stderr None (a process started with it closed), closed,
    or a pipe whose reader had gone, the kernel call raised from the progress line."""

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    stream = {"none": None, "closed": io.StringIO(), "broken pipe": Gone()}[stderr]
    if stderr == "closed":
        stream.close()
    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    monkeypatch.setattr(sys, "stderr", stream)
    land = Landscape(bowl)
    call(tuned(SPACE, land))
    assert len(land.measured) == 24


@pytest.mark.parametrize(
    "options",
    [{}, {"strategy": "exhaustive"}, {"max_configs": 24}],
    ids=["auto", "exhaustive", "max_configs-covers-the-space"],
)
def test_a_time_budget_stops_an_exhaustive_search_too(options, book_dir):
    """Found by a search review: a search that ``auto`` made exhaustive (24 configs here) was
    one batch of every candidate, and measured all of them whatever ``max_seconds`` said."""
    import time

    def slow(cfg):
        time.sleep(0.01)
        return bowl(cfg)

    land = Landscape(slow)
    call(tuned(SPACE, land, max_seconds=0.05, **options))
    assert len(land.measured) == 16  # one batch, then the clock
    results = entry_of(book_dir).results
    assert len(results) == 16 and all(r.ok for r in results.values())  # the rest: not measured
    again = Landscape(slow)
    call(tuned(SPACE, again, max_seconds=0.05, **options))
    # A time budget alone: the search is final, as for the other strategies; under max_configs
    # too, the next process measures what it left (docs/spaces-and-strategies.md).
    assert len(again.measured) == (8 if "max_configs" in options else 0)


def test_a_time_budget_smaller_than_a_clock_tick_still_measures_a_batch(book_dir):
    """Found by a search review: with max_seconds=1e-12 the search stopped before its first
    batch; nothing was measured, in this process or any later one."""
    land = Landscape(bowl)
    kernel = tuned(SPACE, land, strategy="random", max_seconds=1e-12)
    call(kernel)
    assert len(land.measured) == 16
    assert tunebook.stats()["benchmarked"] == 16


@pytest.mark.parametrize("seed", [-1, 2**40])
def test_a_bayes_search_takes_any_integer_seed(seed, book_dir):
    """Found by a search review: ``seed=-1`` or ``2**40`` passed decoration, then the first
    call of every new key raised NumPy's "Seed must be between 0 and 2**32 - 1"."""
    land = Landscape(bowl)
    call(tuned(SPACE, land, strategy="bayes", seed=seed, max_configs=5))
    assert len(land.measured) == 5


@pytest.mark.parametrize(
    ("space", "said"),
    [
        (
            tunebook.Space(BLOCK=[32, 64], num_ctas=[2]),
            r"2 configs, 2 after its constraints, 0 after the platform filter \(num_ctas > 1 needs CUDA "
            r"sm_90 or newer, maxnreg needs CUDA; this platform is interpreter .*\); add values it can run",
        ),
        (
            tunebook.Space(BLOCK=[32, 64], constraints=[lambda c: c["BLOCK"] > 64]),
            r"2 configs, 0 after its constraints; loosen its constraints",
        ),
        (
            tunebook.Space(BLOCK=[32, 64], arg_constraints=[lambda c, args: c["BLOCK"] > args["n"]]),
            r"2 configs, 2 after its constraints, 2 after the platform filter, 0 after its arg_constraints "
            r"for this call; loosen its arg_constraints",
        ),
    ],
    ids=["platform", "constraints", "arg_constraints"],
)
def test_a_call_without_candidates_is_told_which_filter_removed_them(space, said):
    """Found by a search review: the error always blamed "constraints or arg_constraints",
    also where the platform filter had removed every config (num_ctas=[2] off Hopper)."""
    with pytest.raises(
        tunebook.ConfigurationError, match=r"no feasible config for this call \(n=300\): " + said
    ):
        call(tunebook.autotune(space, key=["n"])(add_kernel))


def test_a_space_of_numpy_values_is_tuned_and_read_back_from_the_book(book_dir):
    """Found by a search review: np.int64 values failed every config in the interpreter, and
    the book would have stored them as text that no later read matched to the Space."""
    import numpy as np

    space = tunebook.Space(BLOCK=list(2 ** np.arange(5, 8)), num_warps=[np.int64(4)])
    land = Landscape(bowl)
    kernel = tuned(space, land)
    call(kernel)
    assert kernel.best_config.kwargs == {"BLOCK": 128} and len(land.measured) == 3
    assert all(type(r.config["kwargs"]["BLOCK"]) is int for r in entry_of(book_dir).results.values())
    for mode in ("tune", "serve"):  # a later kernel reads its answer from the book
        again = Landscape(bowl)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TUNEBOOK_MODE", mode)
            later = tuned(tunebook.Space(BLOCK=np.array([32, 64, 128]), num_warps=[4]), again)
            call(later)
        assert again.measured == [] and later.best_config.kwargs == {"BLOCK": 128}
