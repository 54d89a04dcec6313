"""The benchmark scripts run end to end, and the harness they share keeps its promises.

Each script is started as a user would start it, ``python benchmarks/X.py <CPU mode> --out
DIR``, in a new process without TRITON_INTERPRET: it must exit 0 and write its results with
every top-level field of the results file it published in ``benchmarks/results/`` (the record
BENCHMARKS.md quotes), so that a refactor cannot break a script, or the fields, silently.

CPU modes: ``--interpret`` (core, tuning_speed, serve_fallback, gpu_isolation, distributed,
ray_sweep: Triton's interpreter, tiny sizes, one repeat), ``--dry-run`` (measure_tables), ``--quick``
(strategies), small ``--calls`` (the Redis benchmarks, CPU measurements already). No timing
is asserted: CPU-mode timings are stand-ins, and the results say so. What only a GPU runs
(CUDA graphs and events, do_bench, Triton's results cache) is not reached here.

A script's run keeps about one core busy (the interpreter), and CI has two: the module's
runs are queued together when its first test starts, two at a time (``RUNS``, ``runs``),
and each test checks its own run's results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import load_module
from helpers_reliability import RedisServer
from redis_fixture import require
from tunebook._book.redis_store import INSTALL_HINT

# The scripts' plumbing does not depend on the Triton release: scripts/test runs these on its
# last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"


# By path: benchmarks/ on sys.path would put modules named ``core`` and ``strategies`` in
# front of every test.
harness = load_module(BENCHMARKS / "_harness.py", "_harness")


def run_benchmark(tmp_path: Path, script: str, *args: str, timeout: float = 300) -> Path:
    """Run ``python benchmarks/<script> *args --out DIR`` from an empty directory, with a book
    of its own; the DIR."""
    out = tmp_path / "out"
    unset = ("TRITON_INTERPRET", "OUT", "TUNEBOOK_MODE", "TUNEBOOK_PATH")
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "TUNEBOOK_DIR": str(tmp_path / "book")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return out


def results(path: Path, published: str | tuple[str, ...]) -> dict[str, Any]:
    """The JSON at ``path``; it must have every top-level field of the published results file
    ``published`` (under benchmarks/results/), or the fields listed."""
    doc = json.loads(path.read_text())
    expected = set(json.loads((RESULTS / published).read_text()) if isinstance(published, str) else published)
    assert expected <= set(doc), f"{path.name} lacks {sorted(expected - set(doc))}"
    return doc


def assert_cpu_mode(doc: dict[str, Any]) -> None:
    assert doc["gpu"] == harness.CPU_DEVICE_NAME and doc["timings"] == harness.STAND_IN


@pytest.fixture
def redis_tools() -> None:
    """What the Redis benchmarks need (they start their own server): fail with the fix, or
    skip with TUNEBOOK_SKIP_REDIS=1, as the Redis tests do."""
    try:
        import redis  # noqa: F401
    except ImportError:
        require("redis-py", INSTALL_HINT)
    if RedisServer.executable() is None:
        require("redis-server", "apt-get install -y redis-server")


def _has_redis() -> bool:
    return importlib.util.find_spec("redis") is not None and RedisServer.executable() is not None


@dataclass(frozen=True)
class Run:
    """A script's run, checked by ``test``; queued only where ``ready()`` (else that test
    skips, or fails with the fix)."""

    test: str
    script: str
    args: tuple[str, ...]
    timeout: float = 300
    ready: Callable[[], bool] = lambda: True


# Every run of the module, in the order they are queued: the longest first, then in the
# order of the tests (each test then waits about as long as its own run takes).
RUNS = {
    "decoder": Run(
        "test_decoder_dry_run", "decoder.py", ("--dry-run", "--phases", "decode,tuned,ttft,http"), 900
    ),
    "measure_tables": Run(
        "test_measure_tables_dry_run_writes_every_table", "measure_tables.py", ("--dry-run",)
    ),
    "strategies": Run("test_strategies_quick", "strategies.py", ("--quick",)),
    "core": Run("test_core_interpret", "core.py", ("--interpret",)),
    "core_hot": Run("test_core_hot_only_interpret", "core.py", ("--interpret", "--hot-only")),
    "tuning_speed": Run("test_tuning_speed_interpret", "tuning_speed.py", ("--interpret",)),
    "serve_fallback": Run("test_serve_fallback_interpret", "serve_fallback.py", ("--interpret",)),
    "gpu_isolation": Run("test_gpu_isolation_interpret", "gpu_isolation.py", ("--interpret",)),
    "adoption": Run(
        "test_adoption_interpret",
        "adoption.py",
        ("--interpret", "--library", "fla", "--variants", "tunebook", "triton"),
        ready=lambda: importlib.util.find_spec("fla") is not None,
    ),
    "redis_latency": Run(
        "test_redis_latency", "redis_latency.py", ("--entries", "4", "--calls", "20"), ready=_has_redis
    ),
    "redis_hit_latency": Run(
        "test_redis_hit_latency",
        "redis_hit_latency.py",
        ("--batches", "5", "--calls", "20"),
        ready=_has_redis,
    ),
    "book_scale": Run("test_book_scale_quick", "book_scale.py", ("--quick",), ready=_has_redis),
    "distributed": Run("test_distributed_cpu_mode_agrees_across_ranks", "distributed.py", ("--interpret",)),
    "ray_sweep": Run(
        "test_ray_sweep_cpu_mode_runs_every_phase",
        "ray_sweep.py",
        ("--interpret",),
        ready=lambda: importlib.util.find_spec("ray") is not None,
    ),
    "first_prefill_profile": Run(
        "test_first_prefill_profile_cpu_mode",
        "first_prefill_profile.py",
        ("--interpret", "--layers", "1", "--prompt", "2"),
    ),
}
WORKERS = 2


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``runs(name)``: the DIR of ``RUNS[name]`` (as ``run_benchmark`` returns it) once that
    run is done. Every run whose test this session runs is queued when a first test asks."""
    selected = {item.name for item in request.session.items if item.path == request.path}
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="benchmark")
    queued: dict[str, Future[Path]] = {}
    for name, run in RUNS.items():
        if run.test in selected and run.ready():
            tmp = tmp_path_factory.mktemp(name)
            queued[name] = pool.submit(run_benchmark, tmp, run.script, *run.args, timeout=run.timeout)

    def result(name: str) -> Path:
        assert name in queued, f"{name} was not queued: RUNS names another test for it, or it is not ready"
        return queued[name].result()

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the scripts


