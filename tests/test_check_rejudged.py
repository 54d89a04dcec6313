"""Wrong results under ``check=`` are verdicts that hold while what they were judged under
does: a key is judged again when the reference config, the tolerances, ``ignore`` or
``check=`` itself change, and only then. Each step of a sequence runs in a new process on one
book, as a user who fixes the kernel's options and runs the program again does."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import tunebook
from conftest import run_python
from small_kernels import grid_1d
from tunebook._book import Entry, Result
from tunebook._failures import Judging, judged_under, stale_verdicts

# add_wrong_at_128_kernel computes x - y at BLOCK=128 and x + y otherwise; the wrong config
# is the fastest, so that only the check keeps it from winning.
WRONG_AT_128 = """
import json, os, warnings
import torch, triton, tunebook
from small_kernels import Replay, add_wrong_at_128_kernel, grid_1d, vectors

replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
configs = [triton.Config({"BLOCK": b}) for b in json.loads(os.environ["BLOCKS"])]
kernel = tunebook.autotune(
    configs, key=["n"], check=json.loads(os.environ["CHECK"]), do_bench=replay, pre_hook=replay.pre_hook
)(add_wrong_at_128_kernel)
x, y, out = vectors(300)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernel[grid_1d(300)](x, y, out, 300)
"""
REPORT = """
page = kernel.page()
entry = page.get(next(iter(page.key_names())))
print(json.dumps({
    "benchmarked": tunebook.stats()["benchmarked"],
    "best": kernel.best_config.kwargs["BLOCK"],
    "correct": bool(torch.allclose(out, EXPECTED)),
    "results": {str(r.config["kwargs"]["BLOCK"]): r.error or "ok" for r in entry.results.values()},
    "warnings": [str(w.message) for w in caught],
}))
"""

# On a GPU a float atomic reduction differs from run to run; here every launch of every
# config adds another noise (a config pre_hook), which the check sees through out_ptr.
NOISY_MODULE = """
import itertools
import triton
import triton.language as tl

counter = itertools.count()


def noise(nargs):
    nargs["noise_ptr"].fill_(next(counter) * 1e-2)


@triton.jit
def add_noise_kernel(x_ptr, noise_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(noise_ptr), mask=mask)
"""
NOISY = """
import json, os, warnings
import torch, triton, tunebook
from small_kernels import grid_1d
import noisykern

