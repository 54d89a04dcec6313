"""`python -m tunebook.demo`, as a new user runs it after reading the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_demo_passes_and_leaves_no_temporary_book_behind(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("TUNEBOOK_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook.demo"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: the second process benchmarked nothing" in proc.stdout
    assert "removed" in proc.stdout
    # the book it shows: one page, its one key with every config measured (4 on the CPU)
    assert "the book: 1 page(s)" in proc.stdout and ": 1 key(s), 4 measured config(s)" in proc.stdout, (
        proc.stdout
    )
    assert list(tmp_path.iterdir()) == []