def test_measure_tables_dry_run_writes_every_table(runs: Any) -> None:
    out = runs("measure_tables")
    assert len(list(out.glob("*.json"))) == 12
    published = ROOT / "tests" / "data" / "tables" / "matmul-M16-N8192-K4096-NVIDIA-H200.json"
    doc = results(out / "matmul-M16-N8192-K4096-none.json", tuple(json.loads(published.read_text())))
    assert doc["platform"]["backend"] == "dry-run"


def test_strategies_quick(runs: Any) -> None:
    out = runs("strategies")
    doc = results(out / "strategies.json", "strategies.json")
    assert "not the benchmark's numbers" in doc["quick"]
    assert (out / "strategies.png").stat().st_size > 0


@pytest.mark.slow
def test_core_interpret(runs: Any) -> None:
    out = runs("core")
    doc = results(out / "core.json", "core-h200.json")
    assert_cpu_mode(doc)
    # Behaviour, not timing: a remembered key benchmarks nothing, one added config exactly one.
    assert doc["first_call_tunebook_benchmarked"] == [0]
    assert doc["add_config"]["tunebook_benchmarked"] == 1


@pytest.mark.slow
def test_core_hot_only_interpret(runs: Any) -> None:
    out = runs("core_hot")
    assert_cpu_mode(results(out / "core_hot.json", "core_hot-h200.json"))


@pytest.mark.slow
def test_tuning_speed_interpret(runs: Any) -> None:
    out = runs("tuning_speed")
    doc = results(out / "tuning_speed.json", "tuning_speed-h200.json")
    assert_cpu_mode(doc)
    assert doc["kernel_ms"]["timer"] == harness.STAND_IN


