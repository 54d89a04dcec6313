"""`tunebook tune --ray` and tunebook.tune_on_ray on a real local Ray cluster: two "GPUs" declared
as a custom resource, kernels on the interpreter, one isolated worker process per actor.

The cluster is started once for the module (Ray takes seconds to start) with 2 CPUs, as CI
has. The kernel's do_bench replays a table (so winners are decided by the table, not by
the CPU clock) and appends "n BLOCK" to a log at the end of every completed measurement:
the log shows what was measured, how often, across runs and killed processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import TESTS, book_files
from redis_fixture import PATIENT, redis_server  # noqa: F401  (the `server` fixture)
from test_cli import invoke
from tunebook._book import read_document

ray = pytest.importorskip("ray")
# Ray plumbing around the isolated worker: no Triton version changes it; the worker's tuning
# paths are checked on every Triton (tests/test_serving.py, test_sweep_session.py). Last
# Triton only (conftest.py).
pytestmark = pytest.mark.once

RESOURCE = "tb_gpu"
BLOCKS = [16, 32, 64, 128, 256, 512]
KEYS = [100, 200, 300, 400]

MODULE = """
import os, signal, time
import torch, triton, tunebook
from small_kernels import Replay, add_kernel, grid_1d

class Logged(Replay):
    def __call__(self, kernel_call, quantiles=None):
        ms = super().__call__(kernel_call, quantiles)
        time.sleep(float(os.environ.get("RAYKERN_SLOW", "0")))
        with open(os.environ["RAYKERN_LOG"], "a") as log:
            log.write(f"{self._current['n']} {self._current['BLOCK']}\\n")
        return ms

replay = Logged({b: 1.0 + abs(b - 128) / 100 for b in BLOCKS})

def pre_hook(nargs, reset_only=False):
    if nargs["BLOCK"] == int(os.environ.get("RAYKERN_CRASH", "0")):
        os.kill(os.getpid(), signal.SIGSEGV)  # what an illegal memory access does to a process
    replay.pre_hook(nargs)

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

configs = [triton.Config({"BLOCK": b}) for b in BLOCKS]
add = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=pre_hook, inputs=inputs)(add_kernel)
""".replace("BLOCKS", repr(BLOCKS))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, and 2 of the resource that stands for a GPU."""
    ray.init(
        num_cpus=2,
        resources={RESOURCE: 2},
        object_store_memory=100 * 2**20,  # results are small: no GBs of shared memory for them
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def raykern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The kernel module, importable here and by the workers; its measurement log."""
    directory = tmp_path / "mods"
    directory.mkdir()
    name = f"raykern_{os.getpid()}_{len(list(tmp_path.parent.iterdir()))}"
    (directory / f"{name}.py").write_text(MODULE)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), str(directory), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(directory))
    log = tmp_path / "measured.log"
    monkeypatch.setenv("RAYKERN_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    return {"name": name, "dir": directory, "log": log}


def keys_args(keys: list[int] = KEYS) -> list[str]:
    return [arg for n in keys for arg in ("--keys", f"n={n}")]


def measured(log: Path) -> Counter:
    return Counter(tuple(map(int, line.split())) for line in log.read_text().splitlines() if line.strip())


def entries(book: Path) -> dict:
    (path,) = book_files(book)
    doc = read_document(path)
    assert doc is not None
    return {e.key[0]: e for e in doc.entries.values()}


def summary(entry) -> dict:
    """What a tuning decided for a key: each config's timing or failure, and the winner."""
    results = {
        r.config["kwargs"]["BLOCK"]: (r.ms if r.ok else ("failed", "SIGSEGV" in (r.error or "")))
        for r in entry.results.values()
    }
    return {"results": results, "winner": entry.best(), "chosen": entry.chosen}


@pytest.mark.slow
def test_a_sweep_on_ray_records_what_tune_records_a_crashing_config_included(
    cluster, raykern, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAYKERN_CRASH", "64")  # BLOCK=64 takes its worker down, on every key
    target = f"{raykern['name']}:add"
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "alone"))
    alone = invoke("tune", target, *keys_args())
    assert "4 config(s) recorded as crashed or hung" in alone.output
    raykern["log"].unlink()

    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "ray"))
    swept = invoke("tune", target, *keys_args(), "--ray", "--ray-resource", RESOURCE, "--unit-size", "2")
    assert "done: 4 of 4 key(s) tuned on 2 x" in swept.output, swept.output
    assert "4 config(s) recorded as crashed or hung" in swept.output
    assert "GPUs" in swept.output and "keys 4 of 4" in swept.output  # the progress line
    counts = measured(raykern["log"])
    assert set(counts) == {(n, b) for n in KEYS for b in BLOCKS if b != 64}
    assert set(counts.values()) == {1}  # each config once; the crashing one never completes

    ours, theirs = entries(tmp_path / "ray"), entries(tmp_path / "alone")
    assert sorted(ours) == sorted(theirs) == KEYS
    for n in KEYS:
        assert summary(ours[n]) == summary(theirs[n])
        assert summary(ours[n])["results"][64] == ("failed", True)
        assert ours[n].best().startswith("BLOCK=128|")

    again = invoke("tune", target, *keys_args(), "--ray", "--ray-resource", RESOURCE)
    assert "done: 4 of 4 key(s) tuned" in again.output and "0 config(s) measured" in again.output


