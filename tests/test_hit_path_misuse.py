"""The hit path as servers really use it, found by a stress review: constraints that read
arguments outside the key, calls laid out otherwise than the first (an optional pointer
given as None), a caller's ``cache`` write during a tuning, and a fork while another
thread tunes. CPU interpreter; real threads and a real fork."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import tunebook
from conftest import TESTS
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors


@triton.jit
def add_limited_kernel(x_ptr, y_ptr, out_ptr, n, LIMIT, BLOCK: tl.constexpr):
    """out = x + y; a call allows BLOCK <= LIMIT (a resource the key does not hold)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def add_typed_kernel(x_ptr, y_ptr, out_ptr, n, DT: tl.constexpr, BLOCK: tl.constexpr):
    """out = (x + y) rounded through DT."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x.to(DT).to(tl.float32), mask=mask)


class Limit(enum.IntEnum):
    SMALL = 32
    LARGE = 128


@triton.jit
def add_optional_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y, or x where y is None."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if y_ptr is not None:
        x += tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x, mask=mask)


def _replayed(replay: Replay, fn: object) -> tunebook.Autotuner:
    configs = block_configs(32, 64, 128)
    return tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(fn)


def _limited(key: list[str]) -> tuple[tunebook.Autotuner, Replay]:
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    space = tunebook.Space(BLOCK=[32, 64, 128], arg_constraints=[lambda c, a: c["BLOCK"] <= a["LIMIT"]])
    kernel = tunebook.autotune(space, key=key, do_bench=replay, pre_hook=replay.pre_hook)(add_limited_kernel)
    return kernel, replay


@pytest.mark.parametrize("key", [["n"], [tunebook.bucket("n", "pow2")]], ids=["plain", "bucketed"])
def test_a_hit_never_serves_a_config_the_calls_own_constraint_excludes(key: list[str]) -> None:
    """A constraint reading LIMIT (outside the key): the call with LIMIT=32 was served, on a
    hit, the BLOCK=64 decided for LIMIT=128 (the slow path served 32)."""
    kernel, _ = _limited(key)
    x, y, out = vectors(100)
    served = []
    for limit in (128, 32, 32, 128, 64, 32):
        out.fill_(float("nan"))
        kernel[grid_1d(100)](x, y, out, 100, limit)
        torch.testing.assert_close(out, x + y)
        served.append(kernel.best_config.kwargs["BLOCK"])
    assert served == [64, 32, 32, 64, 64, 32]
    assert tunebook.stats()["hits"] >= 3  # the repeats are hits, keyed on LIMIT's value


def test_values_that_are_not_builtin_scalars_key_hits_by_value_too() -> None:
    """From a review: an IntEnum or NumPy integer read by a constraint, or a Triton dtype
    given as a constexpr, was keyed by its class alone: every value shared one hit."""
    kernel, _ = _limited(["n"])
    x, y, out = vectors(100)
    served = []
    for limit in (Limit.LARGE, Limit.SMALL, Limit.SMALL, Limit.LARGE):
        kernel[grid_1d(100)](x, y, out, 100, limit)
        served.append(kernel.best_config.kwargs["BLOCK"])
    assert served == [64, 32, 32, 64]

    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    space = tunebook.Space(
        BLOCK=[32, 64, 128],
        arg_constraints=[lambda c, a: c["BLOCK"] <= (32 if a["DT"] == tl.float16 else 128)],
    )
    typed = tunebook.autotune(space, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_typed_kernel)
    served = []
    for dt in (tl.float32, tl.float16, tl.float16, tl.float32):
        typed[grid_1d(100)](x, y, out, 100, DT=dt)
        served.append(typed.best_config.kwargs["BLOCK"])
    assert served == [64, 32, 32, 64]


def test_in_serve_mode_too_a_hit_never_serves_an_excluded_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve mode answers a key from the book's entry without listing the Space: its
    constraint checks read LIMIT too."""
    tuned, _ = _limited([tunebook.bucket("n", "pow2")])
    x, y, out = vectors(100)
    tuned[grid_1d(100)](x, y, out, 100, 128)
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel, replay = _limited([tunebook.bucket("n", "pow2")])
    served = []
    for limit in (128, 32, 128, 32):
        kernel[grid_1d(100)](x, y, out, 100, limit)
        served.append(kernel.best_config.kwargs["BLOCK"])
    assert served == [64, 32, 64, 32] and replay.measured == []


