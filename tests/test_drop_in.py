"""tunebook.autotune accepts everything triton.autotune accepts and behaves the same.

Every test runs real kernels in Triton's CPU interpreter and checks their output.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import tunebook
from conftest import book_files
from small_kernels import (
    Replay,
    accumulate_kernel,
    add_kernel,
    block_configs,
    grid_1d,
    matmul_kernel,
    sum_kernel,
    vectors,
)


def make_add(configs=None, **options):
    return tunebook.autotune(configs or block_configs(32, 64, 128), key=["n"], **options)(add_kernel)


def test_tunes_runs_and_exposes_triton_attributes():
    kernel = make_add()
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    key = (300, "torch.float32", "torch.float32", "torch.float32")
    assert list(kernel.cache) == [key]
    assert kernel.best_config is kernel.cache[key]
    assert kernel.best_config in kernel.configs
    assert set(kernel.configs_timings) == set(kernel.configs)
    assert all(len(t) == 3 and t[0] > 0 for t in kernel.configs_timings.values())
    assert kernel.bench_time > 0
    assert kernel.keys == ["n"] and kernel.arg_names == ["x_ptr", "y_ptr", "out_ptr", "n", "BLOCK"]
    assert tunebook.stats()["benchmarked"] == 3


def test_key_is_tritons_key_and_dtype_changes_retune():
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(200)
    kernel[grid_1d(200)](x, y, out, 200)
    kernel[grid_1d(200)](x, y, out, 200)  # same key: no benchmarking
    assert replay.measured == [32, 64, 128]
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    xd, yd, od = x.double(), y.double(), out.double()
    kernel[grid_1d(200)](xd, yd, od, 200)  # new dtype -> new key, as in Triton
    torch.testing.assert_close(od, xd + yd)
    assert len(replay.measured) == 6
    assert (200, "torch.float64", "torch.float64", "torch.float64") in kernel.cache
    kernel[grid_1d(201)](x, y, out, 201)
    assert len(kernel.cache) == 3


def test_grid_tuple_and_keyword_arguments():
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(256)
    kernel[(4,)](x, y, out_ptr=out, n=256)  # a tuple grid: 4 programs of BLOCK=64 cover 256
    assert kernel.best_config.kwargs == {"BLOCK": 64}
    torch.testing.assert_close(out, x + y)
    out2 = torch.empty_like(out)
    kernel[grid_1d(256)](x_ptr=x, y_ptr=y, out_ptr=out2, n=256)  # all keywords: same key, a hit
    torch.testing.assert_close(out2, x + y)
    assert len(kernel.cache) == 1


def test_config_option_fields_are_passed_through(monkeypatch):
    # The interpreter ignores num_warps and num_stages, so the output cannot tell: look at
    # what reaches the launch, while tuning and on hits.
    launched = []
    real_run = add_kernel.run

    def recording_run(*args, **kwargs):
        launched.append((kwargs["BLOCK"], kwargs.get("num_warps"), kwargs.get("num_stages")))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(add_kernel, "run", recording_run)
    configs = [
        triton.Config({"BLOCK": 64}, num_warps=2, num_stages=2),
        triton.Config({"BLOCK": 32}, num_warps=8, num_stages=5),
    ]
    replay = Replay({64: 1.0, 32: 2.0})
    kernel = make_add(configs, do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    assert {(64, 2, 2), (32, 8, 5)} <= set(launched)  # both measured with their own options
    launched.clear()
    kernel[grid_1d(100)](x, y, out, 100)  # a hit
    assert launched == [(64, 2, 2)]


def test_single_config_never_benchmarks():
    kernel = make_add(block_configs(64))
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    assert tunebook.stats()["benchmarked"] == 0
    assert kernel.best_config.kwargs == {"BLOCK": 64}


def test_no_configs_means_default_config():
    kernel = tunebook.autotune([], key=["n"])(triton.heuristics({"BLOCK": lambda args: 128})(add_kernel))
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)


def test_unknown_key_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'size'.*add_kernel\(x_ptr, y_ptr, out_ptr, n, BLOCK\)"):
        tunebook.autotune(block_configs(32), key=["size"])(add_kernel)


def test_conflicting_meta_parameter_is_rejected():
    kernel = make_add()
    x, y, out = vectors(64)
    with pytest.raises(ValueError, match="Conflicting meta-parameters: BLOCK"):
        kernel[grid_1d(64)](x, y, out, 64, BLOCK=32)


def test_prune_configs_by_early_prune_perf_model_and_top_k():
    seen: dict[str, object] = {}

    def early(configs, named_args, **kwargs):
        seen["named_args"] = sorted(named_args)
        return [c for c in configs if c.kwargs["BLOCK"] <= 128]

    def perf_model(**kwargs):
        seen.setdefault("perf_calls", 0)
        seen["perf_calls"] += 1  # type: ignore[operator]
        return {32: 3.0, 64: 1.0, 128: 2.0}[kwargs["BLOCK"]]

    replay = Replay({32: 1.0, 64: 5.0, 128: 4.0, 256: 0.1})
    kernel = make_add(
        block_configs(32, 64, 128, 256),
        prune_configs_by={"early_config_prune": early, "perf_model": perf_model, "top_k": 2},
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    assert seen["named_args"] == ["n", "out_ptr", "x_ptr", "y_ptr"]
    assert sorted(replay.measured) == [64, 128]  # 256 pruned early, 32 predicted slowest
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    assert set(c.kwargs["BLOCK"] for c in kernel.configs_timings) == {64, 128}


def test_config_ids_follow_objects_not_addresses():
    # Pruners that build new Config objects on every call (gemlite's) free the last call's
    # objects; a new one at a freed one's address must not inherit its id, or tuning would
    # measure, and run, configs the pruner rejected.
    from tunebook._configs import ConfigIndex

    index = ConfigIndex(block_configs(16))
    for i in range(200):  # each round's Configs are freed before the next round makes its own
        blocks = (16, 32, 64, 128) if i % 2 else (128, 64, 32, 16)
        ids = [index.id_of(triton.Config({"BLOCK": b})) for b in blocks]
        assert [cid.split("|")[0] for cid in ids] == [f"BLOCK={b}" for b in blocks]


def test_top_k_fraction_keeps_at_least_one():
    kernel = make_add(prune_configs_by={"perf_model": lambda **kw: kw["BLOCK"], "top_k": 0.1})
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    assert kernel.best_config.kwargs == {"BLOCK": 32}
    assert tunebook.stats()["benchmarked"] == 0  # one config left: nothing to measure


def test_early_prune_returning_nothing_is_an_error():
    kernel = make_add(prune_configs_by={"early_config_prune": lambda c, a, **k: []})
    x, y, out = vectors(64)
    with pytest.raises(ValueError, match="at least one config"):
        kernel[grid_1d(64)](x, y, out, 64)


def test_reset_to_zero_gives_the_right_sum_after_tuning():
    kernel = tunebook.autotune(block_configs(16, 32, 64), key=["n"], reset_to_zero=["out_ptr"])(sum_kernel)
    x = torch.arange(100, dtype=torch.float32)
    out = torch.zeros(1)
    kernel[grid_1d(100)](x, out, 100)
    assert out.item() == pytest.approx(x.sum().item())  # benchmarking runs did not pile up


def test_without_reset_to_zero_benchmark_runs_accumulate():
    # The control for the test above: the same kernel without the option is wrong.
    kernel = tunebook.autotune(block_configs(16, 32, 64), key=["n"])(sum_kernel)
    x = torch.arange(100, dtype=torch.float32)
    out = torch.zeros(1)
    kernel[grid_1d(100)](x, out, 100)
    assert out.item() > x.sum().item()


def test_restore_value_keeps_in_place_updates_single():
    kernel = tunebook.autotune(block_configs(16, 32, 64), key=["n"], restore_value=["acc_ptr"])(
        accumulate_kernel
    )
    x = torch.ones(50)
    acc = torch.arange(50, dtype=torch.float32)
    expected = acc + x
    kernel[grid_1d(50)](x, acc, 50)
    torch.testing.assert_close(acc, expected)


def test_user_pre_and_post_hooks_wrap_every_benchmark_run():
    events: list[str] = []
    kernel = make_add(
        pre_hook=lambda nargs, reset_only=False: events.append("reset" if reset_only else "pre"),
        post_hook=lambda nargs, exception: events.append("post" if exception is None else "error"),
    )
    x, y, out = vectors(64)
    kernel[grid_1d(64)](x, y, out, 64)
    pres, posts = events.count("pre"), events.count("post")
    assert pres == posts and pres >= 3 * 2  # each config: a warm-up and timed runs
    assert events[-1] == "reset"  # Triton calls pre_hook(reset_only=True) after tuning
    n = len(events)
    kernel[grid_1d(64)](x, y, out, 64)
    assert len(events) == n  # hooks belong to benchmarking, not to served calls


def test_config_pre_hook_runs_when_benchmarking_and_serving():
    calls: list[int] = []

    def hook(nargs):
        calls.append(nargs["BLOCK"])
        nargs["out_ptr"].fill_(0.0)

    configs = [triton.Config({"BLOCK": 32}, pre_hook=hook), triton.Config({"BLOCK": 64}, pre_hook=hook)]
    kernel = make_add(configs)
    x, y, out = vectors(64)
    kernel[grid_1d(64)](x, y, out, 64)
    torch.testing.assert_close(out, x + y)
    before = len(calls)
    kernel[grid_1d(64)](x, y, out, 64)
    assert len(calls) == before + 1 and calls[-1] == kernel.best_config.kwargs["BLOCK"]


def test_warmup_rep_and_cuda_graph_options_are_accepted_on_the_interpreter():
    for options in ({"warmup": 5, "rep": 20}, {"use_cuda_graph": True}):
        kernel = make_add(**options)
        x, y, out = vectors(80)
        kernel[grid_1d(80)](x, y, out, 80)
        torch.testing.assert_close(out, x + y)


def test_custom_do_bench_decides_the_winner():
    replay = Replay({32: 0.5, 64: 0.7, 128: 0.2})
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(500)
    kernel[grid_1d(500)](x, y, out, 500)
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    assert kernel.configs_timings[kernel.best_config][0] == pytest.approx(0.2)


@pytest.mark.parametrize("option", [{"warmup": 1}, {"rep": 1}])
def test_warmup_or_rep_replace_a_custom_do_bench_as_in_triton(option):
    # triton.autotune times with warmup/rep (or CUDA graphs) whenever they are given, and
    # ignores do_bench then; the same arguments must time the same way here.
    replay = Replay({32: 0.5, 64: 0.7, 128: 0.2})
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook, **option)
    x, y, out = vectors(500)
    kernel[grid_1d(500)](x, y, out, 500)
    torch.testing.assert_close(out, x + y)
    assert replay.measured == [] and all(t[0] not in (0.5, 0.7, 0.2) for t in kernel.configs_timings.values())


def test_failing_configs_are_recorded_and_skipped():
    replay = Replay({32: 0.5, 128: 0.9})  # BLOCK=64 "fails"
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    assert kernel.best_config.kwargs == {"BLOCK": 32}
    failed = [c for c, t in kernel.configs_timings.items() if math.isinf(t[0])]
    assert [c.kwargs["BLOCK"] for c in failed] == [64]
    assert tunebook.stats()["failures"] == 1


def test_a_bug_in_the_call_raises_instead_of_being_remembered(book_dir):
    kernel = make_add()
    x, y, _ = vectors(64)
    # The interpreter's own error for a string where a pointer belongs, whatever its class.
    with pytest.raises(Exception, match=r"'str' object has no attribute"):
        kernel[grid_1d(64)](x, y, "not a tensor", 64)
    assert book_files(book_dir) == []


def test_heuristics_above_autotune():
    kernel = triton.heuristics({"BLOCK": lambda args: 64})(
        tunebook.autotune([triton.Config({}, num_warps=2), triton.Config({}, num_warps=4)], key=["n"])(
            add_kernel
        )
    )
    x, y, out = vectors(200)
    kernel[grid_1d(200)](x, y, out, 200)
    torch.testing.assert_close(out, x + y)


def test_autotune_above_heuristics():
    @tunebook.autotune(block_configs(32, 64), key=["n"])
    @triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
    @triton.jit
    def add_even(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if EVEN:
            tl.store(out_ptr + offs, tl.load(x_ptr + offs) + tl.load(y_ptr + offs))
        else:
            mask = offs < n
            tl.store(
                out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask
            )

    for n in (128, 100):
        x, y, out = vectors(n)
        add_even[grid_1d(n)](x, y, out, n)
        torch.testing.assert_close(out, x + y)


def test_heuristics_under_autotune_see_every_launch_option_on_every_launch():
    # As Triton's autotuner passes them: a heuristic may read num_warps. The launches of a
    # bare jit function leave out options at the backend's defaults; a wrapper's never do.
    seen = []

    def even(args):
        seen.append(tuple(k for k in ("num_warps", "num_ctas", "num_stages") if k in args))
        return args["n"] % args["BLOCK"] == 0

    @tunebook.autotune(block_configs(32, 64, num_warps=4, num_ctas=1, num_stages=3), key=["n"])
    @triton.heuristics({"EVEN": even})
    @triton.jit
    def add_even(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, total, mask=mask)

    x, y, out = vectors(100)
    for _ in range(3):  # measured and launched first, then hits
        add_even[grid_1d(100)](x, y, out, 100)
        torch.testing.assert_close(out, x + y)
    assert len(seen) >= 3 and set(seen) == {("num_warps", "num_ctas", "num_stages")}


def test_matmul_with_three_key_arguments():
    kernel = tunebook.autotune(
        [
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=2),
        ],
        key=["M", "N", "K"],
    )(matmul_kernel)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 24, generator=g), torch.randn(24, 36, generator=g)
    c = torch.empty(40, 36)

    def grid(meta):
        return (triton.cdiv(40, meta["BLOCK_M"]), triton.cdiv(36, meta["BLOCK_N"]))

    kernel[grid](a, b, c, 40, 36, 24, *a.stride(), *b.stride(), *c.stride())
    torch.testing.assert_close(c, a @ b, rtol=1e-3, atol=1e-3)
    assert next(iter(kernel.cache))[:3] == (40, 36, 24)


@pytest.mark.skipif(not hasattr(add_kernel, "warmup"), reason="this Triton's interpreter has no warmup()")
def test_warmup_compiles_every_candidate():
    kernel = make_add()
    x, y, out = vectors(64)
    results = kernel.warmup(x, y, out, 64, grid=(1,))
    assert len(results) == 3


def test_mode_off_benchmarks_like_triton_and_writes_nothing(book_dir, monkeypatch):
    monkeypatch.setenv("TUNEBOOK_MODE", "off")
    kernel = make_add()
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    torch.testing.assert_close(out, x + y)
    assert tunebook.stats()["benchmarked"] == 3
    assert not book_dir.exists() or not list(book_dir.iterdir())


def test_hit_path_serves_each_key_its_own_config():
    replay = Replay({32: 1.0, 64: 2.0, 128: 3.0})
    kernel = make_add(do_bench=replay, pre_hook=replay.pre_hook)
    x, y, out = vectors(256)
    kernel[grid_1d(256)](x, y, out, 256)  # tuned: BLOCK=32 wins
    replay.table = {32: 3.0, 64: 2.0, 128: 1.0}
    xd, yd, od = x.double(), y.double(), out.double()
    kernel[grid_1d(256)](xd, yd, od, 256)  # new dtype, tuned: BLOCK=128 wins
    measured = len(replay.measured)
    for _ in range(3):
        for args, block in (((x, y, out, 256), 32), ((xd, yd, od, 256), 128)):
            args[2].fill_(float("nan"))
            kernel[grid_1d(256)](*args)
            assert kernel.best_config.kwargs == {"BLOCK": block}
            torch.testing.assert_close(args[2], args[0] + args[1])
            kernel[grid_1d(256)](args[0], args[1], out_ptr=args[2], n=256)  # the keyword path
            assert kernel.best_config.kwargs == {"BLOCK": block}
    assert len(replay.measured) == measured
    assert tunebook.stats()["hits"] == 12


def test_concurrent_first_calls_benchmark_each_key_once():
    """Threads that miss the same keys at once: each key is tuned once, every call served.

    Triton's interpreter is not thread-safe, so the kernel here is a stand-in with the same
    interface (the GPU JIT's launches are thread-safe)."""
    import threading
    import time

    from triton.runtime.jit import KernelInterface

    class Launches(KernelInterface):
        fn = add_kernel
        arg_names = add_kernel.arg_names

        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def run(self, *args, grid, warmup, **kwargs):
            time.sleep(0.001)  # long enough for the threads to overlap
            self.seen.append((args[3], kwargs["BLOCK"]))

    timings = {32: 3.0, 64: 1.0, 128: 2.0}
    measured: list[int] = []

    def bench(kernel_call, quantiles=None):
        kernel_call()
        block = fake.seen[-1][1]
        measured.append(block)
        return [timings[block]] * 3

    fake = Launches()
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=bench)(fake)
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        for _ in range(5):
            kernel[(1,)](None, None, None, n)

    threads = [threading.Thread(target=work, args=(300 if i % 2 else 500,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(measured) == [32, 32, 64, 64, 128, 128]  # 2 keys x 3 configs, once each
    from collections import Counter

    launches = Counter(block for _, block in fake.seen)
    # 40 served calls, all with the winner; the other configs ran only when benchmarked.
    assert launches == {64: 40 + 2, 32: 2, 128: 2}
    assert tunebook.stats()["misses"] == 2


@triton.jit
def _add_optional(x_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x (+ b when b is given): b_ptr is an optional pointer."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if b_ptr is not None:
        x += tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, x, mask=mask)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_the_hit_path_never_serves_a_config_across_dtypes(by_keyword):
    """An optional pointer: None, then fp16, then fp32. Triton's key differs each time (the
    dtypes of tensor arguments); the fp32 call may only use BLOCK <= 64 (its pruning says so)."""

    def prune(configs, nargs, **kwargs):
        b = nargs.get("b_ptr", kwargs.get("b_ptr"))
        small = b is not None and b.dtype == torch.float32
        return [c for c in configs if not small or c.kwargs["BLOCK"] <= 64]

    replay = Replay({32: 3.0, 64: 2.0, 256: 1.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 256),
        key=["n"],
        prune_configs_by={"early_config_prune": prune},
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )(_add_optional)
    x, out = torch.randn(300), torch.empty(300)
    for b, block in ((None, 256), (torch.randn(300).half(), 256), (torch.randn(300), 64), (None, 256)):
        if by_keyword:
            kernel[grid_1d(300)](x, out_ptr=out, b_ptr=b, n=300)
        else:
            kernel[grid_1d(300)](x, b, out, 300)
        assert kernel.best_config.kwargs == {"BLOCK": block}
        torch.testing.assert_close(out, x if b is None else x + b.float())


def test_duplicate_configs_share_one_book_entry(book_dir):
    from tunebook._book import read_document

    configs = block_configs(64, 128, 64)  # Triton accepts duplicates; so must the book
    kernel = make_add(configs)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    (path,) = book_dir.iterdir()
    doc = read_document(path)
    assert doc is not None and len(next(iter(doc.entries.values())).results) == 2
    tunebook.reset_stats()
    make_add(configs)[grid_1d(300)](x, y, out, 300)  # a new autotuner reads it back
    assert tunebook.stats()["book_hits"] == 1 and tunebook.stats()["benchmarked"] == 0
    assert not list(book_dir.rglob("*.corrupt-*"))


def test_reset_to_zero_argument_passed_by_keyword():
    kernel = tunebook.autotune(block_configs(16, 32, 64), key=["n"], reset_to_zero=["out_ptr"])(sum_kernel)
    x = torch.arange(100, dtype=torch.float32)
    out = torch.zeros(1)
    kernel[grid_1d(100)](x, out_ptr=out, n=100)
    assert out.item() == pytest.approx(x.sum().item())
