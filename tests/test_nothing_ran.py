"""Keys where configs fail: which failures are the configs' (recorded, never measured again)
and which may be the call's or the timer's (raised, or held back and measured again), what
is said when no config of a key runs, and that none of it depends on the order in which
the configs happen to be measured. Real kernels on the CPU interpreter; a later process
where what the book keeps across processes is the point."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import tunebook
from conftest import book_files, run_python
from small_kernels import add_kernel, grid_1d, vectors
from tunebook._book import read_document


@triton.jit
def needs_64_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, LEAST: tl.constexpr = 64):
    tl.static_assert(BLOCK >= LEAST, "BLOCK too small")
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def results(book_dir) -> dict[str, Any]:
    files = book_files(book_dir)
    if not files:
        return {}
    (entry,) = read_document(files[0]).entries.values()
    return entry.results


def run(kernel, n: int = 300, grid=None) -> None:
    x, y, out = vectors(n)
    kernel[grid or grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


@pytest.mark.parametrize("blocks", [[16, 32, 64, 128], [64, 128, 16, 32]], ids=["small-first", "small-last"])
def test_a_failed_static_assert_on_the_interpreter_is_the_configs_whatever_the_order(blocks, book_dir):
    """Found by a search review: under TRITON_INTERPRET=1 a failed tl.static_assert was taken
    for the call's error, and the call raised when the small blocks came first."""
    kernel = tunebook.autotune(tunebook.Space(BLOCK=blocks, num_warps=[2, 4]), key=["n"])(needs_64_kernel)
    run(kernel)
    assert kernel.best_config.kwargs["BLOCK"] in (64, 128)
    failed = [r for r in results(book_dir).values() if not r.ok]
    assert len(failed) == 4 and all("BLOCK too small" in str(r.error) for r in failed)


def grid_from_128(n: int):
    def grid(meta: dict[str, Any]) -> tuple[int]:
        if meta["BLOCK"] < 128:
            raise ValueError(f"grid: BLOCK {meta['BLOCK']} unsupported")
        return (triton.cdiv(n, meta["BLOCK"]),)

    return grid


def test_whether_a_call_is_at_fault_does_not_depend_on_which_configs_came_first(book_dir, caplog):
    """Found by a search review: the call raised if the first results saved (4 configs, or
    1 s) had all failed for a reason that is not the backend's, and went on otherwise; so
    the same call passed or failed with the seed, the order of the Space or the clock."""
    space = tunebook.Space(BLOCK=[16, 32, 64, 128], num_warps=[1, 2])  # the first six fail
    kernel = tunebook.autotune(space, key=["n"])(add_kernel)
    with caplog.at_level(logging.WARNING, logger="tunebook"):
        run(kernel, grid=grid_from_128(300))
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    book = results(book_dir)
    assert len(book) == 8 and sum(not r.ok for r in book.values()) == 6  # recorded, once one ran
    assert "grid: BLOCK 16 unsupported" in caplog.text and "delete the key's file" in caplog.text


def test_a_call_that_no_config_can_run_raises_its_error_naming_how_many_failed(book_dir):
    kernel = tunebook.autotune(tunebook.Space(BLOCK=[16, 32, 64], num_warps=[1, 2]), key=["n"])(add_kernel)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        raise ValueError("grid: the call is broken")

    with pytest.raises(ValueError, match="grid: the call is broken") as raised:
        run(kernel, grid=grid)
    (note,) = raised.value.__notes__
    assert "none of the 6 configs measured ran (6x ValueError: grid: the call is broken)" in note
    assert (
        "This is the exception of config BLOCK=16|" in note and "the cause is most likely in the call" in note
    )
    assert results(book_dir) == {}  # nothing that may be the call's fault is recorded


def test_a_call_that_raises_one_error_for_every_config_is_stopped_after_eight(book_dir):
    """Found by a review of the change above: with the decision at the end of the search, an
    always-raising grid function was said after all 64 configs (each compiled first, on a
    GPU), where it had been said after 4. Eight alike stop it, whatever the order."""
    kernel = tunebook.autotune([triton.Config({"BLOCK": 16 * (i + 1)}) for i in range(64)], key=["n"])(
        add_kernel
    )
    seen: set[int] = set()

    def grid(meta: dict[str, Any]) -> tuple[int]:
        seen.add(meta["BLOCK"])
        raise ValueError("grid: the call is broken")

    with pytest.raises(ValueError, match="grid: the call is broken") as raised:
        run(kernel, grid=grid)
    assert len(seen) == 8
    assert "none of the 8 configs measured ran" in raised.value.__notes__[0]
    assert results(book_dir) == {}


