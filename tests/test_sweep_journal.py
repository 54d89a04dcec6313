"""A sweep worker's journal (tunebook._worker.journal): what a killed worker finished reaches the
book, a live worker's journal is left alone, a torn last line is ignored."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import book_files
from tunebook._book import Result, config_id, read_document
from tunebook._worker.journal import DIRECTORY, Journal, fold

PAGE = {
    "file": "add--0123456789abcdef--probe--0123456789abcdef.json",
    "kernel": {"name": "add", "hash": "h" * 16, "key": ["n"], "id": "0123456789abcdef"},
    "platform": {"device": "probe", "id": "0123456789abcdef"},
}


def result(block: int, ms: float | None = 1.0) -> tuple[str, Result]:
    record = {"kwargs": {"BLOCK": block}, "num_warps": 4}
    return config_id(record), Result(record, (ms, ms, ms) if ms is not None else None, None if ms else "boom")


def test_a_dead_workers_journal_goes_into_the_book_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    code = f"""
        import os, signal
        from pathlib import Path
        from tunebook._book import Result, config_id
        from tunebook._worker.journal import Journal
        journal = Journal(Path({str(tmp_path)!r}))
        for block in (32, 64, 128):
            record = {{"kwargs": {{"BLOCK": block}}, "num_warps": 4}}
            journal.append({PAGE!r}, "[300]", [300], config_id(record), Result(record, (1.0, 1.0, 1.0)))
        journal._file.write('{{"page": {{"file": "torn')  # killed halfway through a line
        journal._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(list((tmp_path / DIRECTORY).glob("*.jsonl"))) == 1
    assert fold(tmp_path) == 3
    (path,) = book_files(tmp_path)
    doc = read_document(path)
    assert doc is not None and path.name == PAGE["file"].removesuffix(".json")  # format 2: a page directory
    (entry,) = doc.entries.values()
    assert entry.key == (300,) and sorted(r.config["kwargs"]["BLOCK"] for r in entry.results.values()) == [
        32,
        64,
        128,
    ]
    assert list((tmp_path / DIRECTORY).glob("*.jsonl")) == []  # folded once, then gone
    assert fold(tmp_path) == 0


def test_a_live_workers_journal_is_left_alone(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(PAGE, "[300]", [300], *result(32))
    assert fold(tmp_path) == 0 and book_files(tmp_path) == []
    assert journal.path.exists()


def test_a_journal_that_cannot_be_written_costs_only_the_safety_net(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    journal = Journal(blocker / "book")
    journal.append(PAGE, "[300]", [300], *result(32))  # no exception: the driver has the result
    journal.append(PAGE, "[300]", [300], *result(64))
    assert sum("no journal at" in r.getMessage() for r in caplog.records) == 1
    assert not os.path.exists(blocker / "book")
