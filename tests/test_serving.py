"""Serving without stalls: bucketing, fallback=, recorded misses, offline `tunebook tune`,
and crash-isolated tuning in worker processes (real kernels, CPU interpreter)."""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import triton
from click.testing import CliRunner

import tunebook
from conftest import TESTS, book_files, run_python
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook import _misses, _worker
from tunebook._book import read_document
from tunebook.cli import _app

MODULE = """
import os, signal, time
import torch, triton, tunebook
from small_kernels import add_kernel, grid_1d

BAD = os.environ.get("SERVEKERN_BAD", "")

def _crash(nargs):
    os.kill(os.getpid(), signal.SIGSEGV)  # what an illegal memory access does to a process

def _hang(nargs):
    time.sleep(3600)

def _sticky(nargs):
    # What torch raises after an illegal memory access: the process lives, its CUDA context not.
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def inputs(description):
    n = description["key"]["n"] if description["call"] is None else description["call"]["args"][3]["value"]
    x, y = torch.randn(n), torch.randn(n)
    return grid_1d(n), (x, y, torch.empty(n), n), {}

add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}),
     triton.Config({"BLOCK": 64}, pre_hook={"crash": _crash, "sticky": _sticky}.get(BAD.split(",")[0])),
     triton.Config({"BLOCK": 128}, pre_hook=_hang if "hang" in BAD else None)],
    key=[tunebook.bucket("n", "pow2")],
    inputs=inputs if os.environ.get("SERVEKERN_INPUTS") else None,
    isolate=bool(os.environ.get("SERVEKERN_ISOLATE")),
    isolate_timeout=float(os.environ.get("SERVEKERN_TIMEOUT", "60")),
)(add_kernel)
"""

_names = itertools.count()
# The hang timeout of the tests with a hanging config, which each wait it out. The silence
# it measures includes a worker's start-up (Python, torch, the kernel's module: about 3 s
# on CI's 2 cores, with nothing else running), hence 4 times that.
HANG_S = "12"


@pytest.fixture
def servekern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write the kernel module; worker processes find it (and tests/small_kernels.py) on PYTHONPATH."""
    directory = tmp_path / "mods"
    directory.mkdir()
    name = f"servekern_{os.getpid()}_{next(_names)}"
    (directory / f"{name}.py").write_text(MODULE)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), str(directory), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(directory))

    def load(**env: str):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    load.name = name  # type: ignore[attr-defined]
    load.dir = directory  # type: ignore[attr-defined]
    return load


def call(kernel, n: int) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def only_doc(book_dir: Path):
    (path,) = book_files(book_dir)
    return read_document(path)


def test_bucketed_key_tunes_once_per_bucket(book_dir):
    replay = Replay({32: 2.0, 64: 1.0, 128: 3.0})
    kernel = tunebook.autotune(
        block_configs(32, 64, 128),
        key=[tunebook.bucket("n", "pow2")],
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )(add_kernel)
    for n in (100, 120, 128, 65):
        call(kernel, n)  # all in the bucket of 128
    assert len(replay.measured) == 3
    call(kernel, 129)  # bucket 256
    assert len(replay.measured) == 6
    doc = only_doc(book_dir)
    assert sorted(e.key[0] for e in doc.entries.values()) == [128, 256]
    assert doc.kernel["key"] == ["n|pow2"]


def test_bucket_edges_and_a_new_bucketing_is_a_new_page(book_dir):
    replay = Replay({32: 2.0, 64: 1.0, 128: 3.0})
    edges = tunebook.autotune(
        block_configs(32, 64, 128),
        key=[tunebook.bucket("n", [64, 512])],
        do_bench=replay,
        pre_hook=replay.pre_hook,
    )(add_kernel)
    for n in (10, 64, 65, 400, 5000):
        call(edges, n)
    assert len(replay.measured) == 6  # buckets 64 and 512
    call(
        tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
            add_kernel
        ),
        64,
    )
    assert len(book_files(book_dir)) == 2


def test_fallback_callable_is_used_in_serve_mode(monkeypatch, caplog):
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    seen = []

    def pick(key, configs):
        seen.append((key, len(configs)))
        return configs[2]

    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"], fallback=pick)(add_kernel)
    call(kernel, 300)
    assert kernel.best_config.kwargs == {"BLOCK": 128}
    assert seen == [((300, "torch.float32", "torch.float32", "torch.float32"), 3)]
    assert tunebook.stats()["benchmarked"] == 0

    stray = tunebook.autotune(
        block_configs(32, 64), key=["n"], fallback=lambda k, c: triton.Config({"BLOCK": 7})
    )(add_kernel)
    with caplog.at_level(logging.WARNING, logger="tunebook"):
        call(stray, 300)
    assert stray.best_config.kwargs == {"BLOCK": 32}  # the stray config is never launched
    assert any("not one of the kernel's configs" in r.message for r in caplog.records)


def test_prefer_nearest_serves_a_neighbour_before_the_fallback(monkeypatch, book_dir, tmp_path):
    """With prefer_nearest=True a key the book lacks takes the nearest tuned key's winner, and
    fallback= is asked only where the kernel has nothing comparable remembered (the kernel
    pack's rule). Timings are replayed, so the winner (BLOCK=64) is known."""
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    timer = {"do_bench": replay, "pre_hook": replay.pre_hook}  # the timer is part of the platform
    call(tunebook.autotune(block_configs(32, 64, 128), key=["n"], **timer)(add_kernel), 300)
    asked = []

    def pick(key, configs):  # the first config: neither the winner nor what serve mode runs untold
        asked.append(key[0])
        return next(c for c in configs if c.kwargs["BLOCK"] == 128)

    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    tunebook.reset_stats()
    for prefer, expected, n in ((True, 64, 400), (False, 128, 500)):
        configs = block_configs(32, 64, 128)
        kernel = tunebook.autotune(configs, key=["n"], fallback=pick, prefer_nearest=prefer, **timer)(
            add_kernel
        )
        call(kernel, n)
        assert kernel.best_config.kwargs == {"BLOCK": expected}, f"prefer_nearest={prefer}"
    assert asked == [500]  # not asked where the nearest key answered
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "empty"))
    alone = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], fallback=pick, prefer_nearest=True, **timer
    )(add_kernel)
    call(alone, 400)
    assert alone.best_config.kwargs == {"BLOCK": 128} and asked == [500, 400]  # nothing remembered
    assert tunebook.stats()["benchmarked"] == 0