@pytest.mark.slow
def test_serve_fallback_interpret(runs: Any) -> None:
    out = runs("serve_fallback")
    doc = results(out / "serve_fallback.json", "serve_fallback-h200.json")
    assert_cpu_mode(doc)
    assert doc["timer"] == harness.STAND_IN
    assert {k["serve_stats"]["benchmarked"] for k in doc["kernels"].values()} == {0}
    for phase in ("grid", "serve", "truth", "time"):
        assert (out / f"serve_fallback-{phase}.json").exists()


@pytest.mark.slow
def test_gpu_isolation_interpret(runs: Any) -> None:
    out = runs("gpu_isolation")
    doc = results(out / "gpu_isolation.json", "gpu_isolation-2xh200.json")
    assert_cpu_mode(doc)
    assert doc["isolate"]["correct"] and doc["tune_rc"] == 0
    errors = {cid.split("|")[0]: err for cid, err in doc["isolate"]["results"].items()}
    assert "SIGSEGV" in errors["BLOCK=1024,MODE=1"] and "timed out" in errors["BLOCK=1024,MODE=3"]
    assert doc["serve_after"]["fallbacks"] == 0


ADOPTION = ("date", "gpu", "triton", "timings", "libraries", "variants", "versions", "host_us_per_call")


@pytest.mark.slow
def test_adoption_interpret(runs: Any) -> None:
    pytest.importorskip("fla", reason="fla-core is installed by the test extra")
    out = runs("adoption")
    doc = results(out / "adoption.json", ADOPTION)
    assert_cpu_mode(doc)
    fla = doc["libraries"]["fla"]
    assert fla["checks"]["tunebook_process_2_benchmarked"] == 0
    assert all(op["identical"] for op in fla["checks"]["tunebook_process_2_vs_1"].values())
    first, second = fla["runs"]["triton"]
    assert first["triton_benchmarked"] == second["triton_benchmarked"] > 0  # Triton tunes again
    assert set(doc["host_us_per_call"]) == {
        "triton",
        "triton subclass",
        "tunebook decorated",
        "triton, adopted",
        "triton subclass, adopted",
    }


REDIS_LATENCY = ("entries", "results", "document_bytes", "up_fetch", "hung_first_call", "down_breaker_open")


def test_redis_latency(redis_tools: None, runs: Any) -> None:
    out = runs("redis_latency")
    doc = results(out / "redis_latency.json", REDIS_LATENCY)
    assert set(doc["up_fetch"]) == {"calls", "median_us", "p90_us", "p99_us", "max_us"}


@pytest.mark.slow  # waits out the breaker's 5 s retry interval
def test_redis_hit_latency(redis_tools: None, runs: Any) -> None:
    out = runs("redis_hit_latency")
    phases = ("no_redis", "up", "down", "down_probe_due", "up_again", "down_minus_up_p10_us")
    doc = results(out / "redis_hit_latency.json", phases)
    assert set(doc["up"]) == {"p10_us", "median_us", "p90_us"}


BOOK_SCALE_ROW = ("store", "format", "keys", "first_call_ms", "hit_us", "miss_ms", "rss_mb", "book_hits")


@pytest.mark.slow  # makes and measures a book on each store, in new processes (~15 s)
def test_book_scale_quick(redis_tools: None, runs: Any) -> None:
    out = runs("book_scale")
    doc = results(out / "book_scale.json", "book_scale-cpu.json")
    assert [r["store"] for r in doc["rows"]] == ["local", "redis"]
    for row in doc["rows"]:
        assert set(BOOK_SCALE_ROW) <= set(row)
        assert row["book_hits"] == 1 and row["benchmarked"] == 5  # the first call hit, the miss tuned
    assert doc["rows"][0]["show_outcome"] == doc["rows"][0]["report_outcome"] == "ok"


# --------------------------------------------------------------------------- the harness


