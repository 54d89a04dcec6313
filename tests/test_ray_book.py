"""`tunebook tune --ray` and the book's platform pages, on a real local Ray cluster of two fake
GPUs (``num_gpus=2``: Ray sets each actor's ``CUDA_VISIBLE_DEVICES``, which tests/fakegpu.py
follows in the workers): GPUs that differ in SM count only are two platforms, and results a
book directory refuses partway through a sweep are kept aside and said so, never lost or
said lost at exit.

Kernels run in Triton's interpreter; only what tunebook reads about the device is faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import TESTS, book_files, only_entry
from test_cli import invoke
from test_cli_tune import CHECKED_MODULE
from tunebook._book import read_document

ray = pytest.importorskip("ray")
# Ray plumbing around the isolated worker (as test_ray_sweep.py): last Triton only (conftest.py).
pytestmark = pytest.mark.once

BLOCKS = [16, 32, 64, 128, 256, 512]
SRC = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's, in every process

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

# Measurements are logged ("n BLOCK"); once LOCK_AFTER of them are logged, the worker that
# logged the last one makes the book's page refuse every write (chattr +i as root, else
# chmod 555): a remount or a permission change in the middle of the sweep.
REFUSING_MODULE = """
import os, subprocess, time
from pathlib import Path
import torch, triton, tunebook
from small_kernels import Replay, add_kernel, grid_1d

def lock_the_page():
    try:
        fd = os.open(os.environ["RAYKERN_LOCKED"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    book = Path(os.environ["TUNEBOOK_DIR"])
    (page,) = [p for p in book.iterdir() if (p / "page.json").is_file()]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(page)], check=True)
    else:
        page.chmod(0o555)

class Logged(Replay):
    def __call__(self, kernel_call, quantiles=None):
        ms = super().__call__(kernel_call, quantiles)
        time.sleep(0.1)
        with open(os.environ["RAYKERN_LOG"], "a") as log:
            log.write(f"{self._current['n']} {self._current['BLOCK']}\\n")
        after = int(os.environ.get("RAYKERN_LOCK_AFTER", "0"))
        if after and len(open(os.environ["RAYKERN_LOG"]).read().splitlines()) >= after:
            lock_the_page()
        return ms

replay = Logged({b: 1.0 + abs(b - 128) / 100 for b in BLOCKS})

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

configs = [triton.Config({"BLOCK": b}) for b in BLOCKS]
add = tunebook.autotune(
    configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook, inputs=inputs
)(add_kernel)
""".replace("BLOCKS", repr(BLOCKS))


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
    path = [*site, SRC, str(TESTS), str(directory), os.environ.get("PYTHONPATH", "")]
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


@pytest.mark.slow
def test_results_the_book_refuses_partway_through_a_ray_sweep_are_kept_and_said_so(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, book_dir: Path
) -> None:
    """`tune --ray` checks what the driver persisted against the book at the end: what the
    directory refused (a remount partway through the sweep) is kept in tunebook-unsaved-*,
    said with the command to merge it, exit 1; the exit does not call it lost."""
    name = _module(tmp_path, monkeypatch, REFUSING_MODULE)
    log = tmp_path / "measured.log"
    monkeypatch.setenv("RAYKERN_LOG", str(log))
    invoke("tune", f"{name}:add", "--keys", "n=100")  # the page is there, with key 100
    (page,) = book_files(book_dir)
    log.unlink()
    keys = [300, 400, 500]
    env = {**os.environ, "RAYKERN_LOCK_AFTER": "4", "RAYKERN_LOCKED": str(tmp_path / "locked")}
    command = [sys.executable, "-m", "tunebook", "tune", f"{name}:add", "--ray", cluster, "--unit-size", "2"]
    command += [arg for n in keys for arg in ("--keys", f"n={n}")]
    try:
        res = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        if (tmp_path / "locked").exists():
            _unwritable(page, False)
    said = " ".join(res.stderr.split())
    assert (tmp_path / "locked").exists(), said  # the page refused writes from the 4th result on
    assert res.returncode == 1, res.stdout + said
    assert "done: 3 of 3 key(s) tuned" in res.stdout, res.stdout
    (kept,) = tmp_path.glob("tunebook-unsaved-*")
    assert f"They are kept in {kept}" in said and f"tunebook merge {kept} -o {book_dir}" in said, said
    assert "were not written to the book" not in said and "lost" not in said, said
    # The sweep itself called them "held by this process only" and said to keep them with
    # `tunebook tune --ray`, the very command that then kept them.
    assert "held by this process only" not in said and said.count("result(s)") == 1, said
    # Nothing measured is lost: the book and what was kept hold every result, once.
    measured = Counter(tuple(map(int, line.split())) for line in log.read_text().splitlines())
    assert set(measured) == {(n, b) for n in keys for b in BLOCKS} and set(measured.values()) == {1}
    unsaved = read_document(next(p for p in book_files(kept)))
    assert unsaved is not None and unsaved.entries
    invoke("merge", kept, "-o", book_dir)
    doc = read_document(page)
    assert doc is not None
    assert {e.key[0]: len(e.results) for e in doc.entries.values()} == {n: len(BLOCKS) for n in [100, *keys]}


@pytest.mark.slow
def test_a_ray_sweep_judges_a_key_again_when_its_check_settings_change_and_only_then(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, book_dir: Path
) -> None:
    """The sweep's plan decided without the rule that a miss in tune mode applies: a key whose
    wrong results were judged under other check= settings kept them, run after run. And the
    warning that the reference may itself be wrong stayed in the worker process."""
    name = _module(tmp_path, monkeypatch, CHECKED_MODULE)  # add_wrong_at_128_kernel, BLOCK=128 first

    def sweep(check: Any) -> str:
        monkeypatch.setenv("CHECKED_CHECK", json.dumps(check))
        sys.modules.pop(name, None)  # imported again, with these settings, here and in the workers
        return " ".join(invoke("tune", f"{name}:add", "--keys", "n=100", "--ray").output.split())

    strict = sweep(True)
    assert "1 of 1 key(s) tuned" in strict and "3 config(s) measured" in strict, strict
    assert "may itself be wrong" in strict and "reference config BLOCK=128|" in strict, strict
    loose = sweep({"rtol": 10.0, "atol": 10.0})
    assert "3 config(s) measured" in loose and "may itself be wrong" not in loose, loose
    entry = only_entry(book_dir)
    assert all(r.ok for r in entry.results.values()) and entry.best().startswith("BLOCK=128|")
    assert "0 config(s) measured" in sweep({"rtol": 10.0, "atol": 10.0})
