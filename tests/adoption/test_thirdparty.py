"""Kernels written the way libraries write them (thirdparty.py), in real processes.

The same process sequence as the real libraries' test, on every option libraries use and
four subclasses of Triton's Autotuner: Triton alone; patched before the import (decorated
by tunebook's decorator); patched after it (every kernel decorated before the patch, all
adopted); the start-up hook. Decorated and adopted kernels share their pages of the book:
the third and fourth processes benchmark nothing that tunebook serves. The two
subclasses tunebook cannot serve keep Triton's behaviour in every process, and are named.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_libraries import assert_same, installed_hook, reference_and_first, run_ops

pytestmark = pytest.mark.slow
UNSERVED = {"thirdparty.own_run", "thirdparty.own_bench"}
__all__ = ["installed_hook"]  # the fixture, shared


def served(report: dict) -> dict[str, str]:
    return {name: kernel["served_by"] for name, kernel in report["kernels"].items()}


def test_kernels_written_like_libraries_remember_in_every_way_of_patching(
    tmp_path: Path, installed_hook: Path
) -> None:
    book = {"TUNEBOOK_DIR": str(tmp_path / "book")}
    reference, before = reference_and_first("thirdparty", "patch-before-import", tmp_path, book)
    after = run_ops("thirdparty", "patch-after-import", tmp_path / "after", env=book)
    hooked = run_ops("thirdparty", "hook", tmp_path / "hook", env={**book, "TUNEBOOK_PATCH": "1"})

    assert set(served(reference)) == set(served(before)) == set(served(after)) == set(served(hooked))
    assert_same(reference["outputs"], before["outputs"], exact=False)
    for later in (after, hooked):
        assert_same(before["outputs"], later["outputs"], exact=True)
        assert later["stats"]["benchmarked"] == 0, later["stats"]

    for report, decorated in ((before, "tunebook"), (after, "adopted"), (hooked, "tunebook")):
        kinds = served(report)
        assert {kinds[name] for name in UNSERVED} == {"triton"}
        assert kinds["thirdparty.cached_like"] == kinds["thirdparty.prunes_itself"] == "adopted"
        assert (
            kinds["thirdparty.plain"] == kinds["thirdparty.pruned"] == kinds["thirdparty.wide"] == decorated
        )
        # The unserved kernels tune on Triton's path, with their own timer, in every process.
        assert report["host_clock_timed"] == 6
        assert "PatchWarning" in report["stderr"]
        assert "thirdparty.OwnRun (overrides run() without calling Autotuner.run())" in report["stderr"]
        assert "thirdparty.OwnBench (overrides _bench)" in report["stderr"]
    # Patched after the import, both subclasses were found at once: one warning names both.
    assert "2 subclasses of Triton's Autotuner keep Triton's own tuning" in after["stderr"]
    assert before["stats"]["benchmarked"] > 0

    for report in (before, after):
        left = report["after_unpatch"]
        assert left["run_is_tritons"] and left["autotune_is_tritons"] and not left["adopted_left"]
        assert left["triton_benchmarked"] == 3 and left["tunebook_benchmarked"] == 0
        kinds = {name: k["cache_type"] for name, k in left["kernels"].items() if k["served_by"] == "triton"}
        assert set(kinds.values()) == {"dict"}
