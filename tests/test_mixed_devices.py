"""One process, GPUs of two models (an H100 as cuda:0, an A100 as cuda:1, faked by
tests/fakegpu.py): each call is looked up, measured and filed under the platform of the
device it runs on, and a host of one model keeps its hit path free of device checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fakegpu
import tunebook
from small_kernels import add_kernel, grid_1d
from tunebook._hits import HitTable

H100, A100 = fakegpu.GPUS["H100"]["name"], fakegpu.GPUS["A100"]["name"]


def call(kernel: Any, n: int) -> int:
    x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)
    return kernel.best_config.kwargs["BLOCK"]


def pages(book_dir: Path) -> dict[str, list[int]]:
    """GPU name -> the n of every key its page of the book holds."""
    found: dict[str, list[int]] = {}
    for gpu in (H100, A100):
        kernel = tunebook.autotune(
            fakegpu.DeviceBench().configs(), key=["n"], do_bench=fakegpu.DeviceBench()
        )(add_kernel)
        with fakegpu.device(0 if gpu == H100 else 1):
            found[gpu] = sorted(int(text.strip("[").split(",")[0]) for text in kernel.page().key_names())
    return found


def entry_of(kernel: Any, n: int) -> Any:
    """The current device's page's entry of key ``n``."""
    page = kernel.page()
    (text,) = [t for t in page.key_names() if t.strip("[").split(",")[0] == str(n)]
    return page.get(text)


def kernel_on(bench: fakegpu.DeviceBench, **options: Any) -> Any:
    return tunebook.autotune(bench.configs(), key=["n"], do_bench=bench, **options)(add_kernel)


def test_each_gpu_model_gets_its_own_page_decisions_and_measurements(monkeypatch, book_dir):
    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    bench = fakegpu.DeviceBench()
    kernel = kernel_on(bench)
    with fakegpu.device(0):
        assert call(kernel, 300) == 256  # the H100's best
    with fakegpu.device(1):
        assert call(kernel, 300) == 32  # measured on the A100, not the H100's decision served
        assert call(kernel, 5000) == 32
        assert call(kernel, 300) == 32  # a hit: this device's table
        assert kernel.page().platform["device"] == A100
    with fakegpu.device(0):
        assert call(kernel, 300) == 256  # and the H100's hit is the H100's still
    assert {gpu for gpu, _ in bench.log[:4]} == {H100} and {gpu for gpu, _ in bench.log[4:]} == {A100}
    assert pages(book_dir) == {H100: [300], A100: [300, 5000]}
    stats = tunebook.stats()
    assert stats["hits"] == 2 and stats["misses"] == 3  # one kernel's counters, every device

    # A later process of one model serves its own model's winners, never the other's.
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    later = kernel_on(fakegpu.DeviceBench())
    with fakegpu.device(0):
        tunebook.reset_stats()
        assert call(later, 300) == 256
        assert call(later, 5000) == 256  # nearest key on this H100's page (n=300), not the A100's 32
        assert tunebook.stats()["misses"] == 1


def test_a_config_that_fails_on_one_model_is_failed_on_that_models_page_only(monkeypatch, book_dir):
    """An A100 lacks the shared memory the H100 gives BLOCK=256: its failure must not stop
    H100s from measuring that config for the key."""
    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    from triton.runtime.errors import OutOfResources

    def smem(gpu: str, block: int) -> BaseException | None:
        return (
            OutOfResources(200 * 1024, 164 * 1024, "shared memory") if gpu == A100 and block == 256 else None
        )

    kernel = kernel_on(fakegpu.DeviceBench(fail=smem))
    with fakegpu.device(0):
        call(kernel, 300)
    with fakegpu.device(1):
        assert call(kernel, 5000) == 32
        failed = [cid for cid, r in entry_of(kernel, 5000).results.items() if not r.ok]
        assert len(failed) == 1 and "BLOCK=256" in failed[0]
    with fakegpu.device(0):
        assert call(kernel, 5000) == 256  # measured here, and the best here
    assert pages(book_dir) == {H100: [300, 5000], A100: [5000]}


def test_a_space_is_filtered_for_the_platform_of_the_device_it_runs_on(monkeypatch, book_dir):
    """num_ctas > 1 exists from sm_90 on: offered on the H100, never on the A100, whichever
    device the kernel's first call ran on."""
    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    kernel = tunebook.autotune(
        tunebook.Space(BLOCK=[32, 64], num_ctas=[1, 2]), key=["n"], do_bench=fakegpu.DeviceBench()
    )(add_kernel)
    ctas = {}
    for index in (1, 0):
        with fakegpu.device(index):
            x, y, out = torch.randn(300), torch.randn(300), torch.empty(300)
            kernel[grid_1d(300)](x, y, out, 300)
            results = entry_of(kernel, 300).results.values()
            ctas[index] = sorted({r.config["num_ctas"] for r in results})
    assert ctas == {0: [1, 2], 1: [1]}