configs = [triton.Config({"BLOCK": b}, pre_hook=noisykern.noise) for b in (32, 64, 128)]
check = json.loads(os.environ["CHECK"])
kernel = tunebook.autotune(configs, key=["n"], check=check)(noisykern.add_noise_kernel)
x, noise, out = torch.ones(100), torch.zeros(1), torch.empty(100)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernel[grid_1d(100)](x, noise, out, 100)
"""


def wrong_at_128(blocks: list[int], check: Any, book: Path | None = None) -> dict[str, Any]:
    """One process calling add_wrong_at_128_kernel over ``blocks`` (in that order) with ``check``,
    on ``book`` (default: the test's TUNEBOOK_DIR)."""
    code = WRONG_AT_128 + "EXPECTED = x + y\n" + REPORT
    env = {"BLOCKS": json.dumps(blocks), "CHECK": json.dumps(check)}
    return run_python(code, env=env | ({"TUNEBOOK_DIR": str(book)} if book else {}))


def noisy(directory: Path, check: Any) -> dict[str, Any]:
    code = NOISY + "EXPECTED = out\n" + REPORT
    return run_python(code, cwd=directory, env={"CHECK": json.dumps(check)})


def doubts(report: dict[str, Any]) -> list[str]:
    return [w for w in report["warnings"] if "may itself be wrong" in w]


def test_putting_a_trusted_config_first_judges_the_key_again(book_dir: Path) -> None:
    # The buggy config first: it is the reference, and the correct ones are its wrong results.
    first = wrong_at_128([128, 64, 32], True)
    assert first["best"] == 128 and not first["correct"]
    assert first["results"]["64"].startswith("WrongResult: wrong result: out_ptr differs")
    assert first["results"]["64"].endswith("]") and "[checked against BLOCK=128|" in first["results"]["64"]
    (doubt,) = doubts(first)
    assert "the 2 other configs checked against the reference config BLOCK=128|" in doubt
    assert "put a config you trust first" in doubt.lower()

    again = wrong_at_128([128, 64, 32], True)  # the same order and settings: nothing measured
    assert again["benchmarked"] == 0 and again["best"] == 128 and not doubts(again)

    # The docs' remedy: a config the user trusts first. Every candidate is judged again.
    fixed = wrong_at_128([64, 32, 128], True)
    assert fixed["benchmarked"] == 3
    assert fixed["correct"] and fixed["best"] == 64
    assert fixed["results"]["64"] == fixed["results"]["32"] == "ok"
    assert "[checked against BLOCK=64|" in fixed["results"]["128"]
    assert not doubts(fixed)  # one config disagreed: the reference is not in doubt

    assert wrong_at_128([64, 32, 128], True)["benchmarked"] == 0

    # check= off: the verdicts no longer hold, and the key is measured unchecked.
    unchecked = wrong_at_128([64, 32, 128], False)
    assert unchecked["benchmarked"] == 3 and set(unchecked["results"].values()) == {"ok"}
    assert wrong_at_128([64, 32, 128], False)["benchmarked"] == 0


def test_other_tolerances_judge_the_key_again_and_max_bytes_does_not(book_dir: Path) -> None:
    first = wrong_at_128([128, 64, 32], True)
    assert first["results"]["32"].startswith("WrongResult:")
    # max_bytes refuses a call but judges no config: not a reason to measure again.
    assert wrong_at_128([128, 64, 32], {"max_bytes": 1 << 30})["benchmarked"] == 0
    loose = wrong_at_128([128, 64, 32], {"rtol": 10.0, "atol": 10.0})
    assert loose["benchmarked"] == 3 and set(loose["results"].values()) == {"ok"}
    assert loose["best"] == 128  # so loose that the wrong config passes: what was asked
    assert wrong_at_128([128, 64, 32], {"rtol": 10.0, "atol": 10.0})["benchmarked"] == 0


def test_a_nondeterministic_kernel_is_fixed_by_a_looser_tolerance(book_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "noisykern.py").write_text(NOISY_MODULE)
    strict = noisy(tmp_path, {"ignore": ["noise_ptr"]})
    assert strict["benchmarked"] == 3
    assert all(error.startswith("WrongResult:") for error in strict["results"].values())
    (none_ran,) = [w for w in strict["warnings"] if "none of the 3 configs measured ran" in w]
    assert "3 computed a different result (check=) from the reference config BLOCK=32|" in none_ran
    assert "differed even from its own first run" in none_ran
    assert "rtol/atol" in none_ran and "smaller blocks" not in none_ran

    assert noisy(tmp_path, {"ignore": ["noise_ptr"]})["benchmarked"] == 0  # the same settings

    loose = noisy(tmp_path, {"ignore": ["noise_ptr"], "rtol": 0.5, "atol": 0.5})
    assert loose["benchmarked"] == 3 and set(loose["results"].values()) == {"ok"}
    assert not [w for w in loose["warnings"] if "none of the" in w]


ISOLATED_MODULE = """
import triton, tunebook
from small_kernels import Replay, add_wrong_at_128_kernel

replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
configs = [triton.Config({"BLOCK": b}) for b in (128, 64, 32)]
add = tunebook.autotune(
    configs, key=["n"], check=True, isolate=True, do_bench=replay, pre_hook=replay.pre_hook
)(add_wrong_at_128_kernel)
"""
ISOLATED = """
import json, warnings
import tunebook
from small_kernels import grid_1d, vectors
import isolatedkern

x, y, out = vectors(300)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    isolatedkern.add[grid_1d(300)](x, y, out, 300)
said = [str(w.message) for w in caught]
print(json.dumps({"benchmarked": tunebook.stats()["benchmarked"], "warnings": said}))
"""


def test_a_doubted_reference_is_said_in_the_process_that_tuned_the_key_in_a_worker(
    book_dir: Path, tmp_path: Path
) -> None:
    """isolate=True: the key is tuned in a worker process, whose warnings go to a stderr
    nobody reads; the caller says it from the results the worker reports."""
    (tmp_path / "isolatedkern.py").write_text(ISOLATED_MODULE)
    first = run_python(ISOLATED, cwd=tmp_path)
    assert first["benchmarked"] == 3
    (doubt,) = doubts(first)
    assert "the 2 other configs checked against the reference config BLOCK=128|" in doubt
    again = run_python(ISOLATED, cwd=tmp_path)  # answered from the book: nothing measured, nothing said
    assert again["benchmarked"] == 0 and not doubts(again)


ISOLATED_NOISY = """
import json, warnings
import torch, tunebook
from small_kernels import grid_1d
import noisykern
import isolatednoisy

x, noise, out = torch.ones(100), torch.zeros(1), torch.empty(100)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    isolatednoisy.add[grid_1d(100)](x, noise, out, 100)
print(json.dumps({"warnings": [str(w.message) for w in caught]}))
"""


def test_a_worker_whose_every_config_computed_a_wrong_result_is_told_the_checks_fix(
    book_dir: Path, tmp_path: Path
) -> None:
    """isolate=True, a kernel whose every run differs: the caller's warning said all of them
    "cannot run here", the device's fix; they ran, and their fix is check='s."""
    (tmp_path / "noisykern.py").write_text(NOISY_MODULE)
    (tmp_path / "isolatednoisy.py").write_text(
        "import triton, tunebook, noisykern\n"
        "configs = [triton.Config({'BLOCK': b}, pre_hook=noisykern.noise) for b in (32, 64, 128)]\n"
        "add = tunebook.autotune(configs, key=['n'], check={'ignore': ['noise_ptr']}, isolate=True)"
        "(noisykern.add_noise_kernel)\n"
    )
    report = run_python(ISOLATED_NOISY, cwd=tmp_path)
    (said,) = [w for w in report["warnings"] if "worker process ran" in w]
    assert "3 computed a different result (check=)" in said and "rtol/atol" in said
    assert "the rest cannot run here" in said


OTHER_KEY_MODULE = """
import triton, triton.language as tl, tunebook
from small_kernels import Replay


@triton.jit
def kern(x_ptr, out_ptr, n, N: tl.constexpr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK <= N)  # BLOCK=64 cannot run for N=32 (as out of resources), can for 128
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(out_ptr + offs, x - 1 if BLOCK == 16 else x + 1, mask=m)  # BLOCK=16 is wrong


replay = Replay({64: 1.0, 32: 2.0, 16: 0.5})
k = tunebook.autotune([triton.Config({"BLOCK": b}) for b in (64, 32, 16)], key=["N"], check=True,
                      do_bench=replay, pre_hook=replay.pre_hook)(kern)
"""
OTHER_KEY = """
import json, os, torch, triton, tunebook
import otherkey

for N in json.loads(os.environ["KEYS"]):
    x, out = torch.randn(N), torch.empty(N)
    otherkey.k[lambda m, N=N: (triton.cdiv(N, m["BLOCK"]),)](x, out, N, N=N)
print(json.dumps({"misses": tunebook.stats()["misses"], "benchmarked": tunebook.stats()["benchmarked"]}))
"""


def test_a_config_that_cannot_run_for_another_key_is_this_keys_reference_where_it_runs(
    book_dir: Path, tmp_path: Path
) -> None:
    """BLOCK=64, first, cannot run for N=32 and runs for N=128. The reference search tried a
    config that could not run for another key last, so N=128 was judged against 32, while
    the re-judge rule predicted 64 from N=128's results: every process then missed N=128
    and ran its reference again. Whether it is demoted also hung on which keys a process
    had read."""
    (tmp_path / "otherkey.py").write_text(OTHER_KEY_MODULE)
    first = run_python(OTHER_KEY, cwd=tmp_path, env={"KEYS": "[32, 128]"})
    assert first["misses"] == 2
    for keys in ("[32, 128]", "[128]"):
        again = run_python(OTHER_KEY, cwd=tmp_path, env={"KEYS": keys})
        assert (again["misses"], again["benchmarked"]) == (0, 0), (keys, again)


# ----------------------------------------------------------------- in one process


_noise = itertools.count()


def _noise_hook(nargs: dict[str, Any]) -> None:
    nargs["noise_ptr"].fill_(next(_noise) * 1e-2)


@triton.jit
def _noisy_or_too_large_kernel(x_ptr, noise_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + noise; BLOCK=256 cannot run (a failed static assert, as out of resources)."""
    tl.static_assert(BLOCK <= 128)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(noise_ptr), mask=mask)


def test_when_no_config_runs_wrong_results_and_unrunnable_configs_are_told_apart() -> None:
    configs = [triton.Config({"BLOCK": b}, pre_hook=_noise_hook) for b in (32, 64, 256)]
    check = {"ignore": ["noise_ptr"]}
    kernel = tunebook.autotune(configs, key=["n"], check=check)(_noisy_or_too_large_kernel)
    x, noise, out = torch.ones(100), torch.zeros(1), torch.empty(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel[grid_1d(100)](x, noise, out, 100)
    (said,) = [str(w.message) for w in caught if "none of the 3 configs measured ran" in str(w.message)]
    assert "2 computed a different result (check=) from the reference config BLOCK=32|" in said
    assert "loosen check='s rtol/atol" in said.lower() and "check={'ignore'" in said
    assert "1 cannot run here (recorded in the book): add configs this device can run (smaller blocks" in said


# ----------------------------------------------------------------- the rule's pieces

OK = Result({"kwargs": {}}, (1.0, 1.0, 1.0), at="2026-01-01T00:00:00.000000Z")


def wrong(reference: str, settings: str, at: str = "2026-01-02T00:00:00.000000Z") -> Result:
    error = "WrongResult: " + Judging(reference, settings).tag("wrong result: out differs")
    return Result({"kwargs": {}}, None, error, at)


def test_a_wrong_result_of_an_older_tunebook_is_left_alone() -> None:
    untagged = Result({"kwargs": {}}, None, "WrongResult: wrong result: out differs")
    assert judged_under(untagged) is None
    results = {"a": OK, "b": untagged}
    for check in (None, {}, {"rtol": 1.0}):
        assert not stale_verdicts(results, ["b", "a"], check)


def test_a_long_reason_keeps_its_tag_whole() -> None:
    judging = Judging("BLOCK=16|num_warps=4", "0123456789ab")
    text = "WrongResult: " + judging.tag("x" * 5000)
    assert len(text) <= 2000 and judged_under(Result({}, None, text)) == judging


def test_the_verdicts_of_a_key_judged_again_replace_the_old_ones_in_the_book() -> None:
    base = Entry(key=(1,), results={"a": OK, "b": wrong("a", "h1")}, chosen="a")
    # Judged again against "b": its verdict on "a" and its "b" replace the book's.
    news = Entry(key=(1,), results={"a": wrong("b", "h1"), "b": OK}, reopens="a")
    merged = news.merged_over(base)
    assert merged.results["a"].error == news.results["a"].error and merged.results["b"].ok
    # An older verdict met later (a lower layer of the book, a slow writer) does not.
    old = Entry(key=(1,), results={"a": wrong("c", "h0", at="2025-01-01T00:00:00.000000Z")})
    assert old.merged_over(Entry(key=(1,), results={"a": wrong("b", "h1")})).results["a"] == wrong("b", "h1")
    # Nor does an ordinary writer's over a decided key.
    late = Entry(key=(1,), results={"a": wrong("b", "h1")})
    assert late.merged_over(base).results["a"] is OK


def test_a_merge_keeps_a_wrong_result_over_another_books_success(book_dir: Path, tmp_path: Path) -> None:
    """A wrong result is a verdict about a run that succeeded: merged with a book tuned without
    check=, where the buggy config ran and won, it stands and the right config is served."""
    from click.testing import CliRunner

    from tunebook.cli._app import cli

    checked = wrong_at_128([64, 32, 128], True)
    assert checked["best"] == 64 and checked["results"]["128"].startswith("WrongResult")
    unchecked = tmp_path / "unchecked"
    assert wrong_at_128([64, 32, 128], False, unchecked)["best"] == 128
    merged = tmp_path / "merged"
    for books in ((book_dir, unchecked), (unchecked, book_dir)):
        res = CliRunner().invoke(cli, ["merge", *map(str, books), "-o", str(merged)])
        assert res.exit_code == 0, res.output
    served = wrong_at_128([64, 32, 128], True, merged)
    assert served["benchmarked"] == 0 and served["best"] == 64 and served["correct"]
    assert served["results"]["128"] == checked["results"]["128"]


def test_a_merge_ranks_wrong_results_first_and_never_chooses_one() -> None:
    from tunebook.cli.merge import merge_entries

    untagged = Result({"kwargs": {}}, None, "WrongResult: wrong result: out differs")
    oom = Result({"kwargs": {}}, None, "OutOfResources: shared memory")
    against_a, against_b = wrong("a", "h1"), wrong("b", "h1")
    checked = Entry(key=(1,), results={"a": OK, "b": against_a, "c": untagged, "d": OK}, chosen="a")
    # Another book: "b" its reference (ok), "a" and "c" judged against it, "d" out of memory.
    other = Entry(key=(1,), results={"a": against_b, "b": OK, "c": against_b, "d": oom}, chosen="b")
    for x, y in ((checked, other), (other, checked)):
        merged = merge_entries(x, y)
        # Every verdict stands (a tagged one over an older tunebook's), the success over the failure.
        assert merged.results == {"a": against_b, "b": against_a, "c": against_b, "d": OK}
        assert merged.chosen == ""  # both books' choices are wrong results
        assert stale_verdicts(merged.results, ["a", "b", "c", "d"], {})  # judged again, either order
        assert stale_verdicts(merged.results, ["b", "a", "c", "d"], {})
    assert merge_entries(replace(checked, chosen="d"), other).chosen == "d"


@pytest.mark.parametrize(
    ("check", "order", "stale"),
    [
        ({}, ["a", "b"], False),  # as judged
        ({"max_bytes": 1 << 20}, ["a", "b"], False),
        ({"rtol": 0.5}, ["a", "b"], True),
        ({"ignore": ["out"]}, ["a", "b"], True),
        (None, ["a", "b"], True),  # check= off
        ({}, ["b", "a"], True),  # another reference
        ({}, ["new", "a", "b"], True),  # a config put first, never measured
    ],
)
def test_which_changes_judge_a_key_again(check: dict[str, Any] | None, order: list[str], stale: bool) -> None:
    from tunebook._failures import settings_hash

    results = {"a": OK, "b": wrong("a", settings_hash({}) or "")}
    assert stale_verdicts(results, order, check) is stale


# add_wrong_at_128_kernel over BLOCK=128 (buggy) and eight correct configs, in ORDER, under a
# budget of 3 with the random strategy: the first config may run only as the reference.
BUDGETED = """
import json, os, warnings
import torch, triton, tunebook
from small_kernels import Replay, add_wrong_at_128_kernel, grid_1d, vectors

replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
good = [triton.Config({"BLOCK": b}, num_warps=w) for b in (32, 64) for w in (1, 2, 4, 8)]
bad = [triton.Config({"BLOCK": 128}, num_warps=1)]
configs = bad + good if os.environ["ORDER"] == "buggy_first" else good + bad
kernel = tunebook.autotune(
    configs, key=["n"], check=True, do_bench=replay, pre_hook=replay.pre_hook,
    max_configs=3, strategy="random", seed=0,
)(add_wrong_at_128_kernel)
x, y, out = vectors(300)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernel[grid_1d(300)](x, y, out, 300)
page = kernel.page()
entry = page.get(next(iter(page.key_names())))
print(json.dumps({
    "benchmarked": tunebook.stats()["benchmarked"],
    "sum": bool(torch.allclose(out, x + y)), "difference": bool(torch.allclose(out, x - y)),
    "results": {cid: r.error or "ok" for cid, r in entry.results.items()},
    "warnings": [str(w.message) for w in caught],
}))
"""


def budgeted(order: str) -> dict[str, Any]:
    return run_python(BUDGETED, env={"ORDER": order})


def test_a_doubted_reference_that_was_never_measured_is_said_and_the_call_runs(book_dir: Path) -> None:
    first = budgeted("buggy_first")
    # The reference (BLOCK=128) ran only as the reference: the measured configs all disagreed.
    assert not any(cid.startswith("BLOCK=128") for cid in first["results"])
    (doubt,) = doubts(first)
    assert "the reference config BLOCK=128|" in doubt
    # None measured ran: the first config is launched in their place, as the docs say.
    assert first["difference"]
    again = budgeted("buggy_first")
    assert again["benchmarked"] == 0 and again["difference"]


def test_a_budgeted_search_judging_the_key_again_settles(book_dir: Path) -> None:
    budgeted("buggy_first")
    fixed = budgeted("trusted_first")  # judged again: at most 3 configs measured
    assert fixed["benchmarked"] == 3 and fixed["sum"]
    assert budgeted("trusted_first")["benchmarked"] == 0
    assert budgeted("trusted_first")["benchmarked"] == 0


TOO_LARGE_MODULE = """
import triton
import triton.language as tl


@triton.jit
def add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK <= 64)  # as a config out of resources on a GPU
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)
"""
# 20 configs that cannot run, then 20 that can, under a budget of 3; DIE=1 ends the process at
# its first timing, after the reference search, as a killed tuning does.
TOO_LARGE_FIRST = """
import json, os
import torch, triton, tunebook
import toolargekern

