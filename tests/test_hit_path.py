"""The hit path: what a call pays once its key is known, and that it serves what the slow path would.

The tables a hit reads live in one object (``tunebook._hits.HitTable``). These tests pin
them: after one miss the slow path is made to raise, and calls must still launch, with the
right output and ``best_config``; with the tables cleared the slow path must serve the very
same configs. The generated key and launcher functions are tested on their own.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton

import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook import _launch


def _slow_path_forbidden(kernel, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the slow path ran for a call the hit tables should serve")

    monkeypatch.setattr(kernel, "_slow_run", refuse)


def _table_kernel(table=None):
    replay = Replay(table or {32: 3.0, 64: 1.0, 128: 2.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    return kernel, replay


def test_after_one_miss_positional_calls_never_take_the_slow_path(monkeypatch):
    kernel, _ = _table_kernel()
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    _slow_path_forbidden(kernel, monkeypatch)
    for seed in range(3):
        x, y, out = vectors(300, seed=seed)
        kernel.best_config = None
        kernel[grid_1d(300)](x, y, out, 300)
        torch.testing.assert_close(out, x + y)
        assert kernel.best_config.kwargs == {"BLOCK": 64}
    assert tunebook.stats()["hits"] == 3


def test_after_one_keyword_miss_keyword_calls_never_take_the_slow_path(monkeypatch):
    kernel, _ = _table_kernel()
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out_ptr=out, n=300)
    _slow_path_forbidden(kernel, monkeypatch)
    for seed in range(3):
        x, y, out = vectors(300, seed=seed)
        kernel[grid_1d(300)](x, y, out_ptr=out, n=300)
        torch.testing.assert_close(out, x + y)
        assert kernel.best_config.kwargs == {"BLOCK": 64}


def test_the_positional_table_is_what_serves_positional_hits(monkeypatch):
    # Without the positional table the call must fall to run(), which still serves it from
    # the binding table; without both it must reach the slow path: the tables are what serve.
    kernel, _ = _table_kernel()
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    kernel._hits.by_position.clear()
    _slow_path_forbidden(kernel, monkeypatch)
    kernel[grid_1d(300)](x, y, out, 300)  # served by the binding table
    kernel._hits.by_binding.clear()
    with pytest.raises(AssertionError, match="slow path ran"):
        kernel[grid_1d(300)](x, y, out, 300)


def test_a_new_value_of_the_key_is_a_miss_again():
    kernel, replay = _table_kernel()
    for n in (300, 300, 500, 300, 500):
        x, y, out = vectors(n)
        kernel[grid_1d(n)](x, y, out, n)
        torch.testing.assert_close(out, x + y)
    assert sorted(replay.measured) == [32, 32, 64, 64, 128, 128]  # each key once (hints first)


def _bucketed_space_kernel():
    # The reproduction: within one bucket, calls allow different candidates.
    times = {32: 4.0, 64: 3.0, 256: 2.0, 1024: 1.0}
    replay = Replay(times)
    space = tunebook.Space(BLOCK=[32, 64, 256, 1024], arg_constraints=[lambda c, a: c["BLOCK"] <= a["n"]])
    kernel = tunebook.autotune(
        space, key=[tunebook.bucket("n", [128, 4096])], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    return kernel


def _served_block(kernel, n):
    x, y, out = vectors(n, seed=n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)
    return kernel.best_config.kwargs["BLOCK"]


def test_within_a_bucket_the_fast_and_the_slow_path_serve_the_same_config():
    kernel = _bucketed_space_kernel()
    fast = [_served_block(kernel, n) for n in (4000, 300, 4000, 300)]
    assert fast == [1024, 256, 1024, 256]
    kernel._hits.clear()  # every call now takes the slow path
    slow = [_served_block(kernel, n) for n in (4000, 300, 4000, 300)]
    assert slow == fast


def test_writing_cache_overrules_the_decision_as_in_triton():
    kernel, _ = _table_kernel()
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    key = next(iter(kernel.cache))
    assert kernel.cache[key].kwargs == {"BLOCK": 64}
    forced = kernel.configs[2]
    kernel.cache[key] = forced
    kernel[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    assert kernel.best_config is forced
    del kernel.cache[key]  # decided again, from the book: nothing is measured
    before = tunebook.stats()["benchmarked"]
    kernel[grid_1d(300)](x, y, out, 300)
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    assert tunebook.stats()["benchmarked"] == before


def test_a_missing_key_argument_is_named_before_tuning():
    kernel, replay = _table_kernel()
    x, y, out = vectors(300)
    with pytest.raises(TypeError, match=r"missing required argument 'n'") as info:
        kernel[grid_1d(300)](x, y, out)
    assert replay.measured == []
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_an_error_of_a_first_launch_chains_nothing():
    kernel, _ = _table_kernel()
    x, y, out = vectors(300)
    with pytest.raises(ValueError, match="Conflicting meta-parameters") as info:
        kernel[grid_1d(300)](x, y, out, 300, BLOCK=64)
    assert info.value.__context__ is None


# ------------------------------------------------------------ generated functions


def test_positional_key_reads_values_dtypes_and_classes_by_index():
    x = torch.zeros(4, dtype=torch.float16)
    key = _launch.positional_key(["x", "n", "scale"], ["n"], (x, 7, 0.5))
    assert key((x, 7, 0.5)) == (7, torch.float16, float)
    assert key((x.float(), 9, 0.5)) == (9, torch.float32, float)
    assert key((x, 7, None)) != key((x, 7, 0.5))  # None where a float was: another key
    with pytest.raises(IndexError):
        key((x, 7))  # another argument count
    with pytest.raises(AttributeError):
        key((3, 7, 0.5))  # a scalar where a tensor was


def test_positional_key_is_none_when_a_key_argument_is_passed_by_keyword():
    assert _launch.positional_key(["x", "n"], ["n"], (torch.zeros(1),)) is None


def test_binding_key_binds_positional_and_keyword_arguments_alike():
    x = torch.zeros(4, dtype=torch.float16)
    key = _launch.binding_key(["x", "n", "scale"], ["n"], (x,), {"n": 7, "scale": 0.5})
    assert key(x, 7, 0.5) == key(x, n=7, scale=0.5) == key(x=x, n=7, scale=0.5)
    assert key(x, 8, 0.5) != key(x, 7, 0.5)
    assert key(x, 7) != key(x, 7, 0.5)  # a missing argument keys as missing


def test_config_launcher_passes_meta_parameters_and_leaves_out_defaults():
    seen = []

    def run(*args, **kwargs):
        seen.append((args, kwargs))

    config = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3)
    launch = _launch.config_launcher(run, config.all_kwargs(), {"num_warps": 4, "num_ctas": 1})
    launch((1, 2), "GRID")
    ((args, kwargs),) = seen
    assert args == (1, 2)
    assert kwargs["grid"] == "GRID" and kwargs["warmup"] is False
    assert kwargs["BLOCK"] == 64 and kwargs["num_stages"] == 3
    assert "num_warps" not in kwargs  # equal to the backend's default: the JIT derives the same


def test_every_launch_of_a_config_passes_tritons_run_the_same_options_in_the_same_order(monkeypatch):
    # Triton keys its compiled kernels by the options as passed (str of the dict): a first
    # launch with num_ctas=1 and hits without it compiled each served key twice (1.8-3.6 ms
    # on the first hit of each pack op's key on an H200). Measuring, the first launch, the
    # positional and keyword hits and warmup must all pass one set, in one order.
    seen, params = [], {"BLOCK", *inspect.signature(add_kernel.fn).parameters}
    real = add_kernel.run

    def recording(*args, grid, warmup, **kwargs):
        options = [(k, v) for k, v in kwargs.items() if k not in params]  # the run's options, in order
        seen.append((kwargs.get("BLOCK"), warmup, options))
        return real(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(add_kernel, "run", recording)
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    configs = block_configs(32, 64, 128, num_warps=4, num_ctas=1, num_stages=2)
    kernel = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)  # measured, then launched by the slow path
    kernel[grid_1d(300)](x, y, out, 300)  # a positional hit
    kernel[grid_1d(300)](x, y, out_ptr=out, n=300)  # a keyword call
    # an option the config sets too: the config's wins, on the first call and the hits alike
    for _ in range(2):
        kernel[grid_1d(300)](x, y, out_ptr=out, n=300, num_ctas=2)
    warmed = hasattr(add_kernel, "warmup")  # Triton 3.4's interpreter has none
    if warmed:
        kernel.warmup(x, y, out, 300, grid=grid_1d(300))
    torch.testing.assert_close(out, x + y)
    winner = [(warmup, options) for block, warmup, options in seen if block == 64]
    assert len(winner) >= 6 + warmed  # timed, served first, hits, keyword calls (and warmed up)
    assert {str(options) for _, options in winner} == {str([("num_warps", 4), ("num_stages", 2)])}
    assert any(warmup for warmup, _ in winner) == warmed


def test_config_launcher_does_the_bookkeeping_of_a_hit_when_asked():
    seen = []

    class Owner:
        best_config = None

    owner, counter, config = Owner(), [0], triton.Config({"BLOCK": 64})
    launch = _launch.config_launcher(
        lambda *a, **k: seen.append(k["BLOCK"]), config.all_kwargs(), {}, served=(counter, owner, config)
    )
    launch((1,), "GRID")
    launch((1,), "GRID")
    assert seen == [64, 64] and counter == [2] and owner.best_config is config


def test_positional_getitem_inlines_the_key_of_positional_key_and_falls_back_to_slow():
    x = torch.zeros(4, dtype=torch.float16)
    names, keys = ["x", "n", "scale"], ["n"]
    table, slow_calls = {}, []

    def slow(*args, grid, warmup, **kwargs):
        slow_calls.append((args, grid, kwargs))
        return "slow"

    key = _launch.positional_key(names, keys, (x, 7, 0.5))
    table[key((x, 7, 0.5))] = lambda args, grid: ("hit", args, grid)
    getitem = _launch.positional_getitem(names, keys, (x, 7, 0.5), table, slow)
    assert getitem("G")(x, 7, 0.5) == ("hit", (x, 7, 0.5), "G")
    # Everything the key function refuses or does not know goes to slow(), with the grid.
    for args, kwargs in [((x, 8, 0.5), {}), ((x, 7), {}), ((3, 7, 0.5), {}), ((x, 7, 0.5), {"s": 1})]:
        assert getitem("G")(*args, **kwargs) == "slow"
    assert [c[1] for c in slow_calls] == ["G"] * 4 and slow_calls[-1][2] == {"s": 1}
    table.clear()  # cleared in place, as HitTable.clear does: the generated code sees it
    assert getitem("G")(x, 7, 0.5) == "slow"
    assert _launch.positional_getitem(["x", "n"], ["n"], (torch.zeros(1),), {}, slow) is None


def test_a_config_with_a_pre_hook_is_served_by_run_with_its_hook_on_every_hit(monkeypatch):
    calls = []
    configs = [triton.Config({"BLOCK": 64}, pre_hook=lambda nargs: calls.append(nargs["n"]))]
    configs.append(triton.Config({"BLOCK": 128}))
    replay = Replay({64: 1.0, 128: 2.0})
    kernel = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    assert kernel._hits.by_position == {}  # a hook needs the bound arguments: never the fast table
    _slow_path_forbidden(kernel, monkeypatch)
    before = len(calls)
    for _ in range(2):
        kernel[grid_1d(300)](x, y, out, 300)
        torch.testing.assert_close(out, x + y)
    assert len(calls) == before + 2 and kernel.best_config is configs[0]


def test_a_spaces_feasible_configs_are_listed_once_per_kernel_not_once_per_key(monkeypatch):
    # Listing a Space of thousands costs tens of ms; every first call of a key paid it,
    # in serve mode too. The arg constraints still see each call's own values.
    kernel = _bucketed_space_kernel()
    listed = []
    original = kernel.space.candidates
    monkeypatch.setattr(kernel.space, "candidates", lambda *a, **k: listed.append(k) or original(*a, **k))
    assert [_served_block(kernel, n) for n in (4000, 300, 100, 40)] == [1024, 256, 64, 32]
    assert len(listed) == 1 and listed[0].get("args") is None


def test_serve_mode_answers_a_book_key_from_its_results_without_listing_the_space(monkeypatch):
    # A fresh server's first request meets dozens of keys, and listing a Space of thousands
    # for each cost most of its first token (issue 14). In serve mode a key whose book entry
    # holds a choice this call allows is decided from the entry's results alone; where the
    # choice is not allowed (n=300 allows BLOCK <= 300 only) the full path decides. Both
    # serve what the full path serves.
    from tunebook import _miss

    tuned = _bucketed_space_kernel()
    assert [_served_block(tuned, n) for n in (4000, 300)] == [1024, 256]  # tune mode: in the book
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    fresh = _bucketed_space_kernel()  # as in a new process: nothing decided, the book on disk
    listed = []
    original = fresh.space.candidates
    monkeypatch.setattr(fresh.space, "candidates", lambda *a, **k: listed.append(1) or original(*a, **k))
    served = [_served_block(fresh, n) for n in (4000, 3000)]
    assert served == [1024, 1024] and listed == []  # answered without listing the Space
    served.append(_served_block(fresh, 300))
    assert served[-1] == 256 and listed == [1]  # the choice is not allowed: the full path
    # one answer per key and allowed set (n=4000 and n=3000 allow the same), none served blind
    assert tunebook.stats()["book_hits"] == 2 and tunebook.stats()["fallbacks"] == 0

    monkeypatch.setattr(_miss, "book_choice", lambda *args: None)  # the full path only
    full = _bucketed_space_kernel()
    assert [_served_block(full, n) for n in (4000, 3000, 300)] == served


@pytest.mark.parametrize("book_path", [True, False], ids=["book-path", "full-path"])
def test_serve_mode_never_serves_a_result_measured_with_options_the_space_does_not_launch(
    monkeypatch, book_path
):
    # An earlier version of the app tuned a list with num_warps=8 (the kernel's source, and
    # so its page, unchanged); the Space it declares now launches Triton's default warps. The
    # stored winner was never measured as the Space launches it: neither path may serve it
    # as a book hit, and both serve the same config.
    from tunebook import _miss

    replay = Replay({32: 2.0, 64: 1.0})
    earlier = [triton.Config({"BLOCK": 64}, num_warps=8), triton.Config({"BLOCK": 32}, num_warps=4)]
    old = tunebook.autotune(earlier, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
    assert _served_block(old, 300) == 64 and old.best_config.num_warps == 8
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    if not book_path:
        monkeypatch.setattr(_miss, "book_choice", lambda *args: None)
    tunebook.reset_stats()
    now = tunebook.autotune(
        tunebook.Space(BLOCK=[32, 64]), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)
    assert _served_block(now, 300) == 32  # the one stored result the Space launches as measured
    assert now.best_config.num_warps == 4
    assert tunebook.stats()["book_hits"] == 0 and tunebook.stats()["fallbacks"] == 1


def test_serve_mode_answers_from_the_book_for_a_space_that_lists_none_for_an_option(monkeypatch):
    # maxnreg=None is Triton's default, which a stored config leaves out: the book's answer
    # must still be found (it once raised KeyError into the kernel call).
    replay = Replay({32: 2.0, 64: 1.0})

    def make():
        space = tunebook.Space(BLOCK=[32, 64], maxnreg=[None])
        return tunebook.autotune(space, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)

    assert _served_block(make(), 300) == 64
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    assert _served_block(make(), 300) == 64
    assert tunebook.stats()["book_hits"] == 1 and tunebook.stats()["fallbacks"] == 0