def test_isolated_tuning_is_filed_under_the_workers_gpu_only(monkeypatch, book_dir, tmp_path):
    """isolate=True: the worker runs on the current GPU and the parent keeps its results in
    that GPU's page, not in the page of the GPU the kernel first ran on."""
    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    name = f"mixed_iso_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "import torch, tunebook, fakegpu\n"
        "from small_kernels import add_kernel, grid_1d\n"
        "def inputs(d):\n"
        "    n = d['key']['n']\n"
        "    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}\n"
        "bench = fakegpu.DeviceBench()\n"
        "add = tunebook.autotune(\n"
        "    bench.configs(), key=['n'], do_bench=bench, isolate=True, inputs=inputs\n"
        ")(add_kernel)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(fakegpu.SITE)  # the worker's PYTHONPATH is this sys.path
    monkeypatch.setenv("FAKEGPU", "H100,A100")
    module = __import__(name)
    try:
        with fakegpu.device(0):
            assert call(module.add, 300) == 256
        with fakegpu.device(1):
            assert call(module.add, 5000) == 32
    finally:
        sys.modules.pop(name, None)
    assert pages(book_dir) == {H100: [300], A100: [5000]}


@pytest.mark.parametrize("gpus", [["H100", "H100"], None])
def test_a_host_of_one_model_never_asks_for_the_device_on_a_hit(monkeypatch, gpus):
    """Two GPUs of one model (and the interpreter): the kernel keeps its one hit table, and
    a hit runs without reading the current device."""
    if gpus is not None:
        fakegpu.install(gpus, monkeypatch.setattr)
    bench = fakegpu.DeviceBench()
    kernel = kernel_on(bench) if gpus else tunebook.autotune(bench.configs(), key=["n"])(add_kernel)
    call(kernel, 300)
    assert type(kernel._hits) is HitTable

    def no_device() -> int:
        raise AssertionError("a hit asked for the current device")

    monkeypatch.setattr(torch.cuda, "current_device", no_device)
    hits = tunebook.stats()["hits"]
    call(kernel, 300)
    assert tunebook.stats()["hits"] == hits + 1


class _NanOnA100(fakegpu.DeviceBench):
    """The A100's timer returns NaN (nothing runs there); the H100's times as usual."""

    inside = False  # whether a timing is under way (its launches are not the call's own)

    def __call__(self, fn: Any, quantiles: Any = None, **kwargs: Any) -> Any:
        _NanOnA100.inside = True
        try:
            out = super().__call__(fn, quantiles, **kwargs)
        finally:
            _NanOnA100.inside = False
        if fakegpu.current()["name"] == A100:
            return [float("nan")] * 3 if quantiles else float("nan")
        return out


def test_no_config_ran_on_one_gpu_is_not_said_of_a_launch_failure_on_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    bench = _NanOnA100()
    kernel = tunebook.autotune(bench.configs((256, 32, 64, 128)), key=["n"], do_bench=bench)(add_kernel)
    x, y, out = torch.randn(300), torch.randn(300), torch.empty(300)
    with fakegpu.device(1), pytest.warns(tunebook.BookWarning, match="none of the 4 configs"):
        kernel[grid_1d(300)](x, y, out, 300)  # the A100: no timing, the first config launched
    real_run = kernel.fn.run

    def run(*args: Any, **kwargs: Any) -> Any:  # the H100's own launch fails; its timings do not
        if not _NanOnA100.inside:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(kernel.fn, "run", run)
    with fakegpu.device(0), pytest.raises(RuntimeError, match="illegal memory access") as raised:
        kernel[grid_1d(300)](x, y, out, 300)  # every config ran here: the launch's own error
    assert not isinstance(raised.value, tunebook.TuningFailed)