def nan_bench(kernel_call, quantiles=None):
    kernel_call()
    return [float("nan")] * 3


LATER = """
import json, logging, os
import tunebook
from triton.runtime.errors import OutOfResources
from small_kernels import add_kernel, grid_1d, vectors, Replay

logging.basicConfig(level=logging.WARNING)
replay = Replay({16: 3.0, 32: 1.0, 64: 2.0})
if os.environ["TIMER"] == "oor":
    def bench(kernel_call, quantiles=None):
        kernel_call()
        replay.measured.append(replay._current["BLOCK"])
        raise OutOfResources(100000, 65536, "shared memory")
else:
    bench = replay
space = tunebook.Space(BLOCK=[16, 32, 64], num_warps=[1, 2])
kernel = tunebook.autotune(space, key=["n"], do_bench=bench, pre_hook=replay.pre_hook)(add_kernel)
x, y, out = vectors(300)
kernel[grid_1d(300)](x, y, out, 300)
assert (out == x + y).all()
print(json.dumps({**tunebook.stats(), "measured": replay.measured, "best": kernel.best_config.kwargs}))
"""


def test_a_timer_that_gave_no_timing_is_said_and_a_later_process_measures_the_key_again(book_dir):
    """Found by a search review: a do_bench that returned NaN for every config (a broken
    timer) left nothing said, the first config launched, and the key in the book as
    answered: every later process served it as a book hit, even once the timer was fixed."""
    kernel = tunebook.autotune(
        tunebook.Space(BLOCK=[16, 32, 64], num_warps=[1, 2]), key=["n"], do_bench=nan_bench
    )(add_kernel)
    with pytest.warns(tunebook.BookWarning) as warned:
        run(kernel)  # the first config runs in their place, and computes the right answer
        run(kernel)  # said once per key
    (said,) = [str(w.message) for w in warned if "none of the" in str(w.message)]
    assert "add_kernel key [300, 'torch.float32', 'torch.float32', 'torch.float32']" in said
    assert "none of the 6 configs measured ran (6x no valid timing: [nan, nan, nan])" in said
    assert "fix the timer" in said and "the next process that tunes the key measures them again" in said
    assert kernel.best_config.kwargs == {"BLOCK": 16}
    assert all(r.ok for r in results(book_dir).values())  # the timer's NaNs are not recorded

    later = run_python(LATER, env={"TUNEBOOK_DIR": str(book_dir), "TIMER": "fixed"})
    assert later["book_hits"] == 0 and sorted(later["measured"]) == [16, 16, 32, 32, 64, 64]
    assert later["best"] == {"BLOCK": 32}


def test_configs_that_cannot_run_here_are_said_in_every_process_and_never_measured_again(book_dir):
    """Every config out of resources: recorded as the configs' failures (measuring them again
    would fail the same way), said once per key and process, and never a book hit that
    serves a config no measurement chose."""
    first = run_python(LATER, env={"TUNEBOOK_DIR": str(book_dir), "TIMER": "oor"})
    assert first["failures"] == 6 and len(first["measured"]) == 6
    assert (
        "none of the 6 configs measured ran (6x OutOfResources: out of resource: shared memory"
        in (first["_stderr"])
    )
    assert "6 cannot run here (recorded in the book): add configs this device can run" in first["_stderr"]
    assert len(results(book_dir)) == 6
    later = run_python(LATER, env={"TUNEBOOK_DIR": str(book_dir), "TIMER": "oor"})
    assert later["measured"] == [] and later["book_hits"] == 0
    assert "none of the 6 configs measured ran" in later["_stderr"]


