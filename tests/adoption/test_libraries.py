"""Real libraries, installed unmodified (the ``test`` extra), adopt tunebook with no code changed.

For fla-core and liger-kernel, in separate processes on the CPU interpreter (run_ops.py):

1. Triton's own autotuner (the reference);
2. ``tunebook.patch()`` (fla: before importing it; liger: after, so every kernel was
   decorated before the patch): outputs equal the reference's, every autotuner the ops
   used is tunebook's (decorated, or adopted: fla's ``CachedAutotuner`` subclass), and
   after ``unpatch()`` a new key is tuned by Triton again and not by tunebook;
3. a new process patched by the ``TUNEBOOK_PATCH=1`` start-up hook (installed into this
   environment with ``tunebook install-hook`` and removed afterwards): the same outputs,
   bit for bit, and 0 configs benchmarked, subclass kernels included.

Outputs are compared exactly between tunebook's processes (the same configs run) and
closely with the reference: Triton's host-clock timings may pick another config, whose
sums run in another order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import side_by_side
from tunebook import _hook

HERE = Path(__file__).resolve().parent
RUN_OPS = HERE / "run_ops.py"
# Real libraries' runs take 45-70 s each in the interpreter: last Triton only (tests/conftest.py).
# What they exercise of Triton (an Autotuner subclass adopted, cache_results probed, the
# decorator patched before and after the import, the start-up hook) thirdparty.py reproduces
# with kernels of its own, and test_thirdparty.py runs on every Triton.
pytestmark = [pytest.mark.slow, pytest.mark.once]


def run_ops(library: str, mode: str, out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(RUN_OPS), library, mode, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, f"{library} {mode} failed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["outputs"] = torch.load(out / "outputs.pt")
    report["stderr"] = proc.stderr
    return report


@pytest.fixture
def installed_hook() -> Iterator[Path]:
    """The start-up hook in this environment's site-packages, for this test only."""
    path = _hook.install()
    try:
        yield path
    finally:
        _hook.uninstall([path.parent])


def flat(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs) for t in flat(outputs[key])]
    return [t for item in outputs for t in flat(item)]


def assert_same(a: dict[str, Any], b: dict[str, Any], exact: bool) -> None:
    assert set(a) == set(b)
    for name in a:
        for x, y in zip(flat(a[name]), flat(b[name]), strict=True):
            if exact or not x.is_floating_point():
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def reference_and_first(
    library: str, patch_mode: str, tmp_path: Path, book: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Triton's own run (the reference) and the first patched run, side by side: neither
    reads what the other writes (the reference writes no book)."""
    # fla passes cache_results=True (FLA_CACHE_RESULTS=1 by default); Triton 3.4 then reads its
    # disk cache even under the interpreter, and fails there (it looks for a JITFunction).
    # Triton >= 3.5 ignores it under the interpreter, so this changes nothing else.
    reference, first = side_by_side(
        lambda: run_ops(library, "triton", tmp_path / "triton", env={"FLA_CACHE_RESULTS": "0"}),
        lambda: run_ops(library, patch_mode, tmp_path / "first", env=book),
    )
    return reference, first


def check_library(
    library: str, patch_mode: str, tmp_path: Path, subclass_kernels: int, hook: Path
) -> dict[str, Any]:
    book = {"TUNEBOOK_DIR": str(tmp_path / "book")}
    reference, first = reference_and_first(library, patch_mode, tmp_path, book)
    assert reference["triton_benchmarked"] > 0 and not reference["patched"]
    assert first["patched"]
    assert_same(reference["outputs"], first["outputs"], exact=False)
    assert set(first["kernels"]) == set(reference["kernels"])  # the same kernels ran
    assert {k["served_by"] for k in first["kernels"].values()} <= {"tunebook", "adopted"}
    subclassed = [k for k in first["kernels"].values() if k["class"] != "triton.runtime.autotuner.Autotuner"]
    subclassed = [k for k in subclassed if k["class"] != "tunebook._autotuner.Autotuner"]
    assert len(subclassed) >= subclass_kernels
    assert all(k["served_by"] == "adopted" for k in subclassed)
    assert first["stats"]["benchmarked"] > 0
    assert first["triton_benchmarked"] == 0
    after = first["after_unpatch"]
    assert after["run_is_tritons"] and after["autotune_is_tritons"] and not after["adopted_left"]
    assert after["triton_benchmarked"] > 0 and after["tunebook_benchmarked"] == 0
    assert all(k["cache_type"] == "dict" for k in after["kernels"].values() if k["served_by"] != "tunebook")

    second = run_ops(library, "hook", tmp_path / "second", env={**book, "TUNEBOOK_PATCH": "1"})
    assert second["patched"], second["stderr"]
    assert_same(first["outputs"], second["outputs"], exact=True)
    assert second["stats"]["benchmarked"] == 0, second["stats"]
    assert second["stats"]["misses"] == 0 and second["stats"]["book_hits"] > 0
    assert second["triton_benchmarked"] == 0
    assert {name: k["best_config"] for name, k in second["kernels"].items()} == {
        name: k["best_config"] for name, k in first["kernels"].items()
    }
    assert "tunebook:" not in second["stderr"]
    return {"reference": reference, "first": first, "second": second}


def test_fla_core_remembers_every_autotuner_including_its_subclass(
    tmp_path: Path, installed_hook: Path
) -> None:
    pytest.importorskip("fla", reason="fla-core is installed by the test extra")
    runs = check_library("fla", "patch-before-import", tmp_path, subclass_kernels=3, hook=installed_hook)
    # fla's @triton.autotune kernels were decorated by the patched decorator (the fast path);
    # the second process, patched at `import triton` by the hook, decorated them the same way.
    assert {k["served_by"] for k in runs["second"]["kernels"].values()} == {"tunebook", "adopted"}


def test_liger_kernel_decorated_before_the_patch_remembers(tmp_path: Path, installed_hook: Path) -> None:
    pytest.importorskip("liger_kernel", reason="liger-kernel is installed by the test extra")
    runs = check_library("liger", "patch-after-import", tmp_path, subclass_kernels=0, hook=installed_hook)
    # Every kernel was decorated before the patch, and adopted; the hook's process decorated
    # them with tunebook's decorator: both found the same pages of the book.
    assert {k["served_by"] for k in runs["first"]["kernels"].values()} == {"adopted"}
    assert {k["served_by"] for k in runs["second"]["kernels"].values()} == {"tunebook"}
