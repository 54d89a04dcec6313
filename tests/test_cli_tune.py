"""`tunebook tune` never reports success for work it lost: an unwritable book is refused up
front, and results a book refuses midway are kept in a file the message names."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tunebook
from conftest import book_files, only_entry
from small_kernels import grid_1d
from test_cli import invoke
from test_persistence import read_only
from test_serving import servekern  # noqa: F401  (a fixture)
from tunebook._book import read_document

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once

MODULE = """
import os, subprocess
import torch, triton, tunebook
import triton.language as tl
from small_kernels import add_kernel, grid_1d

def _lock_book(nargs):
    # The book becomes unwritable while the worker measures (a full disk, a remount).
    book = os.environ["TUNEBOOK_DIR"]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", book], check=True)
    else:
        os.chmod(book, 0o555)

def inputs(description):
    n = description["key"]["n"]
    if n == 13:
        raise ValueError("no inputs for n=13")
    if n == 17:
        return None  # not (grid, args, kwargs)
    if n == 19:
        n = 2 * n  # the arguments of another key
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}, pre_hook=_lock_book if os.environ.get("LOCK_BOOK") else None),
     triton.Config({"BLOCK": 64})],
    key=["n"],
    inputs=inputs,
)(add_kernel)

@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x, y = tl.load(x_ptr + offs, mask=mask), tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * scale + y, mask=mask)

def scaled_inputs(description):
    n, scale = description["key"]["n"], description["key"]["scale"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n, scale), {}

scaled_add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n", "scale"], inputs=scaled_inputs
)(_scaled_add_kernel)
"""


@pytest.fixture
def kernel_module(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module with a kernel whose inputs= factory lets `tune --keys` build its calls; it sits
    beside servekern's, where worker processes find it."""
    mods = request.getfixturevalue("servekern")
    name = f"{mods.name}_tune"
    (mods.dir / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)  # where a run that could not save leaves its results
    return name


def unlock(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o755)


def test_an_unwritable_book_is_refused_before_tuning(kernel_module: str, book_dir: Path) -> None:
    book_dir.mkdir()
    with read_only(book_dir):
        res = invoke("tune", f"{kernel_module}:add", "--keys", "n=256", ok=None)
    assert res.exit_code == 1, res.output
    assert "cannot write" in res.output and str(book_dir) in res.output and "TUNEBOOK_DIR" in res.output
    assert "done" not in res.output and "Traceback" not in res.output
    assert book_files(book_dir) == []
    with read_only(book_dir):  # a dry run lists the jobs, then says why the real run would stop
        dry = invoke("tune", f"{kernel_module}:add", "--keys", "n=256", "--dry-run", ok=None)
    assert dry.exit_code == 1 and "would tune 1 key(s)" in dry.output and "cannot write" in dry.output


