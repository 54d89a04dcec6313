"""What a new user meets first (issue 9's core items): messages that fit, and where they point."""

from __future__ import annotations

import logging

import pytest
import torch

import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors


def test_print_autotuning_under_a_budget_says_what_nobody_measured(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    replay = Replay({16: 3.0, 32: 2.0, 64: 1.0})
    space = tunebook.Space(BLOCK=[16, 32, 64], num_warps=list(range(1, 23)))  # 66 configs
    kernel = tunebook.autotune(
        space, key=["n"], strategy="random", max_configs=6, do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    x, y, out = vectors(200)
    kernel[grid_1d(200)](x, y, out, 200)
    torch.testing.assert_close(out, x + y)
    printed = capsys.readouterr().out
    assert (
        "6 of 66 configs benchmarked now, 0 remembered in the book, 60 not measured "
        "(the budget of 6 configs)" in printed
    )
    assert "the rest remembered" not in printed


def test_print_autotuning_says_when_a_search_converged_short_of_its_budget(monkeypatch, capsys):
    """A neighbour search stops where nothing untried is near its best: fewer configs than
    the budget allows, and the line says why rather than blaming the budget."""
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    blocks = [16 << i for i in range(9)]
    replay = Replay({block: 1.0 + abs(i - 1) for i, block in enumerate(blocks)})  # best: BLOCK=32
    kernel = tunebook.autotune(
        tunebook.Space(BLOCK=blocks),
        key=["n"],
        strategy="neighbors",
        max_configs=8,
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )(add_kernel)
    x, y, out = vectors(200)
    kernel[grid_1d(200)](x, y, out, 200)
    torch.testing.assert_close(out, x + y)
    printed, progress = capsys.readouterr()
    assert "done (the search converged: no untried config near the best)" in progress.splitlines()[-1]
    measured = len(replay.measured)
    assert measured < 8 and "BLOCK: 32," in printed
    assert (
        f"{measured} of 9 configs benchmarked now, 0 remembered in the book, {9 - measured} not "
        "measured (the search converged: no untried config near the best)" in printed
    )


def test_a_book_warning_points_at_the_users_line_not_at_tunebook(book_dir):
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"], name="broken_book_kernel")(add_kernel)
    path = book_dir / kernel.identity().file_name
    book_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("{ not json")
    x, y, out = vectors(100)
    with pytest.warns(tunebook.BookWarning) as caught:
        kernel[grid_1d(100)](x, y, out, 100)
    assert caught[0].filename == __file__, caught[0].filename


def test_dir_of_the_package_shows_its_public_surface_only():
    names = dir(tunebook)
    assert "autotune" in names and "TunebookError" in names
    assert "annotations" not in names and "logging" not in names
    assert set(names) == set(tunebook.__all__)


def test_log_messages_name_the_kernel_by_its_name_option(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="tunebook")
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"], name="mylib.fused_add")(add_kernel)
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    messages = [r.getMessage() for r in caplog.records if r.name == "tunebook"]
    assert any("mylib.fused_add key" in m for m in messages), messages
    assert not any("add_kernel key" in m for m in messages)


def test_every_option_mistake_is_reported_at_decoration():
    for bad in (
        {"strategy": "fastest"},
        {"max_configs": 0},
        {"max_seconds": -1.0},
        {"check": {"rtl": 1}},
        {"isolate_timeout": 0},
        {"compile_workers": 0},
        {"fallback": 3},
        # Found by a misuse review: each of these failed at the first tuning with Python's own
        # error (never, in serve mode), or was taken silently (adaptive='no' is true).
        {"max_configs": 1.5},
        {"max_configs": "10"},
        {"max_seconds": "60"},
        {"isolate_timeout": None},
        {"check": "yes"},
        {"check": {"rtol": -1}},
        {"check": {"atol": "a"}},
        {"check": {"ignore": "out_ptr"}},
        {"check": {"max_bytes": 0.5}},
        {"check": {"rtol": {"fp16": 0.5}}},  # a tolerance for no dtype (review s41 M3)
        {"check": {"atol": {torch.int32: 1e-3}}},  # integers are compared exactly
        {"check": {"ignore": None}},  # was Python's TypeError (review s41 L3)
        {"check": {"max_bytes": 8e9 + 0.5}},  # not a whole number of bytes
        {"books": [None]},
        {"books": "/a/book"},
        {"name": 5},
        {"adaptive": "no"},
        {"isolate": 1},
        {"seed": "abc"},
    ):
        with pytest.raises(tunebook.ConfigurationError):
            tunebook.autotune(block_configs(32, 64), key=["n"], **bad)
    with pytest.raises(tunebook.ConfigurationError, match="check's ignore names 'out'"):
        tunebook.autotune(block_configs(32, 64), key=["n"], check={"ignore": ["out"]})(add_kernel)
    with pytest.raises(
        tunebook.ConfigurationError, match=r"^tunebook.autotune: check rtol is given for 'fp16'"
    ):
        tunebook.autotune(block_configs(32, 64), key=["n"], check={"rtol": {"fp16": 0.5}})
    with pytest.raises(
        tunebook.ConfigurationError, match=r"ignore names 'BLOCK', a meta-parameter \(tl.constexpr"
    ):
        tunebook.autotune(block_configs(32, 64), key=["n"], check={"ignore": ["BLOCK"]})(add_kernel)
    with pytest.raises(
        tunebook.ConfigurationError, match=r"check=\{'ignore': ...\} takes a list .* found None"
    ):
        tunebook.autotune(block_configs(32, 64), key=["n"], check={"ignore": None})


def test_check_takes_max_bytes_written_as_a_whole_float():
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"], check={"max_bytes": 8e9})(add_kernel)
    assert kernel.options.check == {"max_bytes": 8_000_000_000}
    assert type(kernel.options.check["max_bytes"]) is int


def test_one_name_given_as_a_string_is_that_name():
    """key='n' worked only because list('n') is ['n']; key='size' was read as four letters."""
    kernel = tunebook.autotune(block_configs(32, 64), key="n", reset_to_zero="out_ptr")(add_kernel)
    assert kernel.keys == ["n"] and kernel.reset_to_zero == ["out_ptr"]
    with pytest.raises(tunebook.ConfigurationError, match="restore_value names 'outs', which is not an arg"):
        tunebook.autotune(block_configs(32, 64), key="n", restore_value="outs")(add_kernel)


def test_bayes_without_optuna_is_reported_at_decoration_with_the_install_line(monkeypatch):
    monkeypatch.setattr("tunebook._optional.available", lambda module: module != "optuna")
    with pytest.raises(tunebook.MissingDependency, match=r"pip install 'tunebook\[optuna\]'"):
        tunebook.autotune(block_configs(32, 64), key=["n"], strategy="bayes")
    assert isinstance(tunebook.MissingDependency("x"), ImportError)


def test_a_served_key_follows_a_cache_entry_the_caller_writes(monkeypatch):
    replay = Replay({32: 3.0, 64: 1.0})
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
        add_kernel
    )
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)  # served (first config), not tuned
    (key,) = kernel.cache
    kernel.cache[key] = kernel.configs[1]
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    assert kernel.best_config is kernel.configs[1]
    assert replay.measured == []