def test_serve_mode_never_launches_a_config_the_keys_results_rule_out(monkeypatch, book_dir, tmp_path):
    """A key whose tuning ended before any config ran (a killed process) holds only
    failures: serve mode launched the first config, which the key records as unable to run
    here, and the call failed. It serves the first config not ruled out."""
    from tunebook._book import Entry, Result

    call(tunebook.autotune(block_configs(128, 64, 32), key=["n"])(add_kernel), 300)  # the key's text and ids
    tuned = tunebook.autotune(block_configs(128, 64, 32), key=["n"])(add_kernel).page()
    (text,) = tuned.key_names()
    entry = tuned.get(text)
    assert entry is not None
    ids = {r.config["kwargs"]["BLOCK"]: cid for cid, r in entry.results.items()}
    cannot = "OutOfResources: out of resource: shared memory"
    wrong = "WrongResult: wrong result: out_ptr differs from the reference config"
    failed = {
        ids[b]: Result(entry.results[ids[b]].config, None, why) for b, why in ((128, cannot), (64, wrong))
    }
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "killed"))
    served = tunebook.autotune(block_configs(128, 64, 32), key=["n"])(add_kernel)
    served.page().record(text, Entry(key=entry.key, results=failed))
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    call(served, 300)
    assert served.best_config.kwargs == {"BLOCK": 32}
    assert tunebook.stats()["benchmarked"] == 3  # the first tuning's; serve measured nothing


def test_serve_mode_records_replayable_misses(monkeypatch, book_dir):
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"])(add_kernel)
    call(kernel, 300)
    call(kernel, 300)  # served from memory: recorded once
    again = tunebook.autotune(block_configs(32, 64, 128), key=["n"])(
        add_kernel
    )  # a second autotuner meets the same miss
    call(again, 300)
    assert _misses.flush()
    (entry,) = only_doc(book_dir).entries.values()
    assert entry.misses == 2 and not entry.results
    call_desc = entry.call
    x = call_desc["args"][0]["tensor"]
    assert x == {"shape": [300], "stride": [1], "dtype": "torch.float32", "device": "cpu"}
    assert call_desc["args"][3] == {"value": 300}
    grids = sorted(tuple(g) for g in call_desc["grids"].values())
    assert grids == [(3, 1, 1), (5, 1, 1), (10, 1, 1)]  # cdiv(300, 128), cdiv(300, 64), cdiv(300, 32)


