"""Result checking (``tunebook._check.OutputCheck``): candidates run on the caller's inputs,
restored before every run, and are compared with a reference run; on real kernels in the
CPU interpreter, plus a few PyTorch callables where a kernel would add nothing."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

from small_kernels import (
    accumulate_kernel,
    add_kernel,
    add_wrong_at_128_kernel,
    grid_1d,
    matmul_kernel,
    sum_kernel,
    vectors,
)
from tunebook import _check, _compare
from tunebook._check import OutputCheck, SnapshotTooLarge

ADD_NAMES = ["x_ptr", "y_ptr", "out_ptr", "n"]


@triton.jit
def _add_tail_bug_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y, but the BLOCK=64 variant never writes the partial last block."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    limit = (n // BLOCK) * BLOCK if BLOCK == 64 else n
    mask = offs < limit
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _add_int_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + 1 on integers; the BLOCK=32 variant adds 2 to the last element."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    extra = tl.where((offs == n - 1) & (BLOCK == 32), 1, 0)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1 + extra, mask=mask)


def launch(kernel: Any, n: int, *args: Any, **meta: Any):
    """A ``run`` callable: one launch of one config, as the autotuner's kernel_call does."""
    return lambda: kernel[grid_1d(n)](*args, n, **meta)


# ------------------------------------------------------------------------ real kernels


def test_every_correct_config_passes_and_inputs_are_untouched() -> None:
    n = 300  # not a multiple of any block: every config has a partial last block
    x, y, out = vectors(n)
    originals = [t.clone() for t in (x, y, out)]
    check = OutputCheck((x, y, out, n), {}, names=ADD_NAMES)
    check.reference(launch(add_kernel, n, x, y, out, BLOCK=64))
    for block in (16, 32, 128, 256):
        assert check.check(launch(add_kernel, n, x, y, out, BLOCK=block)) is None
    for t, original in zip((x, y, out), originals):
        torch.testing.assert_close(t, original, rtol=0, atol=0, equal_nan=True)
    assert out.isnan().all()  # the caller's output buffer, as it was


def test_a_config_only_bug_is_caught_and_named() -> None:
    n = 300
    x, y, out = vectors(n)
    check = OutputCheck((x, y, out, n), {}, names=ADD_NAMES)
    check.reference(launch(add_wrong_at_128_kernel, n, x, y, out, BLOCK=64))
    assert check.check(launch(add_wrong_at_128_kernel, n, x, y, out, BLOCK=32)) is None
    reason = check.check(launch(add_wrong_at_128_kernel, n, x, y, out, BLOCK=128))
    assert reason is not None
    assert reason.startswith("wrong result: out_ptr differs from the reference config in ")
    # x - y is within tolerance of x + y only where |y| is tiny.
    mismatches = int(re.search(r"in (\d+) of 300 elements", reason).group(1))
    assert 280 <= mismatches <= int((y.abs() > 1e-3).sum())
    assert "max abs error" in reason and "tolerance" in reason


def test_a_tail_left_unwritten_is_caught_even_when_the_buffer_holds_nan() -> None:
    n = 200  # BLOCK=64: 3 full blocks, 8 tail elements never written
    x, y, out = vectors(n)
    check = OutputCheck((x, y, out, n), {}, names=ADD_NAMES)
    check.reference(launch(_add_tail_bug_kernel, n, x, y, out, BLOCK=32))
    reason = check.check(launch(_add_tail_bug_kernel, n, x, y, out, BLOCK=64))
    assert reason is not None
    assert "out_ptr differs from the reference config in 8 of 200 elements" in reason
    assert "8 of them NaN in the candidate only" in reason
    assert "first at index (192,): got nan, ref " in reason


def test_a_buggy_reference_makes_every_correct_candidate_disagree() -> None:
    # The check trusts its reference: the caller must choose it (see docs/result-checking.md).
    n = 300
    x, y, out = vectors(n)
    check = OutputCheck((x, y, out, n), {}, names=ADD_NAMES)
    check.reference(launch(add_wrong_at_128_kernel, n, x, y, out, BLOCK=128))
    assert check.check(launch(add_wrong_at_128_kernel, n, x, y, out, BLOCK=64)) is not None


