"""`tunebook tune --ray` and the book's platform pages, on a real local Ray cluster of two fake
GPUs (``num_gpus=2``: Ray sets each actor's ``CUDA_VISIBLE_DEVICES``, which tests/fakegpu.py
follows in the workers): GPUs that differ in SM count only are two platforms.

Kernels run in Triton's interpreter; only what tunebook reads about the device is faked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import TESTS, book_files
from test_cli import invoke
from tunebook._book import read_document

ray = pytest.importorskip("ray")
# Ray plumbing around the isolated worker (as test_ray_sweep.py): last Triton only (conftest.py).
pytestmark = pytest.mark.once

BLOCKS = [16, 32, 64, 128, 256, 512]

# The H100 of tests/fakegpu.py (132 SMs) and one of the same name and arch with 114.
FAKE = "H100,H100-114"

SM_MODULE = """
import torch, tunebook, fakegpu
from small_kernels import add_kernel, grid_1d

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

bench = fakegpu.DeviceBench()
add = tunebook.autotune(bench.configs(), key=["n"], do_bench=bench, inputs=inputs)(add_kernel)
"""


@pytest.fixture(scope="module")
def cluster() -> Any:
    """One local Ray cluster for the module: 2 CPUs and 2 GPUs that Ray hands out by index."""
    ray.init(
        num_cpus=2,
        num_gpus=2,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, *site: str) -> str:
    """``text`` as a module importable here and by the workers (``site``: more on their path)."""
    directory = tmp_path / "mods"
    directory.mkdir(exist_ok=True)
    name = f"raybook_{os.getpid()}_{len(list(tmp_path.parent.iterdir()))}"
    (directory / f"{name}.py").write_text(text)
    path = [*site, str(TESTS), str(directory), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.chdir(tmp_path)
    return name


def _unwritable(path: Path, on: bool) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)


@pytest.mark.slow
def test_gpus_that_differ_in_sm_count_only_are_refused_together_and_tuned_a_page_each(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, book_dir: Path
) -> None:
    """Grouped by name and arch, the two were one model: a key planned on one had the other's
    timings filed in its page (the platform's id covers the SM count)."""
    import fakegpu

    name = _module(tmp_path, monkeypatch, SM_MODULE, fakegpu.SITE)
    monkeypatch.setenv("FAKEGPU", FAKE)  # the workers' (fakegpu_site); the driver stays as it is
    keys = ["--keys", "n=100", "--keys", "n=200"]
    refused = invoke("tune", f"{name}:add", *keys, "--ray", ok=False)
    said = " ".join(refused.output.split())
    assert "GPUs of 2 models" in said and "they differ in SM count" in said, said
    assert "132 SMs" in said and "114 SMs" in said and "--each-model" in said, said
    assert book_files(book_dir) == []

    swept = invoke("tune", f"{name}:add", *keys, "--ray", "--each-model")
    assert "done: 4 of 4 key(s) tuned" in swept.output, swept.output
    docs = [read_document(path) for path in book_files(book_dir)]
    assert sorted(d.platform["sm_count"] for d in docs if d is not None) == [114, 132]
    for doc in docs:
        assert doc is not None and sorted(e.key[0] for e in doc.entries.values()) == [100, 200]
        assert all(e.best().startswith("BLOCK=256|") for e in doc.entries.values())  # the H100's