def test_harness_doctests() -> None:
    import doctest

    failed, attempted = doctest.testmod(harness, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted and not failed


def test_percentiles_interpolate_between_ranks() -> None:
    import statistics

    for samples in ([3.0], [5.0, 1.0], [4.0, 9.0, 1.0, 7.0, 2.0, 8.0]):
        p = harness.percentiles(samples, (0, 50, 100))
        assert (p["p0"], p["p50"], p["p100"]) == (min(samples), statistics.median(samples), max(samples))
    assert harness.percentiles(range(11), (10, 90, 99.5)) == {"p10": 1.0, "p90": 9.0, "p99.5": 9.95}
    with pytest.raises(ValueError, match="no samples"):
        harness.percentiles([])
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        harness.percentiles([1.0], (101,))
    with pytest.raises(ValueError, match="equal"):
        harness.median_ratio([1.0, 2.0], [1.0])


def test_table_aligns_columns_escapes_pipes_and_checks_rows() -> None:
    text = harness.table([["a|b", 1.0, None], ["c", 22.5, 3]], ("name", "ms", "n"), floats=["", ".1f", ""])
    assert text.splitlines() == [
        "| name | ms   | n   |",
        "| ---- | ---- | --- |",
        "| a\\|b |  1.0 |   - |",
        "| c    | 22.5 |   3 |",
    ]
    with pytest.raises(ValueError, match="expected 2"):
        harness.table([["only one"]], ("a", "b"))


def test_interleave_takes_rounds_in_turn() -> None:
    order: list[str] = []

    def measure(name: str) -> float:
        order.append(name)
        return 1.0

    samples = harness.interleave({"A": "A", "B": "B", "C": "C"}, 2, measure)
    assert order == ["A", "B", "C", "A", "B", "C"] and samples == {k: [1.0, 1.0] for k in "ABC"}


def test_child_env_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = harness.child_env(interpret=False, scratch=tmp_path, path=[tmp_path / "mod"], TUNEBOOK_MODE="serve")
    assert "TRITON_INTERPRET" not in env and env["TUNEBOOK_MODE"] == "serve"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(harness.SRC), str(tmp_path / "mod"), "/elsewhere"]
    assert env["TUNEBOOK_DIR"] == str(tmp_path / "book")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton-cache")


def test_run_child_failures_carry_both_streams() -> None:
    crash = "import sys; print('partial'); sys.exit('broken: ' + 'here')"
    with pytest.raises(harness.ChildFailed, match=r"(?s)exit 1.*partial.*broken: here"):
        harness.run_child(["-c", crash], env=os.environ)
    with pytest.raises(harness.ChildFailed, match=r"(?s)not a JSON object.*\[1, 2\]"):
        harness.run_child(["-c", "print([1, 2])"], env=os.environ)
    with pytest.raises(harness.ChildFailed, match=r"(?s)ran past 1 s.*started"):
        hang = "import time; print('started', flush=True); time.sleep(30)"
        harness.run_child(["-c", hang], env=os.environ, timeout=1)


def test_cpu_mode_timers_are_labelled_stand_ins() -> None:
    # conftest.py sets TRITON_INTERPRET=1 for the test process: CPU mode.
    calls = {"a": 0, "b": 0}

    def call(name: str) -> Any:
        return lambda: calls.__setitem__(name, calls[name] + 1)

    variants = {name: call(name) for name in calls}
    launched = harness.time_launches(variants, rounds=3, launches=4, warmup=2)
    assert launched.method == harness.STAND_IN and calls == {"a": 14, "b": 14}
    assert {k: len(v) for k, v in launched.ms.items()} == {"a": 3, "b": 3}
    benched = harness.do_bench_times(variants, rounds=2, warmup_ms=1, rep_ms=1)
    assert benched.method == harness.STAND_IN and set(benched.medians()) == {"a", "b"}


def test_platform_header_in_cpu_mode() -> None:
    header = harness.platform_header(interpret=True)
    assert set(header) == {"date", "gpu", "triton", "torch", "python", "cuda", "timings"}
    assert_cpu_mode(header)
    assert "NOT a measurement" in harness.header_line(header)


def test_out_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("OUT", str(tmp_path / "from-env"))
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    out = harness.out_dir(parser.parse_args([]).out)
    assert out == tmp_path / "from-env" and out.is_dir()
    monkeypatch.delenv("OUT")
    parser = argparse.ArgumentParser()
    harness.add_out_argument(parser)
    assert parser.parse_args([]).out == Path("bench-out")