def test_in_place_kernel_sees_the_original_accumulator_every_run() -> None:
    n = 100
    x, _, _ = vectors(n)
    acc = torch.arange(n, dtype=torch.float32)
    original = acc.clone()
    check = OutputCheck((x, acc, n), {}, names=["x_ptr", "acc_ptr", "n"])
    check.reference(launch(accumulate_kernel, n, x, acc, BLOCK=32))
    for block in (16, 32, 64, 128) * 3:
        assert check.check(launch(accumulate_kernel, n, x, acc, BLOCK=block)) is None
        assert torch.equal(acc, original)  # restored after each run
    # Benchmark-like repeated runs between checks do not leak into the next check.
    for _ in range(4):
        launch(accumulate_kernel, n, x, acc, BLOCK=64)()
    assert not torch.equal(acc, original)
    assert check.check(launch(accumulate_kernel, n, x, acc, BLOCK=64)) is None

    def twice() -> None:  # a config that applies the update twice is wrong
        launch(accumulate_kernel, n, x, acc, BLOCK=64)()
        launch(accumulate_kernel, n, x, acc, BLOCK=64)()

    reason = check.check(twice)
    assert reason is not None and "acc_ptr differs" in reason
    check.restore()
    assert torch.equal(acc, original)


def test_atomic_reduction_starts_from_the_callers_output_each_time() -> None:
    n = 1000
    x, _, _ = vectors(n)
    out = torch.full((1,), 5.0)  # not zeroed: every run must add onto 5.0, not onto the last run
    check = OutputCheck((x, out, n), {}, names=["x_ptr", "out_ptr", "n"])
    check.reference(launch(sum_kernel, n, x, out, BLOCK=64))
    for block in (16, 128, 256, 1024):
        assert check.check(launch(sum_kernel, n, x, out, BLOCK=block)) is None
    assert out.item() == 5.0


# Not bfloat16: the interpreter's tl.dot on bfloat16 returns garbage (about 1e11 here).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_with_different_tiles_passes_the_default_tolerance(dtype: torch.dtype) -> None:
    M, N, K = 40, 48, 96
    g = torch.Generator().manual_seed(1)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    c = torch.zeros(M, N, dtype=dtype)

    def run(bm: int, bn: int, bk: int):
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        strides = (*a.stride(), *b.stride(), *c.stride())
        return lambda: matmul_kernel[grid](a, b, c, M, N, K, *strides, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)

    check = OutputCheck((a, b, c), {}, names=["a_ptr", "b_ptr", "c_ptr"])
    check.reference(run(16, 16, 16))
    for tiles in ((32, 32, 32), (16, 64, 64), (64, 16, 32)):
        assert check.check(run(*tiles)) is None, tiles
    assert torch.allclose(check._args[2].expected.float(), (a.float() @ b.float()), rtol=2e-2, atol=5e-2)
    assert check.check(lambda: (run(32, 32, 32)(), c.__setitem__((M - 1, N - 1), 1e3))) is not None


def test_integer_outputs_are_compared_exactly() -> None:
    n = 100
    x = torch.arange(n, dtype=torch.int32) * 1000
    out = torch.zeros(n, dtype=torch.int32)
    check = OutputCheck((x, out, n), {}, names=["x_ptr", "out_ptr", "n"])
    check.reference(launch(_add_int_kernel, n, x, out, BLOCK=64))
    assert check.check(launch(_add_int_kernel, n, x, out, BLOCK=16)) is None
    reason = check.check(launch(_add_int_kernel, n, x, out, BLOCK=32))
    assert reason is not None
    assert "out_ptr differs from the reference config in 1 of 100 elements" in reason
    assert "tolerance exact" in reason and "first at index (99,)" in reason


# ---------------------------------------------------------- comparison rules, directly


def _checked(ref_values: list[float], got_values: list[float], dtype=torch.float32) -> str | None:
    out = torch.zeros(len(ref_values), dtype=dtype)
    check = OutputCheck((out,), {}, names=["out"])
    check.reference(lambda: out.copy_(torch.tensor(ref_values, dtype=dtype)))
    return check.check(lambda: out.copy_(torch.tensor(got_values, dtype=dtype)))


def test_nan_equals_nan_at_the_same_place_only() -> None:
    nan, inf = float("nan"), float("inf")
    assert _checked([1.0, nan, inf, -inf], [1.0, nan, inf, -inf]) is None
    reason = _checked([1.0, nan, 3.0], [1.0, 2.0, nan])
    assert reason is not None
    assert "in 2 of 3 elements" in reason
    assert "1 of them NaN in the candidate only, 1 of them NaN in the reference only" in reason
    assert "first at index (1,): got 2, ref nan" in reason
    assert _checked([1.0, inf], [1.0, -inf]) is not None
    assert _checked([1.0, inf], [1.0, 1e30]) is not None
    assert _checked([1.0, 2.0], [1.0, inf]) is not None


def test_int64_beyond_float64_precision_is_still_exact() -> None:
    big = 2**60
    assert _checked([big, 7], [big, 7], dtype=torch.int64) is None
    reason = _checked([big, 7], [big + 1, 7], dtype=torch.int64)
    assert reason is not None and "in 1 of 2 elements" in reason