def test_a_launch_in_place_of_configs_of_which_none_ran_says_so_when_it_fails(book_dir):
    """Every config fails its static_assert: the first config launched in their place fails
    too, and the error says that no config could run, at every call of the key."""
    kernel = tunebook.autotune(tunebook.Space(BLOCK=[16, 32], num_warps=[1, 2]), key=["n"])(needs_64_kernel)
    for call in range(2):
        with pytest.raises(tunebook.TuningFailed) as raised:
            if call == 0:
                with pytest.warns(tunebook.BookWarning, match="none of the 4 configs measured ran"):
                    run(kernel)
            else:
                run(kernel)
        assert "none of the 4 configs measured ran (4x InterpreterError" in str(raised.value)
        assert "The first config is launched in their place, and it failed too: InterpreterError" in str(
            raised.value
        )
        assert isinstance(raised.value.__cause__, triton.runtime.errors.InterpreterError)


NAN_KERNELS = """
import os
import tunebook
from small_kernels import Replay, add_kernel

replay = Replay({16: 3.0, 32: 1.0, 64: 2.0})


def bench(kernel_call, quantiles=None):
    ms = replay(kernel_call, quantiles)
    return [float("nan")] * 3 if os.environ.get("TIMER_BROKEN") == "1" else ms


kernel = tunebook.autotune(
    tunebook.Space(BLOCK=[16, 32, 64]), key=["n"], do_bench=bench, pre_hook=replay.pre_hook,
    isolate=os.environ.get("ISOLATE") == "1",
)(add_kernel)
"""

NAN_PROGRAM = """
import json, os, warnings
import tunebook, nan_kernels
from small_kernels import grid_1d, vectors

if os.environ.get("OLD_BOOK") == "1":  # the NaNs a worker or a tunebook before this one recorded
    from tunebook._book import Entry, Result
    from tunebook._call import Call
    from tunebook._jsonio import key_text, stored_key

    k = nan_kernels.kernel
    x, y, out = vectors(300)
    key, candidates = k.key_and_candidates(Call.bind(k.arg_names, (x, y, out, 300), {}, grid_1d(300)))
    results = {
        k.config_index.id_of(c): Result(k.config_index.record_of(c), None, "no valid timing: [nan, nan, nan]")
        for c in candidates
    }
    k.page().record(key_text(key), Entry(key=stored_key(key), results=results))
x, y, out = vectors(300)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    nan_kernels.kernel[grid_1d(300)](x, y, out, 300)
assert (out == x + y).all()
said = [str(w.message) for w in caught if "none of the" in str(w.message)]
print(json.dumps({"best": nan_kernels.kernel.best_config.kwargs, "said": said, **tunebook.stats()}))
"""


@pytest.mark.parametrize("isolate", ["0", "1"], ids=["in-process", "isolate"])
def test_a_broken_timer_then_fixed_tunes_the_key_in_the_next_process_isolated_or_not(isolate, tmp_path):
    """Found by a review of today's changes: with isolate=True the parent recorded the worker's
    NaN timings, and every later call, in every process, raised TuningFailed (found no config
    that runs), also once the timer was fixed. Now the first config runs in their place, as
    in-process, and the next process with the timer fixed measures the key again."""
    (tmp_path / "nan_kernels.py").write_text(NAN_KERNELS)
    env = {"TUNEBOOK_DIR": str(tmp_path / "book"), "ISOLATE": isolate}
    broken = run_python(NAN_PROGRAM, env={**env, "TIMER_BROKEN": "1"}, cwd=tmp_path)
    assert broken["best"] == {"BLOCK": 16}  # the first config, in their place
    (said,) = broken["said"]
    assert "none of the 3 configs measured" in said and "no valid timing" in said
    assert "measures them again" in said and "cannot run here (recorded" not in said
    fixed = run_python(NAN_PROGRAM, env=env, cwd=tmp_path)
    assert fixed["best"] == {"BLOCK": 32} and fixed["benchmarked"] == 3 and fixed["said"] == []


def test_nan_timings_a_book_already_holds_are_measured_again_while_no_config_ran(tmp_path):
    """Found by a review of today's changes: a book written by a worker or an older tunebook
    holds a broken timer's NaNs; they were taken for the configs' failures (\"cannot run
    here\"), never measured again, and the first config was served for good."""
    (tmp_path / "nan_kernels.py").write_text(NAN_KERNELS)
    env = {"TUNEBOOK_DIR": str(tmp_path / "book"), "OLD_BOOK": "1"}
    later = run_python(NAN_PROGRAM, env=env, cwd=tmp_path)
    assert later["best"] == {"BLOCK": 32} and later["benchmarked"] == 3 and later["said"] == [], later
    assert all(r.ok for r in results(tmp_path / "book").values())