def test_results_a_book_refuses_midway_are_kept_and_named(
    kernel_module: str, book_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book_dir.mkdir()
    monkeypatch.setenv("LOCK_BOOK", "1")
    try:
        res = invoke("tune", f"{kernel_module}:add", "--keys", "n=256", ok=None)
    finally:
        unlock(book_dir)
    assert res.exit_code == 1, res.output
    assert "1 of 1 key(s) tuned" not in res.output
    assert "2 result(s)" in res.output and "could not be written" in res.output
    (kept,) = tmp_path.glob("tunebook-unsaved-*")
    assert str(kept) in res.output and f"tunebook merge {kept} -o {book_dir}" in res.output
    assert book_files(book_dir) == []
    invoke("merge", kept, "-o", book_dir)  # the command the message gives
    entry = only_entry(book_dir)
    assert sorted(r.config["kwargs"]["BLOCK"] for r in entry.results.values() if r.ok) == [32, 64]


def test_progress_counts_failed_keys_apart_and_dry_run_says_would(kernel_module: str, book_dir: Path) -> None:
    dry = invoke("tune", f"{kernel_module}:add", "--keys", "n=256", "--keys", "n=13", "--dry-run")
    assert "would tune 2 key(s)" in dry.output and "tuning" not in dry.output
    res = invoke("tune", f"{kernel_module}:add", "--keys", "n=256", "--keys", "n=13", ok=None)
    assert res.exit_code == 1, res.output
    assert "1/2" in res.output and "1 failed" in res.output and "2/2" not in res.output
    assert "1 of 2 key(s) tuned" in res.output and "no inputs for n=13" in res.output


def test_inputs_of_another_key_or_of_no_call_fail_that_key_by_name(
    kernel_module: str, book_dir: Path
) -> None:
    """Found by a misuse review: arguments built for another key tuned that key and reported
    the asked one tuned (exit 0, run after run, its miss never answered); a factory returning
    None failed with "cannot unpack non-iterable NoneType object"."""
    res = invoke("tune", f"{kernel_module}:add", "--keys", "n=19", "--keys", "n=17", ok=None)
    assert res.exit_code == 1, res.output
    assert "0 of 2 key(s) tuned" in res.output, res.output
    assert "the call rebuilt for key n=19 is of key n=38" in res.output, res.output
    assert "inputs= returned NoneType None; it must return (grid, args, kwargs)" in res.output
    assert not book_files(book_dir)


def test_keys_of_several_names_are_tuned_and_each_name_is_asked_for_once(
    kernel_module: str, book_dir: Path
) -> None:
    """The usage text's own form, --keys M=16,N=4096: the whole text once went to the first
    name ({"n": "256,scale=2"}) and the worker failed with KeyError: 'scale'."""
    res = invoke("tune", f"{kernel_module}:scaled_add", "--keys", "n=256,scale=2", ok=None)
    assert res.exit_code == 0, res.output
    assert "1 of 1 key(s) tuned" in res.output
    entry = only_entry(book_dir)
    assert list(entry.key[:2]) == [256, 2] and len(entry.results) == 2
    for keys, said in (
        ("n=256", "scale missing"),
        ("n=256,n=8,scale=2", "n given twice"),
        ("n=256,scale=2,q=1", "q not in the kernel's key"),
    ):
        bad = invoke("tune", f"{kernel_module}:scaled_add", "--keys", keys, "--dry-run", ok=None)
        assert bad.exit_code == 2 and said in bad.output and "--keys n=...,scale=..." in bad.output, (
            bad.output
        )


def test_tune_with_stderr_closed_or_cut_short_still_tunes(kernel_module: str, book_dir: Path) -> None:
    """Found by a misuse review: `tunebook tune ... 2>&-` exited 1 having tuned nothing (the
    console asked a None stderr whether it was a terminal), and progress into a pipe whose
    reader had gone raised BrokenPipeError out of the kernel call."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TUNEBOOK_PROGRESS": "1"}
    closed = subprocess.run(
        [sys.executable, "-m", "tunebook", "tune", f"{kernel_module}:add", "--keys", "n=256"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=lambda: os.close(2),  # started with stderr closed: Python's sys.stderr is None
    )
    assert closed.returncode == 0, closed.stdout
    (path,) = book_files(book_dir)
    doc = read_document(path)
    assert doc is not None and len(next(iter(doc.entries.values())).results) == 2
    # A kernel call whose progress goes to a pipe that is closed at once.
    script = (
        f"import {kernel_module} as m, torch\n"
        "from small_kernels import grid_1d\n"
        "x = torch.randn(300); out = torch.empty(300)\n"
        "m.add[grid_1d(300)](x, x, out, 300)\n"
        "print('right' if torch.allclose(out, 2 * x) else 'wrong', flush=True)\n"
    )
    cut = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert cut.stderr is not None
    cut.stderr.close()  # the reader has gone before the first progress line
    stdout, _ = cut.communicate(timeout=300)
    assert cut.returncode == 0 and stdout.strip() == "right", stdout


MIXED_MODULE = """
import torch, tunebook, fakegpu
from small_kernels import add_kernel, grid_1d

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

bench = fakegpu.DeviceBench()
add = tunebook.autotune(bench.configs(), key=["n"], do_bench=bench, inputs=inputs)(add_kernel)
"""


def test_a_host_of_two_gpu_models_is_refused_and_one_model_tunes_its_own_misses(
    kernel_module: str, book_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An H100 (GPU 0) and an A100 (GPU 1), faked (tests/fakegpu.py): the run stops before any
    work, naming both models and CUDA_VISIBLE_DEVICES; with CUDA_VISIBLE_DEVICES=1 it lists and
    tunes the A100's own miss, and the H100's stays open for the H100."""
    import fakegpu

    fakegpu.install(["H100", "A100"], monkeypatch.setattr)
    name = f"{kernel_module}_mixed"
    (tmp_path / f"{name}.py").write_text(MIXED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    module = __import__(name)
    for index, n in ((1, 777), (0, 888)):  # serving processes record a miss on each GPU
        with fakegpu.device(index):
            x, out = torch.randn(n), torch.empty(n)
            module.add[grid_1d(n)](x, x, out, n)
    assert tunebook._misses.flush()
    sys.modules.pop(name, None)

    pythonpath = os.pathsep.join([fakegpu.SITE, str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "FAKEGPU": "H100,A100", "PYTHONPATH": pythonpath}
    env.pop("TUNEBOOK_MODE")

    def tune(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tunebook", "tune", "--misses", name, *args]
        return subprocess.run(command, capture_output=True, text=True, env={**env, **more}, timeout=300)

    refused = tune()
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        "this host has GPUs of 2 models (NVIDIA H100 80GB HBM3: GPU 0; NVIDIA A100-SXM4-80GB: GPU 1)" in said
    )
    assert "CUDA_VISIBLE_DEVICES=0 tunebook tune" in said and "tuning" not in refused.stdout
    a100 = tune(CUDA_VISIBLE_DEVICES="1")
    assert a100.returncode == 0, a100.stdout + a100.stderr
    assert "tuning 1 key(s) with 1 worker(s) on GPU(s) 1" in a100.stdout
    h100 = tune("--dry-run", CUDA_VISIBLE_DEVICES="0")
    assert "would tune 1 key(s)" in h100.stdout and "[888," in h100.stdout, h100.stdout
    tuned = {path.name.split("--")[2]: read_document(path) for path in book_files(book_dir)}
    assert {  # GPU -> n -> whether the key has results
        gpu: {text.strip("[").split(",")[0]: bool(entry.results) for text, entry in doc.entries.items()}
        for gpu, doc in tuned.items()
        if doc is not None
    } == {"NVIDIA-A100-SXM4-80GB": {"777": True}, "NVIDIA-H100-80GB-HBM3-90": {"888": False}}


# add_wrong_at_128_kernel computes x - y at BLOCK=128, the first config: the reference of
# check=, against which the correct configs are the wrong ones.
# check= comes from CHECKED_CHECK (JSON); inputs= for --keys (tests/test_ray_book.py).
CHECKED_MODULE = """
import json, os
import torch, triton, tunebook
from small_kernels import Replay, add_wrong_at_128_kernel, grid_1d

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

replay = Replay({32: 3.0, 64: 2.0, 128: 1.0})
add = tunebook.autotune(
    [triton.Config({"BLOCK": b}) for b in (128, 64, 32)],
    key=["n"],
    check=json.loads(os.environ["CHECKED_CHECK"]),
    do_bench=replay,
    pre_hook=replay.pre_hook,
    inputs=inputs,
)(add_wrong_at_128_kernel)
"""


def test_tune_judges_a_recorded_miss_again_when_its_check_settings_change_and_only_then(
    request: pytest.FixtureRequest, book_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tunebook tune --misses` listed only keys without a choice: a key whose wrong results
    were judged under other check= settings stayed as judged, run after run, where a kernel
    call in tune mode judges it again. And the warning that the reference may itself be wrong
    was said in the worker process, which nobody reads."""
    mods = request.getfixturevalue("servekern")  # a directory the workers import from
    name = f"{mods.name}_checked"
    (mods.dir / f"{name}.py").write_text(CHECKED_MODULE)

    def tune(check: Any) -> str:
        monkeypatch.setenv("CHECKED_CHECK", json.dumps(check))
        sys.modules.pop(name, None)  # the command imports the kernel again, with these settings
        return " ".join(invoke("tune", "--misses", name).output.split())

    monkeypatch.setenv("TUNEBOOK_MODE", "serve")  # a serving process records the miss
    monkeypatch.setenv("CHECKED_CHECK", "true")
    x, out = torch.randn(300), torch.empty(300)
    importlib.import_module(name).add[grid_1d(300)](x, x, out, 300)
    assert tunebook._misses.flush()
    monkeypatch.delenv("TUNEBOOK_MODE")

    first = tune(True)
    assert "1 of 1 key(s) tuned, 3 config(s) measured" in first, first
    assert "checked against the reference config BLOCK=128|" in first and "may itself be wrong" in first
    assert "nothing to tune" in tune(True)  # the same settings: nothing is judged again

    loose = tune({"rtol": 10.0, "atol": 10.0})
    assert "1 of 1 key(s) tuned, 3 config(s) measured" in loose, loose
    assert "may itself be wrong" not in loose
    entry = only_entry(book_dir)
    assert all(r.ok for r in entry.results.values()) and entry.best().startswith("BLOCK=128|")
    assert "nothing to tune" in tune({"rtol": 10.0, "atol": 10.0})
    declared = invoke("tune", f"{name}:add", "--keys", "n=300")  # the key, asked for by name
    assert "1 of 1 key(s) tuned, 0 config(s) measured" in " ".join(declared.output.split())