def test_bool_outputs_are_exact() -> None:
    assert _checked([1, 0, 1], [1, 0, 1], dtype=torch.bool) is None
    assert "tolerance exact" in (_checked([1, 0, 1], [1, 1, 1], dtype=torch.bool) or "")


def test_tolerance_is_per_dtype_and_relative_to_the_largest_value() -> None:
    # fp16: 1e-2 * max|ref| + 1e-2 * |ref|; an error of 0.5 on 0.0 passes when max|ref| is 100.
    assert _checked([0.0, 100.0], [0.5, 100.0], dtype=torch.float16) is None
    assert _checked([0.0, 100.0], [3.0, 100.0], dtype=torch.float16) is not None
    # The same relative error in fp32 is beyond its tighter tolerance.
    assert _checked([0.0, 100.0], [0.5, 100.0], dtype=torch.float32) is not None
    # Tiny outputs cannot pass by being zero.
    assert _checked([1e-6, 2e-6], [0.0, 0.0]) is not None


def test_tolerance_overrides() -> None:
    out = torch.zeros(2)
    for kwargs, passes in (
        ({}, False),
        ({"rtol": 0.1, "atol": 0.1}, True),
        ({"rtol": {torch.float32: 0.1}, "atol": {"float32": 0.1}}, True),
        ({"rtol": {torch.float16: 0.1}, "atol": {torch.float16: 0.1}}, False),
    ):
        check = OutputCheck((out,), {}, **kwargs)
        check.reference(lambda: out.copy_(torch.tensor([1.0, 2.0])))
        assert (check.check(lambda: out.copy_(torch.tensor([1.05, 2.0]))) is None) is passes, kwargs
    with pytest.raises(ValueError, match="give a number >= 0"):
        OutputCheck((out,), {}, rtol={torch.float32: -1.0})


def test_a_complex_dtypes_tolerance_is_its_parts_and_other_keys_are_refused() -> None:
    """Tolerance keys were never checked: {torch.complex64: ...} was taken and ignored (complex
    is compared as float32 parts), as were 'fp16', integer dtypes and 16."""
    out = torch.zeros(2, dtype=torch.complex64)
    for given in ({torch.complex64: 0.5}, {"torch.complex64": 0.5}, {"float32": 0.5}):
        check = OutputCheck((out,), {}, rtol=given, atol=given)
        check.reference(lambda: out.copy_(torch.tensor([1 + 1j, 2 - 1j])))
        assert check.check(lambda: out.copy_(torch.tensor([1.1 + 1j, 2 - 1.1j]))) is None, given
    assert OutputCheck((out,), {}, rtol={"half": 0.5})._rtol["float16"] == 0.5  # torch.half is float16
    for key in ("fp16", torch.int32, "int32", 16, "bool", "tensor"):
        with pytest.raises(ValueError, match=rf"given for {re.escape(repr(key))}, which is not .* float16, "):
            OutputCheck((out,), {}, rtol={key: 0.5})
    with pytest.raises(ValueError, match=r"float32 two values, 0\.5 under torch\.complex64 and 0\.1 under"):
        OutputCheck((out,), {}, atol={torch.complex64: 0.5, "float32": 0.1})


def test_keyword_tensors_aliases_and_ignored_scratch() -> None:
    x = torch.arange(4.0)
    out = torch.zeros(4)
    scratch = torch.zeros(4)
    check = OutputCheck((x,), {"out": out, "alias": out, "scratch": scratch}, ignore=["scratch"])
    assert check.names == ["argument 0", "out and alias", "scratch"]
    check.reference(lambda: (out.copy_(x * 2), scratch.fill_(1.0)))
    # Scratch contents differ per config: ignored, but still restored.
    assert check.check(lambda: (out.copy_(x * 2), scratch.fill_(9.0))) is None
    assert torch.equal(scratch, torch.zeros(4))
    reason = check.check(lambda: out.copy_(x * 3))
    assert reason is not None and reason.startswith("wrong result: out and alias differ from")
    # A candidate that scribbles on an input is wrong too.
    reason = check.check(lambda: (out.copy_(x * 2), x.add_(1)))
    assert reason is not None and "argument 0 differs" in reason
    assert torch.equal(x, torch.arange(4.0))


def test_broadcast_input_with_stride_zero_is_restored() -> None:
    base = torch.arange(3.0)
    wide = base.expand(4, 3)  # copy_ into it is refused by PyTorch; restored through its storage
    out = torch.zeros(4, 3)
    check = OutputCheck((wide, out), {}, names=["bias", "out"])
    check.reference(lambda: out.copy_(wide + 1))
    assert check.check(lambda: (out.copy_(wide + 1), base.mul_(10))) is not None
    assert torch.equal(base, torch.arange(3.0))