# The first worker process to import the module claims a marker file and, from then on, every
# import in that worker fails: a node that lacks a package the kernel module needs.
BROKEN_NODE = """
import os, sys
if sys.argv[0].endswith("_worker/__main__.py"):
    marker = os.environ["RAYKERN_BROKEN"]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getppid()).encode())
        os.close(fd)
    except FileExistsError:
        pass
    if open(marker).read() == str(os.getppid()):
        raise ImportError("this node lacks a package the kernel module needs")
"""


@pytest.mark.slow
def test_a_broken_node_is_retired_and_the_others_tune_every_key(cluster, raykern, tmp_path, monkeypatch):
    """One of two workers cannot import the kernel module. Each unit it fails goes to the
    other worker, and it is retired after two in a row: every key is tuned (it used to fail
    units in milliseconds, drain the queue and fail every key)."""
    module = raykern["dir"] / f"{raykern['name']}.py"
    module.write_text(BROKEN_NODE + module.read_text())
    monkeypatch.setenv("RAYKERN_BROKEN", str(tmp_path / "broken-node"))
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "book"))
    keys = [100, 200, 300, 400, 500, 600]
    target = f"{raykern['name']}:add"
    swept = invoke("tune", target, *keys_args(keys), "--ray", "--ray-resource", RESOURCE, "--unit-size", "2")
    assert "done: 6 of 6 key(s) tuned" in swept.output, swept.output
    assert "retired the GPU worker" in swept.output and "lacks a package" in swept.output
    assert set(measured(raykern["log"]).values()) == {1}  # nothing measured twice
    assert sorted(entries(tmp_path / "book")) == keys


@pytest.mark.slow
def test_a_lost_actor_costs_only_the_units_it_held(cluster, raykern, monkeypatch, book_dir, server):
    import tunebook
    from tunebook._book import redis_store

    monkeypatch.setenv("RAYKERN_SLOW", "0.15")
    monkeypatch.setenv("TUNEBOOK_REDIS_URL", server.url)  # the fleet book gets every result too
    patient = redis_store.RedisStore(server.url, **PATIENT)
    monkeypatch.setitem(redis_store._shared_stores, (os.getpid(), server.url), patient)
    module = __import__(raykern["name"])
    killed: list[str] = []

    def kill_one_actor(progress) -> None:
        if killed or progress.configs_measured < 4:
            return
        mine = [a for a in ray.util.list_named_actors() if a.startswith(f"tunebook-sweep-{os.getpid()}-")]
        ray.kill(ray.get_actor(mine[0]))
        killed.append(mine[0])

    report = tunebook.tune_on_ray(
        module.add,
        [{"n": n} for n in KEYS],
        resource=RESOURCE,
        unit_size=3,
        on_progress=kill_one_actor,
    )
    assert killed, "the sweep ended before an actor could be killed"
    assert [k.state for k in report.keys] == ["done"] * 4, report.keys
    counts = measured(raykern["log"])
    assert set(counts) == {(n, b) for n in KEYS for b in BLOCKS}  # nothing lost
    assert set(counts.values()) == {1}, counts  # nothing measured twice
    local = entries(book_dir)
    assert all(len(e.results) == len(BLOCKS) and e.chosen.startswith("BLOCK=128|") for e in local.values())
    (path,) = book_files(book_dir)
    fleet = patient.fetch(path.name + ".json")  # the page's name; on disk (format 2) its directory
    assert fleet is not None
    assert {e.key[0]: (len(e.results), e.chosen) for e in fleet.entries.values()} == {
        n: (len(BLOCKS), e.chosen) for n, e in local.items()
    }


