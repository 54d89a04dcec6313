"""Result checking (``tunebook._check.OutputCheck``): candidates run on the caller's inputs,
restored before every run, and are compared with a reference run; on real kernels in the
CPU interpreter, plus a few PyTorch callables where a kernel would add nothing."""

from __future__ import annotations

import re
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
    assert "8 of them NaN on one side only" in reason
    assert "first at index (192,)" in reason


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
    assert "in 2 of 3 elements" in reason and "2 of them NaN on one side only" in reason
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
    assert reason is not None and reason.startswith("wrong result: out and alias differs")
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