def test_restore_gives_back_the_original_inputs() -> None:
    n = 64
    x, _, _ = vectors(n)
    acc = torch.ones(n)
    check = OutputCheck((x, acc, n), {})
    check.reference(launch(accumulate_kernel, n, x, acc, BLOCK=32))
    launch(accumulate_kernel, n, x, acc, BLOCK=32)()  # a timing run outside the check
    launch(accumulate_kernel, n, x, acc, BLOCK=32)()
    check.restore()
    assert torch.equal(acc, torch.ones(n))


def test_a_run_that_raises_restores_and_propagates() -> None:
    out = torch.zeros(3)
    check = OutputCheck((out,), {})

    def crash() -> None:
        out.fill_(7.0)
        raise RuntimeError("out of resources")

    with pytest.raises(RuntimeError, match="out of resources"):
        check.reference(crash)
    assert torch.equal(out, torch.zeros(3))
    with pytest.raises(RuntimeError, match="before reference"):
        check.check(lambda: None)
    check.reference(lambda: out.fill_(1.0))
    with pytest.raises(RuntimeError, match="out of resources"):
        check.check(crash)
    assert torch.equal(out, torch.zeros(3))


def test_snapshot_larger_than_max_bytes_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.zeros(1000)  # 4000 bytes
    small = torch.zeros(10)
    with pytest.raises(SnapshotTooLarge) as info:
        OutputCheck((big, small), {}, names=["x_ptr", "out_ptr"], max_bytes=1024)
    message = str(info.value)
    assert "3.9 KiB" in message and "x_ptr 3.9 KiB" in message and "max_bytes=1.0 KiB" in message
    assert "check={'max_bytes': ...}" in message and "check=False" in message
    assert isinstance(info.value, ValueError)
    assert OutputCheck((big, small), {}, max_bytes=4040).nbytes == 4040
    assert OutputCheck((big, small), {}).nbytes == 4040  # well under the default
    monkeypatch.setattr("tunebook._check.DEFAULT_MAX_BYTES", 1024)  # the default is what applies
    with pytest.raises(SnapshotTooLarge, match=r"max_bytes=1\.0 KiB"):
        OutputCheck((big, small), {})


# ------------------------------------------------- checking in a worker (isolate, tune)

_WORKER_KERNELS = '''
import triton
import triton.language as tl
import tunebook
from small_kernels import Replay, block_configs


@triton.jit
def sub_at_64_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y on integers; the BLOCK=64 variant computes x - y, the same on zeros."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x, y = tl.load(x_ptr + offs, mask=mask), tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x - y if BLOCK == 64 else x + y, mask=mask)


def _checked(isolate):
    replay = Replay({32: 2.0, 64: 1.0})  # the wrong config is the faster
    return tunebook.autotune(
        block_configs(32, 64), key=["n"], check=True, isolate=isolate,
        do_bench=replay, pre_hook=replay.pre_hook,
    )(sub_at_64_kernel)


in_process, isolated = _checked(False), _checked(True)
'''


@pytest.mark.slow
def test_a_worker_checks_integer_kernels_on_random_integers_not_zeros(tmp_path, monkeypatch) -> None:
    """A worker (isolate=True, tunebook tune) rebuilds the call from its layout; integer
    tensors were zeros, on which x - y and x + y agree, and the wrong config won there."""
    import importlib

    (tmp_path / "worker_check_kernels.py").write_text(_WORKER_KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("worker_check_kernels")
    for kernel in (module.in_process, module.isolated):
        monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / f"book {id(kernel)}"))  # one kernel id: a book each
        x, y = (
            torch.randint(1, 100, (100,), dtype=torch.int32),
            torch.randint(1, 100, (100,), dtype=torch.int32),
        )
        out = torch.empty(100, dtype=torch.int32)
        kernel[grid_1d(100)](x, y, out, 100)
        assert torch.equal(out, x + y) and kernel.best_config.kwargs == {"BLOCK": 32}
        (key,) = kernel.page().key_names()
        (wrong,) = [r for r in kernel.page().get(key).results.values() if not r.ok]
        assert wrong.config["kwargs"] == {"BLOCK": 64} and wrong.error.startswith("WrongResult")


_HANGING_REFERENCE = """
import time
import triton
import tunebook
from small_kernels import add_kernel


def _hang(nargs):
    time.sleep(3600)


# The first config, check='s reference, hangs; the random order (this seed) measures another
# first. Two configs a key: the hung reference is not one of them.
add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}, pre_hook=_hang)] + [triton.Config({"BLOCK": b}) for b in (64, 128, 256)],
    key=["n"], check=True, isolate=True, isolate_timeout=12.0, strategy="random", seed=1, max_configs=2,
)(add_kernel)
"""