def bench(fn, quantiles=None):
    if os.environ.get("DIE") == "1":
        os._exit(3)
    fn()
    return [1.0, 0.99, 1.01]

configs = [triton.Config({"BLOCK": 128 * (i + 1)}) for i in range(20)] + [
    triton.Config({"BLOCK": 16}, num_warps=w, num_stages=s) for w in (1, 2, 4, 8) for s in range(1, 6)
]
kernel = tunebook.autotune(
    configs, key=["n"], check=True, do_bench=bench, max_configs=3, strategy="random", seed=0
)(toolargekern.add_one_kernel)
x, out = torch.randn(100), torch.empty(100)
kernel[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, out, 100)
print(json.dumps({"benchmarked": tunebook.stats()["benchmarked"], "best": kernel.best_config.kwargs["BLOCK"],
                  "correct": bool(torch.allclose(out, x + 1))}))
"""


def test_a_tuning_killed_after_the_reference_search_is_resumed_within_its_budget(
    book_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "toolargekern.py").write_text(TOO_LARGE_MODULE)
    with pytest.raises(Exception):  # noqa: B017 - the child exits before it prints
        run_python(TOO_LARGE_FIRST, cwd=tmp_path, env={"DIE": "1"})
    # The 20 failures the reference search recorded were chosen by no search: not counted.
    resumed = run_python(TOO_LARGE_FIRST, cwd=tmp_path)
    assert resumed["benchmarked"] == 3 and resumed["best"] == 16 and resumed["correct"]
    assert run_python(TOO_LARGE_FIRST, cwd=tmp_path)["benchmarked"] == 0