def test_serve_mode_records_no_misses_where_told_not_to(monkeypatch, book_dir):
    """TUNEBOOK_RECORD_MISSES=0: for deployments that never run `tune --misses`, or whose book
    directory is read-only by design (whose refusal was said at every process's exit)."""
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    monkeypatch.setenv("TUNEBOOK_RECORD_MISSES", "0")
    kernel = tunebook.autotune(block_configs(32, 64, 128), key=["n"])(add_kernel)
    call(kernel, 300)
    assert _misses.flush()
    assert book_files(book_dir) == []
    monkeypatch.setenv("TUNEBOOK_RECORD_MISSES", "maybe")
    with pytest.raises(tunebook.ConfigurationError, match="TUNEBOOK_RECORD_MISSES"):
        tunebook.autotune(block_configs(32, 64, 128), key=["n"])(add_kernel)


@pytest.mark.slow
def test_tune_misses_offline_then_serve_without_fallback(servekern, monkeypatch, book_dir):
    module = servekern(TUNEBOOK_MODE="serve")
    call(module.add, 300)
    call(module.add, 1000)
    assert _misses.flush()
    runner = CliRunner()
    result = runner.invoke(_app.cli, ["tune", "--misses", servekern.name], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 of 2 key(s) tuned" in result.output
    doc = only_doc(book_dir)
    assert all(e.chosen and len(e.results) == 3 for e in doc.entries.values())
    # Interrupted or not, running it again finds nothing left to do.
    again = runner.invoke(_app.cli, ["tune", "--misses", servekern.name], catch_exceptions=False)
    assert "nothing to tune" in again.output
    served = run_python(
        f"""
        import json, tunebook, torch
        from small_kernels import grid_1d, vectors
        import {servekern.name} as m
        for n in (300, 1000, 999):
            x, y, out = vectors(n)
            m.add[grid_1d(n)](x, y, out, n)
            assert torch.allclose(out, x + y)
        print(json.dumps(tunebook.stats()))
        """,
        env={"TUNEBOOK_MODE": "serve"},
        cwd=servekern.dir,
    )
    assert served["fallbacks"] == 0 and served["benchmarked"] == 0 and served["hits"] == 3


@pytest.mark.slow
def test_tune_declared_keys_needs_and_uses_inputs(servekern, book_dir):
    servekern()
    runner = CliRunner()
    missing = runner.invoke(_app.cli, ["tune", f"{servekern.name}:add", "--keys", "n=256"])
    assert missing.exit_code != 0 and "no inputs= factory" in missing.output
    servekern(SERVEKERN_INPUTS="1")
    ok = runner.invoke(
        _app.cli,
        ["tune", f"{servekern.name}:add", "--keys", "n=256", "--keys", "n=2000"],
        catch_exceptions=False,
    )
    assert ok.exit_code == 0, ok.output
    keys = sorted(e.key[0] for e in only_doc(book_dir).entries.values())
    assert keys == [256, 2048]  # bucketed as the kernel declares


@pytest.mark.slow
def test_crashing_and_hanging_configs_are_recorded_and_tuning_goes_on(servekern, book_dir):
    module = servekern(TUNEBOOK_MODE="serve", SERVEKERN_BAD="crash,hang")
    call(module.add, 300)
    assert _misses.flush()
    result = CliRunner().invoke(
        _app.cli, ["tune", "--misses", servekern.name, "--timeout", HANG_S], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    (entry,) = only_doc(book_dir).entries.values()
    reasons = {r.config["kwargs"]["BLOCK"]: r.error for r in entry.results.values()}
    assert reasons[32] is None
    assert "died" in reasons[64] and "SIGSEGV" in reasons[64]
    assert "timed out" in reasons[128]
    assert entry.best().startswith("BLOCK=32|")
    assert "2 config(s) recorded as crashed or hung" in result.output


@pytest.mark.slow
def test_a_config_that_poisons_the_gpu_context_restarts_the_worker(servekern, book_dir):
    module = servekern(TUNEBOOK_MODE="serve", SERVEKERN_BAD="sticky")
    call(module.add, 300)
    assert _misses.flush()
    result = CliRunner().invoke(_app.cli, ["tune", "--misses", servekern.name], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (entry,) = only_doc(book_dir).entries.values()
    reasons = {r.config["kwargs"]["BLOCK"]: r.error for r in entry.results.values()}
    # The real reason is kept (not "worker died"), and the configs after it ran in a fresh worker.
    assert "illegal memory access" in reasons[64]
    assert reasons[32] is None and reasons[128] is None
    assert "restarted" in result.output and "exit code 3" in result.output


@pytest.mark.slow
def test_isolate_option_keeps_the_calling_process_alive(servekern, book_dir):
    module = servekern(SERVEKERN_BAD="crash,hang", SERVEKERN_ISOLATE="1", SERVEKERN_TIMEOUT=HANG_S)
    call(module.add, 200)  # would kill this test process without isolation
    assert module.add.best_config.kwargs == {"BLOCK": 32}
    (entry,) = only_doc(book_dir).entries.values()
    assert sum(1 for r in entry.results.values() if not r.ok) == 2
    call(module.add, 200)  # remembered: no worker this time
    assert module.add.best_config.kwargs == {"BLOCK": 32}


def test_isolate_needs_an_importable_kernel():
    kernel = tunebook.autotune(block_configs(32, 64), key=["n"], isolate=True)(add_kernel)
    with pytest.raises(tunebook.ConfigurationError, match="importable module"):
        call(kernel, 100)


def test_the_first_persisted_winner_stands_for_every_process(book_dir, monkeypatch):
    """Two processes tune one key at once; whoever persists second adopts the first's winner."""
    a_replay, b_replay = Replay({32: 1.0, 64: 2.0, 128: 3.0}), Replay({32: 3.0, 64: 1.0, 128: 2.0})
    a = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=a_replay, pre_hook=a_replay.pre_hook
    )(add_kernel)
    b = tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=b_replay, pre_hook=b_replay.pre_hook
    )(add_kernel)
    call(b, 64)  # b's page is open; it has not seen key 300
    call(a, 300)  # a tunes 300 and persists first
    # b started measuring 300 before a's write landed: it does not see it until it persists.
    monkeypatch.setattr(type(b.page()), "refresh", lambda self, *args, **kwargs: None)
    call(b, 300)
    assert len(b_replay.measured) == 6  # b really measured the key itself
    assert a.best_config.kwargs == b.best_config.kwargs == {"BLOCK": 32}
    (entry,) = [e for e in only_doc(book_dir).entries.values() if e.key[0] == 300]
    assert entry.results[entry.best()].median == 1.0  # a's measurements stand on disk


def test_a_bucket_never_serves_a_config_the_calls_own_constraints_exclude(book_dir):
    from test_tuning import Landscape

    land = Landscape(lambda cfg: 1000.0 / cfg["BLOCK"])  # bigger blocks are faster
    space = tunebook.Space(
        BLOCK=[32, 64, 256, 1024], num_warps=[4], arg_constraints=[lambda c, a: c["BLOCK"] <= a["n"]]
    )
    kernel = tunebook.autotune(
        space, key=[tunebook.bucket("n", [128, 4096])], do_bench=land, pre_hook=land.pre_hook
    )(add_kernel)
    call(kernel, 4000)
    assert kernel.best_config.kwargs == {"BLOCK": 1024}
    call(kernel, 300)  # same bucket (4096), but BLOCK must stay <= 300 for this call
    assert kernel.best_config.kwargs == {"BLOCK": 256}
    call(kernel, 4000)
    assert kernel.best_config.kwargs == {"BLOCK": 1024}


@pytest.mark.slow
def test_isolate_works_when_the_book_cannot_be_written(servekern, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TUNEBOOK_DIR", str(blocker / "book"))  # cannot be created
    module = servekern(SERVEKERN_ISOLATE="1")
    with pytest.warns(tunebook.BookWarning, match="cannot write"):
        call(module.add, 200)  # the worker's results come back over its pipe
    (entry,) = module.add.page().entries.values()  # kept in this process, since no book takes them
    assert len(entry.results) == 3 and all(r.ok for r in entry.results.values())
    assert module.add.config_index.id_of(module.add.best_config) == entry.best()  # the measured winner

    def no_worker(*args, **kwargs):
        raise AssertionError("a second worker was started for a key tuned already")

    monkeypatch.setattr(_worker, "run_jobs", no_worker)
    monkeypatch.setattr("tunebook._worker.isolated.run_jobs", no_worker)
    call(module.add, 200)  # remembered in memory


def test_call_descriptions_from_a_book_are_bounded():
    from tunebook._calls import validate

    def tensor(shape, stride):
        return {"tensor": {"shape": shape, "stride": stride, "dtype": "torch.float16", "device": "cuda"}}

    assert validate({"args": [tensor([4096, 4096], [4096, 1])], "kwargs": {}}, "c") is None
    # 2 elements, but a stride that would make building it allocate 8 TiB
    assert "larger than" in validate({"args": [tensor([2, 1], [2**40 - 1, 1])], "kwargs": {}}, "c")
    many = [tensor([2**33], [1])] * 3  # each allowed, together too much
    assert "together" in validate({"args": many, "kwargs": {}}, "c")
    assert "unknown kind" in validate({"args": [{"code": "import os"}], "kwargs": {}}, "c")