def test_a_book_directory_that_is_a_file_is_named_as_such(tmp_path, monkeypatch):
    a_file = tmp_path / "book.json"
    a_file.write_text("{}")
    monkeypatch.setenv("TUNEBOOK_DIR", str(a_file))
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"])(add_kernel)
    x, y, out = vectors(100)
    with pytest.warns(tunebook.BookWarning, match="is a file, not a directory") as caught:
        kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    assert "Errno" not in str(caught[0].message)


def test_a_tensor_in_the_key_is_tuned_as_triton_tunes_it_and_never_written(book_dir):
    """Found by a misuse review: key=['n', 'x_ptr'] wrote a key file of the tensor's printed
    contents at every call (a key new at every call: a tensor compares by identity)."""
    replay = Replay({32: 3.0, 64: 1.0})
    kernel = tunebook.autotune(
        block_configs(32, 64), key=["n", "x_ptr"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    with pytest.warns(tunebook.BookWarning, match="key= names 'x_ptr', which this call passes a tensor"):
        for seed in (0, 1):
            x, y, out = vectors(100, seed)
            kernel[grid_1d(100)](x, y, out, 100)
            torch.testing.assert_close(out, x + y)
    assert replay.measured == [32, 64, 32, 64] and kernel.best_config.kwargs == {"BLOCK": 64}
    assert not [p for p in book_dir.rglob("*.json")]


def test_a_space_parameter_the_kernel_lacks_is_refused_at_decoration(book_dir):
    """Found by a search review: ``Space(BLOCKSIZE=...)`` for a kernel whose parameter is BLOCK
    was taken; Triton passed it to the kernel, which ignored it, and the search timed
    identical launches while BLOCK was never tuned."""
    import triton

    with pytest.raises(
        tunebook.ConfigurationError,
        match=r"Space parameter 'BLOCKSIZE' \(did you mean 'BLOCK'\?\) is not an argument of kernel "
        r"add_kernel\(x_ptr, y_ptr, out_ptr, n, BLOCK\)",
    ):
        tunebook.autotune(tunebook.Space(BLOCKSIZE=[16, 32], BLOCK=[64], num_warps=[2, 4]), key=["n"])(
            add_kernel
        )
    # A hook, a pruning function or a wrapper (triton.heuristics) may read such a name: said, not refused.
    replay = Replay({32: 2.0, 64: 1.0})
    with pytest.warns(tunebook.BookWarning, match=r"'SPLIT' is not an argument.*unless a hook"):
        hooked = tunebook.autotune(
            tunebook.Space(BLOCK=[32, 64], SPLIT=[1]), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
        )(add_kernel)
    x, y, out = vectors(300)
    hooked[grid_1d(300)](x, y, out, 300)
    assert hooked.best_config.kwargs == {"BLOCK": 64, "SPLIT": 1}
    heuristic = triton.heuristics({"BLOCK": lambda args: 64})(add_kernel)
    with pytest.warns(tunebook.BookWarning, match="'EXTRA' is not an argument"):
        tunebook.autotune(tunebook.Space(EXTRA=[1, 2]), key=["n"])(heuristic)
    # A config list (a library's, adopted by patch()) is said once, never refused.
    with pytest.warns(tunebook.BookWarning, match=r"config parameter 'BLOCKSIZE' \(did you mean 'BLOCK'\?\)"):
        tunebook.autotune([triton.Config({"BLOCKSIZE": 16}), triton.Config({"BLOCKSIZE": 32})], key=["n"])(
            add_kernel
        )
