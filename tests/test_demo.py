"""`python -m tunebook.demo`, as a new user runs it after reading the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The demo's plumbing (two processes, what it prints): the same tune-then-serve in two
# processes runs on every Triton in test_guide_quickstart.py. Last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once


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


def test_a_book_that_is_a_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    """It once ran both processes, each warned into its discarded stderr, and the demo ended
    with "UNEXPECTED: see the table above." and no reason."""
    book = tmp_path / "afile"
    book.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook.demo", "--book", str(book)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert f"cannot write the book at {book} ({book} is not a directory)" in message
    assert "pass a writable directory" in message and "UNEXPECTED" not in proc.stdout


@pytest.mark.slow
def test_what_the_processes_warned_is_shown_when_the_demo_fails(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Past the check above (a book that stops taking writes after it), the children's own
    warnings say why the second process had nothing to remember."""
    from tunebook.demo.__main__ import _demo

    book = tmp_path / "afile"
    book.write_text("")
    assert _demo(book, on_gpu=False, kept=True) == 1
    printed = capsys.readouterr().out
    assert "UNEXPECTED: see the table above; the processes warned:" in printed
    assert f"cannot write to book directory {book} (it is a file, not a directory)" in printed