@pytest.mark.slow
def test_a_hang_in_the_reference_search_is_blamed_on_the_reference(tmp_path, monkeypatch) -> None:
    """check= launches its reference (the first config that runs) before the first candidate
    is measured. A worker named only the candidate to its supervisor, so a reference that
    hung was blamed on that candidate, the next worker hung on the same reference and blamed
    the next one: every config ended recorded as hung and the call failed. The hang is the
    reference search's failure, off the search's budget, as the search's other failures."""
    import importlib

    (tmp_path / "hanging_reference.py").write_text(_HANGING_REFERENCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "book"))
    module = importlib.import_module("hanging_reference")
    x, y, out = torch.randn(300), torch.randn(300), torch.empty(300)
    module.add[grid_1d(300)](x, y, out, 300)
    torch.testing.assert_close(out, x + y)
    (key,) = module.add.page().key_names()
    results = {r.config["kwargs"]["BLOCK"]: r for r in module.add.page().get(key).results.values()}
    assert "timed out" in (results[32].error or ""), results[32]
    assert (results[32].error or "").endswith("(found looking for check='s reference)"), results[32]
    assert sum(r.ok for r in results.values()) == 2, results  # max_configs, the hang not counted
    assert module.add.best_config.kwargs["BLOCK"] in (64, 128, 256)


def test_a_rebuilt_call_keeps_locks_counters_and_scratch_at_zero() -> None:
    """A worker's rebuilt call: integers named in reset_to_zero, restore_value or check's
    ignore stay zeros (a spin lock the kernel restores itself starting at a random value
    hung every config in the worker, while it ran in process)."""
    import tunebook
    from small_kernels import block_configs
    from tunebook._worker.child import zeroed_names

    kernel = tunebook.autotune(
        block_configs(32),
        key=["n"],
        check={"ignore": ["out_ptr"]},
        reset_to_zero=["x_ptr"],
        restore_value=["y_ptr"],
    )(add_kernel)
    assert zeroed_names(kernel) == {"x_ptr", "y_ptr", "out_ptr"}


def test_rebuilt_integers_are_random_only_when_checked_and_stay_in_bounds() -> None:
    from tunebook._calls import build_args, describe_call

    ids, counts, table = (
        torch.zeros(64, dtype=torch.int32),
        torch.zeros(64, dtype=torch.uint8),
        torch.zeros(8, 1),
    )
    desc = describe_call((ids, counts, table, torch.zeros(64, dtype=torch.bool)), {"lock": counts})
    (ids, counts, _, flags), kwargs = build_args(desc)
    assert not (ids.any() or counts.any() or flags.any() or kwargs["lock"].any())  # unchecked: zeros
    names = ["ids", "counts", "table", "flags"]
    (ids, counts, _, flags), kwargs = build_args(desc, random_integers=True, names=names, zeroed={"counts"})
    # Below table's 8 rows (its 1 column is left out: a broadcast, rarely indexed).
    assert 0 <= int(ids.min()) and int(ids.max()) == 7 and len(set(ids.tolist())) == 8
    assert 0 < int(flags.sum()) < 64
    assert not counts.any() and kwargs["lock"].any()  # zeroed by name; a keyword by its own
    (ids, *_), _ = build_args(describe_call((ids, torch.zeros(1000, 1000)), {}), random_integers=True)
    assert int(ids.max()) == 15  # at most 16 values, whatever the sizes
    (ids,), _ = build_args(describe_call((torch.zeros(1, 1, dtype=torch.int64),), {}), random_integers=True)
    assert int(ids.max()) == 0  # no dimension of 2 or more: nothing is surely in bounds but 0


# ------------------------------------------------------------------ what a reason says


def test_the_reason_names_the_reference_the_values_and_how_to_accept_them() -> None:
    out = torch.zeros(3)
    check = OutputCheck((out,), {}, names=["out_ptr"])
    check.reference(lambda: out.copy_(torch.tensor([1.0, 2.0, 3.0])), name="BLOCK=64|num_warps=4")
    reason = check.check(lambda: out.copy_(torch.tensor([1.0, 5.0, 3.0])))
    assert reason is not None
    assert reason.startswith(
        "wrong result: out_ptr differs from the reference config BLOCK=64|num_warps=4 in 1 "
    )
    assert "first at index (1,): got 5, ref 2" in reason
    assert "give check= a larger rtol/atol for float32, or add out_ptr to its ignore list" in reason
    assert reason[-1] not in ")]"  # the tuning loop may append a tag
    ints = torch.zeros(2, dtype=torch.int32)
    check = OutputCheck((ints,), {}, names=["idx_ptr"])
    check.reference(lambda: ints.copy_(torch.tensor([0, 1])))
    reason = check.check(lambda: ints.copy_(torch.tensor([1, 0]))) or ""
    assert "got 1, ref 0" in reason and "add it to check='s ignore list" in reason and "rtol" not in reason