@pytest.mark.slow
def test_a_killed_driver_loses_nothing_and_its_successor_measures_nothing_twice(
    cluster, raykern, monkeypatch, book_dir
):
    monkeypatch.setenv("RAYKERN_SLOW", "0.15")
    command = [
        sys.executable,
        "-c",
        "from tunebook.cli import main; main()",
        "tune",
        f"{raykern['name']}:add",
    ]
    command += [*keys_args(), "--ray", cluster, "--ray-resource", RESOURCE, "--unit-size", "2"]
    driver = subprocess.Popen(command, cwd=raykern["dir"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if raykern["log"].exists() and len(measured(raykern["log"])) >= 6:
            break
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()[0].decode()[-3000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # Ray ends the dead driver's actors, and their workers end with them.
    alive = ray.util.list_named_actors(all_namespaces=True)  # its actors live in its namespace
    while any(a["name"].startswith(f"tunebook-sweep-{driver.pid}-") for a in alive):
        assert time.monotonic() < deadline, "the killed driver's actors are still alive"
        time.sleep(0.2)
        alive = ray.util.list_named_actors(all_namespaces=True)
    time.sleep(1.0)
    before = sum(measured(raykern["log"]).values())
    assert 6 <= before < len(KEYS) * len(BLOCKS)

    resumed = invoke("tune", f"{raykern['name']}:add", *keys_args(), "--ray", "--ray-resource", RESOURCE)
    assert "done: 4 of 4 key(s) tuned" in resumed.output, resumed.output
    counts = measured(raykern["log"])
    assert set(counts) == {(n, b) for n in KEYS for b in BLOCKS}
    assert set(counts.values()) == {1}, counts
    assert all(e.chosen.startswith("BLOCK=128|") for e in entries(book_dir).values())


def test_without_ray_the_command_says_how_to_install_it(monkeypatch, raykern):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.setattr("tunebook._optional.available", lambda module: module != "ray")
    res = invoke("tune", f"{raykern['name']}:add", "--keys", "n=100", "--ray", ok=None)
    assert res.exit_code == 1
    assert "pip install 'tunebook[ray]'" in res.output and "Traceback" not in res.output
    import tunebook

    with pytest.raises(tunebook.MissingDependency, match=r"pip install 'tunebook\[ray\]'"):
        tunebook.tune_on_ray([], keys=None)


def test_a_kernel_given_right_after_ray_is_the_target(monkeypatch, raykern):
    # `tune --ray mypkg.ops:matmul --keys ...` (docs/cli.md's form) was refused by click with
    # "Missing argument 'TARGETS...'" before --ray's value could be read as the target.
    monkeypatch.setitem(sys.modules, "ray", None)  # stops the run where Ray is first needed
    monkeypatch.setattr("tunebook._optional.available", lambda module: module != "ray")
    res = invoke("tune", "--ray", f"{raykern['name']}:add", "--keys", "n=100", ok=None)
    assert res.exit_code == 1 and "pip install 'tunebook[ray]'" in res.output, res.output
    none = invoke("tune", "--keys", "n=100", ok=False)
    assert none.exit_code == 2 and "Missing argument 'TARGETS...'" in none.output


def test_ray_options_need_ray_and_workers_do_not_go_with_it(raykern):
    alone = invoke("tune", f"{raykern['name']}:add", "--keys", "n=100", "--gpus", "2", ok=False)
    assert "need --ray" in alone.output
    both = invoke("tune", f"{raykern['name']}:add", "--keys", "n=100", "--ray", "--workers", "2", ok=False)
    assert "--gpus N" in both.output


def test_ray_takes_an_optional_address_and_never_swallows_the_kernel():
    from tunebook.cli.tune import _ray_address

    assert _ray_address("", ("m:k",)) == ("", ("m:k",))
    assert _ray_address("10.0.0.1:6379", ("m:k",)) == ("10.0.0.1:6379", ("m:k",))
    assert _ray_address("ray://head:10001", ()) == ("ray://head:10001", ())
    assert _ray_address("auto", ()) == ("auto", ())
    assert _ray_address("mypkg.ops:matmul", ()) == ("", ("mypkg.ops:matmul",))
    assert _ray_address("mypkg.ops", ("other",)) == ("", ("mypkg.ops", "other"))


def test_keys_with_names_the_kernel_lacks_are_refused_before_a_cluster_starts(raykern, monkeypatch):
    """Found by a misuse review: keys=[{"m": 100}] started Ray, then every worker failed with
    KeyError: 'n'; an extra name was accepted silently. The command line checked both."""
    import importlib

    import tunebook

    def no_sweep(*args, **kwargs):  # another test of this process may have a cluster up already
        raise AssertionError("a sweep started")

    monkeypatch.setattr("tunebook._sweep.driver.run_sweep", no_sweep)
    kernel = importlib.import_module(raykern["name"]).add
    for keys, said in (
        ([{"m": 100}], "m not in the kernel's key; n missing"),
        ([{"n": 1, "x": 2}], "x not in"),
    ):
        with pytest.raises(ValueError, match=said):
            tunebook.tune_on_ray(kernel, keys=keys)


def test_tune_on_ray_refuses_arguments_of_the_wrong_kind_before_a_cluster_starts(raykern, monkeypatch):
    """Found by a misuse review: a "module:attr" string was iterated into 6 kernels of
    letters, keys={"n": 100} raised AttributeError, gpus=-1 waited 600 s for workers none
    would start, unit_size=0 was refused only after the actors started, and timeout=-1 ran."""
    import importlib

    import tunebook

    def no_sweep(*args, **kwargs):
        raise AssertionError("a sweep started")

    monkeypatch.setattr("tunebook._sweep.driver.run_sweep", no_sweep)
    kernel = importlib.import_module(raykern["name"]).add
    with pytest.raises(TypeError, match="not the text"):
        tunebook.tune_on_ray(f"{raykern['name']}:add", keys=[{"n": 100}])
    with pytest.raises(TypeError, match="list of dicts"):
        tunebook.tune_on_ray(kernel, keys={"n": 100})
    for wrong, said in (
        ({"gpus": -1}, "gpus="),
        ({"gpus": 1.5}, "gpus="),
        ({"unit_size": 0}, "unit_size="),
        ({"timeout": -1}, "timeout="),
        ({"resource": ""}, "resource="),
    ):
        with pytest.raises(ValueError, match=said):
            tunebook.tune_on_ray(kernel, keys=[{"n": 100}], **wrong)


def test_an_address_nobody_answers_at_is_said_at_once():
    """A mistyped host or port sat at "starting the GPU workers" for minutes (Ray waits for
    it without end); a connection error got advice about file paths."""
    import socket

    from tunebook._sweep.driver import SweepError, reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    with pytest.raises(SweepError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        reachable(f"127.0.0.1:{port}")
    with pytest.raises(SweepError, match="is not host:port"):
        reachable("localhost:abc")
    for theirs in (None, "auto", "local", "ray://head:10001"):
        reachable(theirs)  # Ray's own forms: left to Ray


def test_workers_get_the_drivers_own_folders_and_home_relative_paths(tmp_path, monkeypatch):
    """A TUNEBOOK_DIR of '~/book' reached the workers as '<driver dir>/~/book' (the journals went
    to a folder named '~' and were never folded); a folder the program put on sys.path itself
    was not on the workers' path (every key failed: ModuleNotFoundError)."""
    from tunebook._sweep.actor import forwarded_environment
    from tunebook._worker.isolated import program_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    env = forwarded_environment({"TUNEBOOK_DIR": "~/book", "PYTHONPATH": "~/mods"}, "/driver", ["/mine"])
    assert env["TUNEBOOK_DIR"] == str(tmp_path / "book")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "mods"), "/mine", "/driver"]
    monkeypatch.syspath_prepend(str(tmp_path / "kernels"))
    paths = program_paths()
    assert str(tmp_path / "kernels") in paths
    assert not any("site-packages" in p for p in paths) and sys.prefix not in paths


def test_tune_of_a_file_path_imports_it_in_the_workers_too(raykern, tmp_path, monkeypatch):
    """`tunebook tune path/to/file.py:kernel`: the command imported the file (its folder on
    its own sys.path), its workers did not find it: ModuleNotFoundError on every key."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "filekern.py").write_text(MODULE)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # small_kernels, not the file's folder
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "book"))
    res = invoke("tune", f"{elsewhere / 'filekern.py'}:add", "--keys", "n=100")
    assert "done" in res.output and "1 key(s)" in res.output, res.output
    assert sorted(entries(tmp_path / "book")) == [100]


@pytest.mark.slow
def test_keys_that_fail_on_every_worker_retire_none(cluster, raykern, tmp_path, monkeypatch):
    """Found by a misuse review: two keys whose calls cannot be built (n=abc) failed on the
    first worker, which was retired for it though the other failed them too; a healthy GPU
    sat out the sweep. A worker is blamed only for units that then ran elsewhere."""
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "book"))
    keys = ["--keys", "n=abc", "--keys", "n=xyz", *keys_args()]
    swept = invoke(
        "tune",
        f"{raykern['name']}:add",
        *keys,
        "--ray",
        "--ray-resource",
        RESOURCE,
        "--unit-size",
        "2",
        ok=None,
    )
    assert "done: 4 of 6 key(s) tuned on 2 x" in swept.output, swept.output
    assert "retired" not in swept.output, swept.output
    assert sorted(entries(tmp_path / "book")) == KEYS


class _FakeRay:
    """Enough of Ray for the driver's bookkeeping of one unit's result: ray.get of a ref."""

    class exceptions:
        class RayActorError(Exception):
            pass

    def __init__(self) -> None:
        self.values: dict[str, dict] = {}

    def get(self, ref: str) -> dict:
        return self.values[ref]

    def kill(self, actor: object) -> None:
        pass


class _FakeSweep:
    def __init__(self) -> None:
        from types import SimpleNamespace

        self.queue: list = []
        self.keys = [SimpleNamespace(job=0, any_ok=True, plan=None, group="H100", finished=False)]

    def retry(self, unit, reason):
        from dataclasses import replace

        if unit.errors >= 1:
            return False
        self.queue.append(replace(unit, errors=unit.errors + 1))
        return True

    def next_unit(self, group):
        return self.queue.pop(0) if self.queue else None

    def measured(self, *args, **kwargs):
        pass


class _Actor:
    refs = 0

    def __init__(self, name: str) -> None:
        self.name = name

    class _Method:
        def remote(self, *args):
            _Actor.refs += 1
            return f"ref{_Actor.refs}"

    measure = plan = _Method()


def _two_workers():
    from tunebook._sweep import driver

    d = object.__new__(driver._Driver)
    d.ray, d.blamed, d.jobs, d.say = _FakeRay(), {}, [{}], lambda text: None
    d.options, d.report = driver.SweepOptions(), driver.SweepReport()
    a, b = driver._Slot(_Actor("A"), "H100", {}), driver._Slot(_Actor("B"), "H100", {})
    d.slots = {a.actor: a, b.actor: b}
    return d, a, b, _FakeSweep()


def test_a_worker_whose_failure_passed_or_whose_key_ended_gets_units_again():
    """From a review of the new retirement rule: worker A failed a unit, then ran its other
    unit; the failed one then ran on B. A was counted a failure it had already outgrown, and
    got no unit for the rest of the sweep; so it did when the failed unit's key ended."""
    from tunebook._sweep.schedule import Unit

    d, a, b, sweep = _two_workers()
    a.out = {"r1": Unit(1, 0, "measure", ("c1",)), "r2": Unit(2, 0, "measure", ("c2",))}
    d.ray.values = {"r1": {"error": "CUDA error: launch failure", "results": {}}, "r2": {"results": {}}}
    d._arrived("r1", a, sweep)  # A fails unit 1 (its reason, not a config's)
    d._arrived("r2", a, sweep)  # A runs unit 2
    d._hand_out(sweep)  # unit 1 goes to B (A is in suspicion meanwhile)
    (ref,) = b.out
    d.ray.values[ref] = {"results": {}}
    d._arrived(ref, b, sweep)  # and runs there
    assert (a.failures, d._suspect(a)) == (0, 0)
    sweep.queue += [Unit(10 + i, 0, "measure", (f"x{i}",)) for i in range(4)]
    d._hand_out(sweep)
    assert len(a.out) == 2 and len(b.out) == 2  # both work again

    d, a, b, sweep = _two_workers()
    a.out = {"r1": Unit(1, 0, "measure", ("c1",))}
    d.ray.values = {"r1": {"error": "CUDA error: launch failure", "results": {}}}
    d._arrived("r1", a, sweep)
    sweep.queue.clear()
    sweep.keys[0].finished = True  # its key ended (failed, say) before the unit ran again
    sweep.queue += [Unit(10 + i, 0, "measure", (f"x{i}",)) for i in range(4)]
    d._hand_out(sweep)
    assert d._suspect(a) == 0 and len(a.out) == 2