def test_calls_laid_out_otherwise_than_the_first_are_hits_that_wait_for_no_tuning() -> None:
    """An optional pointer given as None: such calls went to the slow path at every call
    (about 10x a hit) and waited for the autotuner's lock, held by any other key's tuning."""
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = _replayed(replay, add_optional_kernel)
    x, y, out = vectors(100)
    kernel[grid_1d(100)](x, y, out, 100)
    kernel[grid_1d(100)](x, None, out, 100)  # decided (from the book: the key is the same)
    hits = tunebook.stats()["hits"]

    tuning, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # as a tuning of another key does, for its whole length
        with kernel._lock:
            tuning.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    tuning.wait(30)
    done = threading.Event()

    def call_without_y() -> None:
        out.fill_(float("nan"))
        kernel[grid_1d(100)](x, None, out, 100)
        kernel.run(x, None, out, 100, grid=grid_1d(100), warmup=False)
        done.set()

    caller = threading.Thread(target=call_without_y)
    caller.start()
    finished = done.wait(30)
    release.set()
    holder.join()
    caller.join()
    assert finished, "a decided call waited for another key's tuning"
    torch.testing.assert_close(out, x)
    assert tunebook.stats()["hits"] == hits + 2


@pytest.mark.parametrize("how", ["item", "whole"])
def test_a_cache_write_made_while_its_key_tunes_is_kept(how: str) -> None:
    """The write landed, then the tuning that ended wrote its own decision over it: the next
    call ran the tuner's config, though the key was marked as the caller's."""
    started, go_on = threading.Event(), threading.Event()

    class SlowReplay(Replay):
        def __call__(self, kernel_call, quantiles=None):
            started.set()
            go_on.wait(30)
            return super().__call__(kernel_call, quantiles)

    replay = SlowReplay({32: 3.0, 64: 1.0, 128: 2.0})
    kernel = _replayed(replay, add_kernel)
    x, y, out = vectors(100)
    tuner = threading.Thread(target=lambda: kernel[grid_1d(100)](x, y, out, 100))
    tuner.start()
    started.wait(30)
    key = (100, "torch.float32", "torch.float32", "torch.float32")
    if how == "item":
        writer = threading.Thread(target=lambda: kernel.cache.__setitem__(key, kernel.configs[2]))
    else:  # the setter swapped the dict outside the lock: the tuning wrote into the new one
        writer = threading.Thread(target=lambda: setattr(kernel, "cache", {key: kernel.configs[2]}))
    writer.start()
    go_on.set()
    tuner.join(30)
    writer.join(30)
    assert kernel.cache[key].kwargs == {"BLOCK": 128}
    kernel[grid_1d(100)](x, y, out, 100)
    assert kernel.best_config.kwargs == {"BLOCK": 128}


FORKING = """
import os, signal, sys, threading, time
import tunebook
from tunebook import _misses
from tunebook.kernels import _gemm_common
paged = sys.modules["tunebook.kernels.paged_attention_decode"]
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors

replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
    add_kernel
)
x, y, out = vectors(300)
kernel[grid_1d(100)](x, y, out, 100)  # warm
held, release = threading.Event(), threading.Event()

scratch = _gemm_common.Scratch("test", zeroed=False)

def tuning_elsewhere():  # holds the locks, as a warm-up thread tuning another key does
    with kernel._lock, paged._LAUNCH_LOCK, scratch._lock:
        held.set()
        release.wait(60)

threading.Thread(target=tuning_elsewhere, daemon=True).start()
held.wait(30)
_misses._queue.put(None)  # a miss the parent queued and its writer has not taken yet
pid = os.fork()
if pid == 0:
    signal.alarm(60)
    kernel[grid_1d(100)](x, y, out, 100)
    kernel[grid_1d(300)](x, y, out, 300)  # a new key: needs the lock
    assert paged._LAUNCH_LOCK.acquire(timeout=5) and scratch._lock.acquire(timeout=5), "a pack lock held"
    print("child tuned", kernel.best_config.kwargs, "queued", _misses._queue.unfinished_tasks, flush=True)
    start = time.monotonic()
    _misses.flush()
    print(f"child flushed in {time.monotonic() - start:.1f}s", flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
release.set()
_misses._queue.get(); _misses._queue.task_done()
print("child status", status, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_another_thread_tunes_tunes_its_own_keys(tmp_path: Path) -> None:
    """The child inherited the autotuner's lock held (its holder does not exist there): its
    first new key hung for ever. It also inherited the parent's queued misses (flushing them
    waited 5 s, for a writer it never runs)."""
    script = tmp_path / "forking.py"
    script.write_text(textwrap.dedent(FORKING))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert "child status 0" in res.stdout, (res.stdout, res.stderr[-2000:])
    assert "child tuned {'BLOCK': 64} queued 0" in res.stdout, res.stdout
    assert "child flushed in 0.0s" in res.stdout, res.stdout