def test_a_reference_that_disagrees_with_its_own_run_says_the_kernel_is_not_deterministic() -> None:
    from tunebook._check import CheckedBench
    from tunebook._errors import WrongResult

    out = torch.zeros(2)
    runs = iter(range(100))
    configs = ["first", "second"]
    bench = CheckedBench(
        OutputCheck((out,), {}, names=["out_ptr"]),
        configs,
        run_once=lambda config: out.fill_(float(next(runs))),  # another answer every run
        timed=lambda config: lambda: None,
        quantiles=(0.5,),
    )
    with pytest.raises(WrongResult) as info:
        bench(lambda fn, quantiles: [1.0], configs[0])
    reason = str(info.value)
    assert "out_ptr differs from its own earlier run in 2 of 2 elements" in reason
    assert ": the kernel is not deterministic;" in reason and "reference config" not in reason


def test_complex_mismatches_are_counted_and_indexed_in_complex_elements() -> None:
    z = torch.zeros(2, 2, dtype=torch.complex64)
    check = OutputCheck((z,), {}, names=["out_ptr"])
    check.reference(lambda: z.fill_(1 + 1j))
    reason = check.check(lambda: (z.fill_(1 + 1j), z[1, 0].fill_(1 + 3j), z[1, 1].fill_(1 + 5j))) or ""
    assert "in 2 of 4 elements" in reason
    assert "first at index (1, 0): got (1+3j), ref (1+1j)" in reason


# ------------------------------------------------------------------ dtypes, pieces, memory


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_a_float8_output_of_zeros_is_wrong(dtype: str) -> None:
    """float8 e5m2's default tolerances were 0.5 and 0.5 x max|ref|: at the largest element
    they add up to 1, and a candidate that wrote zeros passed at every element."""
    dtype_ = getattr(torch, dtype)
    out = torch.zeros(4, dtype=dtype_)
    right = torch.tensor([1.0, 2.0, 4.0, 8.0]).to(dtype_)
    check = OutputCheck((out,), {}, names=["out_ptr"])
    check.reference(lambda: out.copy_(right))
    assert check.check(lambda: out.copy_(right)) is None
    assert check.check(lambda: out.zero_()) is not None