@pytest.mark.slow
def test_distributed_cpu_mode_agrees_across_ranks(runs: Any) -> None:
    out = runs("distributed")
    doc = results(
        out / "distributed.json",
        ("disagreements", "wall_s", "group_vs_alone", "benchmarked", "configs_group_vs_alone", "keys"),
    )
    assert_cpu_mode(doc)
    assert doc["disagreements"]["group"] == []  # the group's ranks launch one config per key
    assert sum(doc["benchmarked"]["group"]) == max(doc["benchmarked"]["alone"])  # one search, split
    assert doc["configs_group_vs_alone"] <= 0.6  # each rank screened about half
    # The group's trace: every rank measured its parts; the leader of a key gathered the other's
    # part and the follower waited for its batches, so each kind of wait shows on some rank.
    splits = [r["group_split"] for r in doc["phases"]["group"]]
    assert all(s["measure"] > 0 for s in splits)
    assert {"join", "gather", "batch"} <= {event for s in splits for event in s}
    assert all(not r["group_split"] for r in doc["phases"]["alone"])  # alone: no group, no trace


@pytest.mark.slow
def test_ray_sweep_cpu_mode_runs_every_phase(runs: Any) -> None:
    pytest.importorskip("ray")
    out = runs("ray_sweep")
    doc = results(
        out / "ray_sweep.json",
        ("phases", "speedup", "dynamic_vs_static", "same_winners", "book_write_ms", "simulate"),
    )
    assert_cpu_mode(doc)
    assert set(doc["phases"]) == {"ray_1gpu", "ray_dynamic", "static"}
    for phase in doc["phases"].values():  # every phase tuned every key, the same configs
        assert phase["failed_keys"] == [] and len(phase["winners"]) == len(doc["keys"])
    assert [n for _, n in doc["phases"]["ray_dynamic"]["gpus"]] == [2]
    assert [r["gpus"] for r in doc["simulate"]["rows"]] == [1, 2, 8, 64, 128, 256]


@pytest.mark.slow
def test_first_prefill_profile_cpu_mode(runs: Any) -> None:
    out = runs("first_prefill_profile")
    report = (out / "first_prefill_profile-triton.txt").read_text()
    assert "triton: first prefill" in report and "timings:" in report  # the CPU-mode warning
    assert "cumulative" in report
    # the decision path, in its own section: on the CPU the interpreter's frames fill the top
    # entries (linear launches an explicit config there), so it cannot rely on those
    own = report.split("tunebook's own frames")[1]
    assert "_autotuner.py" in own and "interpreter.py" not in own


@pytest.mark.slow
def test_decoder_dry_run(runs: Any) -> None:
    """The LLM engine's benchmark on the tiny model (the GPU-only ``check`` phase is the
    engine tests' comparison with transformers, tests/llm): every phase runs and writes
    its fields; the fresh server with the books benchmarks nothing, in-process tuning does."""
    out = runs("decoder")
    doc = results(out / "decoder.json", ("date", "gpu", "timings", "decode", "tuned", "ttft", "http"))
    assert_cpu_mode(doc)
    assert {r["batch"] for r in doc["decode"]} == {1, 2} and "torch_ms" in doc["decode"][0]
    assert doc["decode"][0]["torch_over_triton"] > 0
    # Tuning's gain against both untuned baselines: each kernel's first config, and the
    # hand-picked ones, measured in the same rounds as the books.
    for row in doc["tuned"]:
        for baseline in ("first", "fixed"):
            assert row[f"{baseline}_over_triton"] == row[f"{baseline}_ms"] / row["triton_ms"] > 0
    ttft = {r["variant"]: r for r in doc["ttft"]}
    assert ttft["books"]["benchmarked"] == 0 and ttft["fixed"]["benchmarked"] == 0
    assert ttft["in_process_tuning"]["benchmarked"] > 0
    summary = doc["ttft_summary"]  # medians per variant, against the fixed configs'
    assert summary["fixed"]["first_request_over_fixed"] == 1.0 and summary["books"]["starts"] == 1
    assert summary["books"]["first_request_over_fixed"] > 0
    assert doc["http"]["failed"] == 0 and doc["http"]["requests"] >= 1
