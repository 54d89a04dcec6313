"""TUNEBOOK_MODE: tune (default), serve (never benchmark), off (no book); stats and printing."""

from __future__ import annotations

import logging

import pytest
import torch

import tunebook
from conftest import book_files
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors


def tuned_add(table=None):
    replay = Replay(table or {32: 3.0, 64: 1.0, 128: 2.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    return kernel, replay


def call(kernel, n: int, dtype=torch.float32) -> None:
    x, y, out = (t.to(dtype) for t in vectors(n))
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def test_serve_mode_never_benchmarks_and_uses_the_nearest_key(monkeypatch, caplog):
    near, far = Replay({32: 3.0, 64: 1.0, 128: 2.0}), Replay({32: 0.1, 64: 1.0, 128: 2.0})
    for replay, n in ((near, 1000), (far, 16)):
        kernel = tunebook.autotune(
            block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
        )(add_kernel)
        call(kernel, n)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel, replay = tuned_add()
    with caplog.at_level(logging.WARNING, logger="tunebook"):
        call(kernel, 900)  # log2 distance to 1000 is tiny, to 16 large
        call(kernel, 900)
    assert replay.measured == []
    assert kernel.best_config.kwargs == {"BLOCK": 64}  # the winner remembered for n=1000
    s = tunebook.stats()
    assert s["benchmarked"] == 0 and s["misses"] == 1 and s["fallbacks"] == 2 and s["hits"] == 0
    assert sum("not in the book" in r.message for r in caplog.records) == 1  # logged once per key
    call(kernel, 20)
    assert kernel.best_config.kwargs == {"BLOCK": 32}  # nearest is now n=16


def test_serve_mode_with_an_empty_book_serves_the_first_config(monkeypatch, book_dir):
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel, replay = tuned_add()
    call(kernel, 500)
    assert kernel.best_config.kwargs == {"BLOCK": 32}
    assert replay.measured == [] and tunebook.stats()["fallbacks"] == 1
    from tunebook import _misses
    from tunebook._book import read_document

    assert _misses.flush()
    (path,) = book_files(book_dir)  # the miss is recorded, with no result: nothing was measured
    (entry,) = read_document(path).entries.values()
    assert entry.misses == 1 and entry.results == {}


def test_serve_mode_does_not_match_keys_of_another_dtype(monkeypatch):
    kernel, _ = tuned_add({32: 3.0, 64: 1.0, 128: 2.0})
    call(kernel, 1000, torch.float64)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel, _ = tuned_add()
    call(kernel, 1000, torch.float32)
    assert kernel.best_config.kwargs == {"BLOCK": 32}  # no float32 entry: first config


def test_serve_mode_answers_remembered_keys_as_hits(monkeypatch):
    kernel, _ = tuned_add()
    call(kernel, 300)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    kernel, _ = tuned_add()
    call(kernel, 300)
    call(kernel, 300)
    s = tunebook.stats()
    assert s["hits"] == 2 and s["book_hits"] == 1 and s["fallbacks"] == 0 and s["misses"] == 0


def test_unknown_mode_is_a_clear_error_when_the_kernel_is_decorated(monkeypatch):
    # A server fails at start-up (decoration), not at its first request.
    monkeypatch.setenv("TUNEBOOK_MODE", "fast")
    with pytest.raises(tunebook.ConfigurationError, match=r"TUNEBOOK_MODE='fast'.*tune, serve, off"):
        tuned_add()


def test_unknown_mode_set_after_decoration_is_a_clear_error_at_the_call(monkeypatch):
    kernel, _ = tuned_add()
    monkeypatch.setenv("TUNEBOOK_MODE", "fast")
    with pytest.raises(ValueError, match=r"TUNEBOOK_MODE='fast'.*tune, serve, off"):
        call(kernel, 64)


def test_stats_count_hits_misses_and_tuning_time():
    kernel, _ = tuned_add()
    call(kernel, 100)
    for _ in range(5):
        call(kernel, 100)
    s = tunebook.stats()
    assert s["misses"] == 1 and s["benchmarked"] == 3 and s["hits"] == 5 and s["fallbacks"] == 0
    assert s["tuning_seconds"] > 0
    assert {"hits", "misses", "benchmarked", "fallbacks", "tuning_seconds"} <= set(s)


def test_a_tuning_that_raises_still_counts_its_time():
    # Every config fails for a reason in the call (a tensor argument is None): the error
    # reaches the caller, and the time it took is in tuning_seconds, of which the counters
    # compile_seconds and group_wait_seconds (added as they happen) are parts.
    kernel, _ = tuned_add()
    _, y, out = vectors(64)
    with pytest.raises(Exception):  # noqa: B017  (whatever the interpreter raises for None)
        kernel[grid_1d(64)](None, y, out, 64)
    s = tunebook.stats()
    assert s["misses"] == 1 and s["tuning_seconds"] > 0


def test_print_autotuning_reports_tuning_and_book_hits(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    kernel, _ = tuned_add()
    call(kernel, 100)
    out = capsys.readouterr().out
    assert "Triton autotuning for function add_kernel" in out
    assert "best config selected: BLOCK: 64" in out and "3 of 3 configs benchmarked" in out
    kernel, _ = tuned_add()
    call(kernel, 100)
    out = capsys.readouterr().out
    assert "remembered in the book" in out and "0 of 3 configs benchmarked" in out


def test_nothing_printed_by_default(capsys):
    kernel, _ = tuned_add()
    call(kernel, 100)
    assert capsys.readouterr().out == ""


def test_logger_is_quiet_by_default():
    logger = logging.getLogger("tunebook")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_a_finalizer_may_run_while_the_stats_lock_is_held():
    """Garbage collection can run an autotuner's finalizer (_retire) inside any allocation,
    also one made in register() while the counters' lock is held (seen hanging a test run)."""
    import threading

    from tunebook import _stats

    done = threading.Event()

    def inside_lock() -> None:
        with _stats._lock:
            _stats._retire([0], [0])
        done.set()

    threading.Thread(target=inside_lock, daemon=True).start()
    assert done.wait(5), "the stats lock is not reentrant: a finalizer would deadlock"


def test_the_tuning_log_counts_only_the_configs_the_kernel_declares(monkeypatch, capsys):
    """Results of configs the kernel no longer declares are not counted as remembered (issue
    10 item 11: "8/6 configs")."""
    from small_kernels import Replay, add_kernel, block_configs

    replay = Replay({16: 5.0, 32: 3.0, 64: 1.0, 128: 2.0, 256: 4.0})
    old = tunebook.autotune(
        block_configs(16, 32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )
    call(old(add_kernel), 100)
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    capsys.readouterr()
    new = tunebook.autotune(block_configs(64, 256), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)
    with pytest.warns(tunebook.BookWarning, match="3 results .* does not declare"):
        call(new(add_kernel), 100)
    out = capsys.readouterr().out
    assert "1 of 2 configs benchmarked now, 1 remembered in the book" in out, out


def test_a_books_results_for_undeclared_configs_are_ignored_with_one_warning():
    """Results for configs the kernel no longer declares are ignored, and the user is told once
    per kernel which kernel, how many results and why (issue 10 item 11: they were dropped
    silently)."""
    import warnings

    replay = Replay({16: 5.0, 32: 3.0, 64: 1.0, 128: 2.0})
    old = tunebook.autotune(
        block_configs(16, 32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    for n in (100, 200):
        call(old, n)
    new = tunebook.autotune(block_configs(64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
        add_kernel
    )
    measured = len(replay.measured)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (100, 200):
            call(new, n)
        for _ in range(3):
            call(new, 100)  # hits: nothing more to say
    said = [str(w.message) for w in caught if issubclass(w.category, tunebook.BookWarning)]
    assert len(said) == 1, said
    assert "add_kernel" in said[0] and "2 results" in said[0], said[0]
    assert "does not declare" in said[0] and "BLOCK=16" in said[0], said[0]
    assert len(replay.measured) == measured  # answered from the book, among declared configs only
    assert new.best_config.kwargs == {"BLOCK": 64}


def test_configs_a_space_declares_raise_no_undeclared_warning():
    """A Space's configs the call's arg constraints exclude are declared all the same: no warning."""
    import warnings

    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    every = tunebook.Space(BLOCK=[32, 64, 128])
    call(tunebook.autotune(every, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel), 100)
    small = tunebook.Space(BLOCK=[32, 64, 128], arg_constraints=[lambda c, a: c["BLOCK"] <= a["n"]])
    kernel = tunebook.autotune(small, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(kernel, 100)  # BLOCK=128 is the Space's, though not this call's: declared
    assert not [w for w in caught if issubclass(w.category, tunebook.BookWarning)]
    assert len(replay.measured) == 3


def test_a_read_only_books_search_answers_tune_mode_unless_the_kernel_sets_a_budget(tmp_path, monkeypatch):
    """A read-only book (an application's shipped answers) whose search stopped short of
    tunebook's default budget, run with a smaller one or converged, answers ``tune`` mode too:
    otherwise every new process would search its keys again at their first call. The same
    entry in the writable book is an unfinished search, and a kernel that declares a larger
    budget of its own searches on past the read-only book, into its own."""
    import shutil

    space = tunebook.Space(
        BLOCK=[16, 32, 64, 128, 256, 512, 1024], num_warps=[1, 2, 4, 8], num_stages=[1, 2, 3]
    )
    table = {16: 7.0, 32: 6.0, 64: 5.0, 128: 1.0, 256: 2.0, 512: 3.0, 1024: 4.0}

    def kernel(replay: Replay, **options):
        return tunebook.autotune(space, key=["n"], do_bench=replay, pre_hook=replay.pre_hook, **options)(
            add_kernel
        )

    shipped = tmp_path / "shipped"
    monkeypatch.setenv("TUNEBOOK_DIR", str(shipped))
    first = Replay(table)
    tuned = kernel(first, max_configs=6)  # 6 of the Space's 84: under the default's 64
    call(tuned, 1000)
    assert len(first.measured) == 6
    chosen = tuned.best_config.all_kwargs()
    writable_copy = tmp_path / "copy"
    shutil.copytree(shipped, writable_copy)

    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "local"))
    served = Replay(table)
    reader = kernel(served, books=[str(shipped)])
    call(reader, 1000)
    assert served.measured == [] and reader.best_config.all_kwargs() == chosen

    monkeypatch.setenv("TUNEBOOK_DIR", str(writable_copy))  # the same results, writable
    unfinished = Replay(table)
    call(kernel(unfinished), 1000)
    assert len(unfinished.measured) == 64 - 6

    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "local-2"))
    more = Replay(table)
    call(kernel(more, books=[str(shipped)], max_configs=10), 1000)
    assert len(more.measured) == 10 - 6


@pytest.mark.parametrize("name, value", [("TUNEBOOK_DISTRIBUTED", "ture"), ("TUNEBOOK_PROGRESS", "2")])
def test_a_yes_no_setting_it_cannot_read_is_a_clear_error(monkeypatch, name, value):
    # Read as 'no', a typo would leave a fleet's ranks tuning alone without a word.
    monkeypatch.setenv(name, value)
    with pytest.raises(tunebook.ConfigurationError, match=rf"{name}='{value}'.*expected one of 1, 0"):
        tuned_add()
    kernel, _ = (monkeypatch.delenv(name), tuned_add())[1]
    monkeypatch.setenv(name, value)
    with pytest.raises(tunebook.ConfigurationError, match=rf"{name}='{value}'"):
        call(kernel, 64)


@pytest.mark.parametrize("value", ["", "TRUE", " yes ", "off", "0"])
def test_yes_no_settings_read_the_usual_spellings(monkeypatch, value):
    monkeypatch.setenv("TUNEBOOK_DISTRIBUTED", value)
    monkeypatch.setenv("TUNEBOOK_PROGRESS", value)
    from tunebook import _settings

    assert _settings.distributed() is (value.strip().lower() in ("true", "yes"))
    assert _settings.progress() == {"": "auto", "TRUE": "1", " yes ": "1", "off": "0", "0": "0"}[value]
