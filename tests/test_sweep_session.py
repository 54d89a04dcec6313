"""The long-lived isolated worker a sweep's actor relays to (tunebook._worker.session): one
process measures unit after unit; a config that crashes it, hangs it or poisons its GPU
context is recorded as that config's failure and the rest of the unit is measured in a new
worker; the next worker folds the journal of the one before into the book."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import TESTS, only_entry
from tunebook._worker.session import WorkerSession

# The Ray sweep's long-lived worker: it measures through the tuning code a process's
# own tuning runs (test_tuning.py, test_serving.py: every Triton). Last Triton only
# (tests/conftest.py).
pytestmark = pytest.mark.once

MODULE = """
import os, signal, time
import torch, triton, tunebook
from small_kernels import add_kernel, grid_1d

def _crash(nargs):
    os.kill(os.getpid(), signal.SIGSEGV)  # what an illegal memory access does to a process

def _sticky(nargs):
    # What torch raises after an illegal memory access: the process lives, its CUDA context not.
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def _hang(nargs):
    time.sleep(3600)

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

add = tunebook.autotune(
    [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32}, pre_hook=_crash),
     triton.Config({"BLOCK": 64}, pre_hook=_sticky), triton.Config({"BLOCK": 128}, pre_hook=_hang),
     triton.Config({"BLOCK": 256})],
    key=["n"],
    inputs=inputs,
)(add_kernel)
"""


@pytest.mark.slow
def test_one_worker_serves_units_and_survives_every_kind_of_bad_config(
    tmp_path: Path, book_dir: Path
) -> None:
    (tmp_path / "sesskern.py").write_text(MODULE)
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(tmp_path)]), "TUNEBOOK_DIR": str(book_dir)}
    session = WorkerSession(env, timeout_s=8)
    try:
        assert session.start()["backend"] == "interpreter"
        job = {"module": "sesskern", "attr": "add", "key_text": "n=300", "call": None, "key": {"n": 300}}
        plan = session.plan(job)
        assert plan["strategy"] == "exhaustive" and len(plan["ids"]) == 5
        out = session.measure(job, plan["ids"])
        errors = {cid.split("|")[0]: item["result"]["error"] for cid, item in out.results.items()}
        assert errors["BLOCK=16"] is None and errors["BLOCK=256"] is None
        assert "died" in errors["BLOCK=32"] and "SIGSEGV" in errors["BLOCK=32"]
        assert "illegal memory access" in errors["BLOCK=64"]  # the real reason, then a new worker
        assert "timed out" in errors["BLOCK=128"]
        assert sorted(c.split("|")[0] for c in out.crashed) == ["BLOCK=128", "BLOCK=32"]
        assert out.error is None and out.restarts == 3
        again = session.measure(job, plan["ids"][:1], full=True)  # the same worker, the next unit
        assert again.restarts == 0 and again.results[plan["ids"][0]]["result"]["ms"] is not None
    finally:
        session.close()
    # What the killed workers finished was in their journals: the next worker folded it.
    successor = WorkerSession(env, timeout_s=8)
    successor.start()
    successor.close()
    entry = only_entry(book_dir)
    assert len(entry.results) == 5


CHECKED_MODULE = """
import torch, triton, tunebook
import triton.language as tl
from small_kernels import grid_1d

@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK <= 64)  # BLOCK=128 cannot run, as out of resources on a GPU
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.empty(n), n), {}

copy = tunebook.autotune(
    [triton.Config({"BLOCK": b}) for b in (128, 32, 64)], key=["n"], check={"rtol": 0.5}, inputs=inputs
)(_copy_kernel)
"""


def test_a_judging_plan_names_the_reference_a_measure_unit_checks_against(
    tmp_path: Path, book_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep's driver judges a key's wrong results again only against the reference its
    workers run (the first candidate that runs), which a judging plan runs and names."""
    from tunebook._failures import settings_hash
    from tunebook._worker import units

    (tmp_path / "judgekern.py").write_text(CHECKED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    job = {"module": "judgekern", "attr": "copy", "key_text": "n=100", "call": None, "key": {"n": 100}}
    plan = units.plan(job)
    assert plan["settings"] == settings_hash({"rtol": 0.5}) and "reference" not in plan
    judged = units.plan({**job, "judge": True})
    assert judged["reference"].startswith("BLOCK=32|") and judged["ids"][0].startswith("BLOCK=128|")


HANGING_REFERENCE = """
import triton, tunebook
from small_kernels import add_kernel
from sesskern import _hang, inputs

fine = tunebook.autotune(
    [triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["n"], check=True, inputs=inputs
)(add_kernel)

# The first config, check='s reference, hangs.
add = tunebook.autotune(
    [triton.Config({"BLOCK": 16}, pre_hook=_hang)] + [triton.Config({"BLOCK": b}) for b in (32, 64)],
    key=["n"], check=True, inputs=inputs,
)(add_kernel)
"""


@pytest.mark.slow
def test_a_reference_that_hangs_is_blamed_and_passed_over_not_the_measured_config(
    tmp_path: Path, book_dir: Path
) -> None:
    """A unit of configs after the first: check= launches the key's first config as its
    reference before measuring them. It hung, and the session blamed the config named last,
    the unit's first, then hung again on the same reference for the next: the unit's configs
    were all recorded as hung. Now the reference is named before its launch, blamed, and
    passed over by the key's next searches in the session (not another kernel's), and by a
    new worker's, from the book; a judging plan's search too (it failed the key after three
    hangs)."""
    (tmp_path / "sesskern.py").write_text(MODULE)
    (tmp_path / "hangref.py").write_text(HANGING_REFERENCE)
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(tmp_path)]), "TUNEBOOK_DIR": str(book_dir)}
    session = WorkerSession(env, timeout_s=8)
    try:
        job = {"module": "hangref", "attr": "add", "key_text": "n=300", "call": None, "key": {"n": 300}}
        ids = session.plan(job)["ids"]
        out = session.measure(job, ids[1:])
        assert [c.split("|")[0] for c in out.crashed] == ["BLOCK=16"], out
        error = out.results[ids[0]]["result"]["error"]
        assert "timed out" in error and error.endswith("(found looking for check='s reference)")
        for cid in ids[1:]:
            assert out.results[cid]["result"]["error"] is None, out.results[cid]
        assert out.error is None and out.restarts == 1
        again = session.measure(job, ids[2:], full=True)  # the key's next unit: no hang
        assert again.restarts == 0 and again.results[ids[2]]["result"]["ms"] is not None
        # Another kernel with the same configs and key text: its own reference, BLOCK=16.
        other = {**job, "attr": "fine"}
        assert session.plan({**other, "judge": True})["reference"] == ids[0]
    finally:
        session.close()
    # A unit that holds the reference, in a session that has not seen it hang: it hangs once,
    # its one failure (it was not tried again as the reference, nor measured after).
    (tmp_path / "hangref2.py").write_text(HANGING_REFERENCE)
    other_book = {**env, "TUNEBOOK_DIR": str(tmp_path / "other book")}
    fresh = WorkerSession(other_book, timeout_s=8)
    try:
        job2 = {**job, "module": "hangref2"}
        unit = fresh.measure(job2, ids)
        assert [c.split("|")[0] for c in unit.crashed] == ["BLOCK=16"] and unit.restarts == 1, unit
        assert all(unit.results[cid]["result"]["error"] is None for cid in ids[1:]), unit
        # A judging plan in a new session: the book's record passes the reference over.
        fresh.close()
        assert fresh.plan({**job2, "judge": True})["reference"] == ids[1]
    finally:
        fresh.close()