def test_float8_e8m0_scales_are_compared_exactly() -> None:
    scales = torch.zeros(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    right = torch.tensor([1.0, 2.0, 4.0, 0.5]).to(torch.float8_e8m0fnu)
    check = OutputCheck((scales,), {}, names=["scale_ptr"])
    check.reference(lambda: scales.copy_(right))
    assert check.check(lambda: scales.copy_(right)) is None
    off = torch.tensor([1.0, 2.0, 8.0, 0.5]).to(torch.float8_e8m0fnu)  # one scale off by 2
    reason = check.check(lambda: scales.copy_(off)) or ""
    assert "in 1 of 4 elements" in reason and "tolerance exact" in reason and "got 8, ref 4" in reason


def test_float4_is_compared_in_its_bytes() -> None:
    # PyTorch does no arithmetic on float4_e2m1fn_x2: widening it for _same made reference()
    # raise, and with that fixed, finfo() made every check raise.
    packed = torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    check = OutputCheck((packed,), {}, names=["q_ptr"])
    check.reference(lambda: packed.view(torch.uint8).copy_(torch.tensor([0x12, 0x34, 0x56])))
    assert check.check(lambda: packed.view(torch.uint8).copy_(torch.tensor([0x12, 0x34, 0x56]))) is None
    reason = check.check(lambda: packed.view(torch.uint8).copy_(torch.tensor([0x12, 0x34, 0x57]))) or ""
    assert "in 1 of 3 elements (tolerance exact, first at index (2,): got byte 0x57, ref byte 0x56)" in reason


def test_a_floating_dtype_without_an_entry_gets_at_most_a_quarter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its fallback, 10 eps, is 2.5 for float8_e5m2 (eps 0.25): outputs of zeros passed.
    for table in ("DEFAULT_RTOL", "DEFAULT_ATOL"):
        defaults = {k: v for k, v in getattr(_check, table).items() if k != "float8_e5m2"}
        monkeypatch.setattr(_check, table, defaults)
    reason = _checked([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], dtype=torch.float8_e5m2)
    assert reason is not None and "tolerance 1 + 0.25*|ref|" in reason
    assert _checked([1.0, 2.0, 4.0], [1.0, 2.5, 4.0], dtype=torch.float8_e5m2) is None


@pytest.mark.parametrize(
    ("dtype", "nans"),
    [
        ("float8_e4m3fn", (0x7F, 0xFF)),
        ("float8_e5m2", (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF)),
        ("float8_e4m3fnuz", (0x80,)),
        ("float8_e5m2fnuz", (0x80,)),
        ("float8_e8m0fnu", (0xFF,)),
    ],
)
def test_float8_is_compared_in_its_bytes_every_nan_encoding_alike(dtype: str, nans: tuple[int, ...]) -> None:
    kind = getattr(torch, dtype)
    encodings = torch.tensor(nans, dtype=torch.uint8)
    assert _compare.isnan(encodings.view(kind)).all()
    assert int(_compare.isnan(torch.arange(256, dtype=torch.uint8).view(kind)).sum()) == len(nans)
    flipped = encodings.flip(0).view(kind)  # another NaN at every place
    assert _compare.unchanged(encodings.view(kind), flipped)
    changed = encodings.clone()
    changed[0] = 0x38  # a number
    assert not _compare.unchanged(encodings.view(kind), changed.view(kind))


def test_pieces_follow_the_shape_whatever_the_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compare, "CHUNK", 5)  # a 6 x 4 tensor: rows split over several pieces
    out = torch.zeros(4, 6).t()  # not contiguous
    check = OutputCheck((out,), {}, names=["out_ptr"])
    values = torch.arange(24.0).reshape(6, 4)
    check.reference(lambda: out.copy_(values))
    assert check._args[0].expected is not None  # _same saw the change, piece by piece
    wrong = values.clone()
    wrong[3, 2] = wrong[5, 1] = -1.0
    reason = check.check(lambda: out.copy_(wrong)) or ""
    assert "in 2 of 24 elements" in reason and "first at index (3, 2): got -1, ref 14" in reason
    pieces = list(_compare.pieces(out, 5))
    assert torch.equal(torch.cat(pieces), out.reshape(-1)) and max(p.numel() for p in pieces) <= 5


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak resident size as Linux reports it")
def test_the_reference_step_on_float8_needs_no_more_than_a_copy_of_the_output() -> None:
    # _same widened float8 to float32, unchunked: 1.5 GiB more for two 128 MiB arguments.
    from conftest import run_python  # not at the top: a child process imports this module

    result = run_python(
        """
        import json, resource, torch
        from tunebook import _check, _compare
        _compare.CHUNK = 1 << 20
        nbytes = 32 << 20
        x = torch.full((nbytes,), 0x3C, dtype=torch.uint8).view(torch.float8_e4m3fn)
        out = torch.zeros(nbytes, dtype=torch.uint8).view(torch.float8_e4m3fn)
        check = _check.OutputCheck((x, out), {}, names=["x", "out"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        check.reference(lambda: out.copy_(x))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"extra": (after - before) * 1024, "nbytes": nbytes}))
        """,
        # Live memory only: freed pieces go back at once rather than stay in malloc's heap.
        env={"TRITON_INTERPRET": "0", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert result["extra"] < 1.5 * result["nbytes"], result  # the output's copy, and pieces


# ------------------------------------------------------------------ when the check cannot run


def test_a_check_that_cannot_run_is_told_apart_from_a_run_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunebook._check import CheckUnavailable

    out = torch.zeros(3)
    check = OutputCheck((out,), {}, names=["out_ptr"])
    with pytest.raises(RuntimeError, match="out of resources") as info:
        check.reference(lambda: (_ for _ in ()).throw(RuntimeError("out of resources")))
    assert not isinstance(info.value, CheckUnavailable)

    def no_memory(a: Any, b: Any) -> bool:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(_compare, "unchanged", no_memory)
    with pytest.raises(CheckUnavailable, match=r"comparing .* raised OutOfMemoryError: CUDA out of memory"):
        check.reference(lambda: out.fill_(1.0))
    assert torch.equal(out, torch.zeros(3))  # restored all the same
    monkeypatch.undo()

    class Unrestorable(torch.Tensor):
        def copy_(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError('"copy_kernel" not implemented for this dtype')

    packed = torch.zeros(4).as_subclass(Unrestorable)
    with pytest.raises(CheckUnavailable, match=r"restoring the arguments .* NotImplementedError"):
        OutputCheck((packed,), {}, names=["q_ptr"]).reference(lambda: None)


def test_a_check_that_cannot_run_warns_that_the_key_is_unchecked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tunebook
    from small_kernels import Replay, block_configs

    def no_memory(a: Any, b: Any) -> bool:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(_compare, "unchanged", no_memory)
    replay = Replay({32: 2.0, 64: 3.0, 128: 1.0})
    launches: list[int] = []
    kernel = tunebook.autotune(
        block_configs(32, 64, 128, pre_hook=lambda nargs: launches.append(nargs["BLOCK"])),
        key=["n"],
        do_bench=replay,
        pre_hook=replay.pre_hook,
        check=True,
    )(add_wrong_at_128_kernel)
    x, y, out = vectors(300)
    with pytest.warns(UserWarning, match=r"check= could not run: comparing .* OutOfMemoryError") as info:
        kernel[grid_1d(300)](x, y, out, 300)
    (said,) = [str(w.message) for w in info if "check=" in str(w.message)]
    assert "add_wrong_at_128_kernel key [300" in said and "the book records for the key is unchecked" in said
    # The check failed, not the config: no other candidate was launched as a would-be
    # reference (BLOCK=64: only its timing; the fast wrong BLOCK=128 won, unchecked).
    assert launches.count(64) == 1 and kernel.best_config.kwargs == {"BLOCK": 128}


# ------------------------------------------------------------------ the reference search


@triton.jit
def _add_one_up_to_64_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + 1; a BLOCK over 64 fails its static_assert (as one too large for a GPU would)."""
    tl.static_assert(BLOCK <= 64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


FAILING_BLOCKS = [128 * (i + 1) for i in range(6)]


def up_to_64_tuned(launched: dict[int, int]) -> Any:
    """Repro 11's shape: configs that cannot run first, then those that can; a random search of 3."""
    import tunebook

    def count(nargs: dict[str, Any]) -> None:
        launched[nargs["BLOCK"]] = launched.get(nargs["BLOCK"], 0) + 1

    configs = [triton.Config({"BLOCK": b}, pre_hook=count) for b in FAILING_BLOCKS] + [
        triton.Config({"BLOCK": 16}, num_warps=w, pre_hook=count) for w in (1, 2, 4, 8)
    ]
    return tunebook.autotune(configs, key=["n"], check=True, strategy="random", max_configs=3, seed=0)(
        _add_one_up_to_64_kernel
    )


def failed_blocks(kernel: Any, n: int) -> list[int]:
    """The BLOCKs the book records as failed for key ``n``."""
    page = kernel.page()
    results = page.get(next(t for t in page.key_names() if t.startswith(f"[{n},"))).results
    return sorted(r.config["kwargs"]["BLOCK"] for r in results.values() if not r.ok)


def launch_up_to_64(kernel: Any, n: int) -> None:
    x, out = torch.randn(n), torch.empty(n)
    kernel[grid_1d(n)](x, out, n)
    torch.testing.assert_close(out, x + 1)


def test_configs_the_reference_search_finds_unable_to_run_are_recorded_and_not_launched_again() -> None:
    launched: dict[int, int] = {}
    kernel = up_to_64_tuned(launched)
    launch_up_to_64(kernel, 100)  # the reference search launches each failing config once, and records it
    assert all(launched.get(b) == 1 for b in FAILING_BLOCKS), launched
    assert failed_blocks(kernel, 100) == FAILING_BLOCKS
    launched.clear()
    launch_up_to_64(kernel, 200)  # another key: configs that failed for the first are tried last
    assert sorted(b for b in FAILING_BLOCKS if launched.get(b)) == failed_blocks(kernel, 200)
    # Another process, another key: it reads the first keys' failures from the book.
    from conftest import run_python  # not at the top: the child imports this module

    child = run_python(
        """
        import json
        from test_check import failed_blocks, launch_up_to_64, up_to_64_tuned
        launched = {}
        kernel = up_to_64_tuned(launched)
        launch_up_to_64(kernel, 300)
        tried = sorted(b for b, count in launched.items() if b > 64)
        print(json.dumps({"tried": tried, "failed": failed_blocks(kernel, 300)}))
        """
    )
    assert child["tried"] == child["failed"], child  # only what its search measured


def test_the_book_names_the_reference_config_by_its_id() -> None:
    import tunebook
    from small_kernels import Replay, block_configs

    replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook, check=True
    )(add_wrong_at_128_kernel)
    x, y, out = vectors(300)
    kernel[grid_1d(300)](x, y, out, 300)
    page = kernel.page()
    (wrong,) = [r for r in page.get(next(iter(page.key_names()))).results.values() if not r.ok]
    assert "out_ptr differs from the reference config BLOCK=32|" in (wrong.error or "")
