"""A sweep worker's journal (tunebook._worker.journal): what a killed worker finished reaches the
book, a live worker's journal is left alone, a torn last line is ignored, and nothing planted
in the journal directory (a FIFO, a device, a dangling link) makes a fold wait or read
without limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import book_files
from tunebook._book import Result, config_id, read_document
from tunebook._worker.journal import DIRECTORY, OLD_DIRECTORIES, Journal, fold

# The Ray sweep worker's journal: files, no kernel runs. Last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once

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


def _dead_journal(directory: Path, blocks: tuple[int, ...]) -> Path:
    """A journal whose writer is gone (nothing holds its flock), one result per block."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gone-1.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for block in blocks:
            cid, res = result(block)
            item = {"page": PAGE, "key_text": "[300]", "key": [300], "cid": cid, "result": res.to_json()}
            fh.write(json.dumps(item) + "\n")
    return path


@pytest.mark.parametrize("plant", ["fifo", "dev-zero", "dangling-link"])
def test_a_hostile_object_in_the_journal_directory_never_hangs_a_fold(plant: str, tmp_path: Path) -> None:
    from test_hostile_files import PLANTS, REASONS, within_deadline

    _dead_journal(tmp_path / DIRECTORY, (64,))  # folded first: the book holds [300] already
    assert fold(tmp_path) == 1
    (page,) = book_files(tmp_path)
    before = {p.name: p.read_bytes() for p in page.glob("*.json")}
    good = _dead_journal(tmp_path / DIRECTORY, (32, 128))
    hostile = tmp_path / DIRECTORY / "planted-2.jsonl"
    PLANTS[plant](hostile)

    taken, found = within_deadline(lambda: fold(tmp_path), [hostile] if plant == "fifo" else [], 20.0)

    assert taken == 2 and not good.exists()  # the journal beside it went into the book
    assert any(str(hostile) in w and REASONS[plant] in w for w in found), found
    assert os.path.lexists(hostile)  # not ours to delete
    doc = read_document(page)
    assert doc is not None
    (entry,) = doc.entries.values()
    assert sorted(r.config["kwargs"]["BLOCK"] for r in entry.results.values()) == [32, 64, 128]
    assert set(before) <= {p.name for p in page.glob("*.json")}  # the book is intact


def test_journals_where_tunebook_wrote_them_before_are_folded_too(tmp_path: Path) -> None:
    old = _dead_journal(tmp_path / OLD_DIRECTORIES[0], (32,))
    assert fold(tmp_path) == 1 and not old.exists()
    (page,) = book_files(tmp_path)
    assert page.name == PAGE["file"].removesuffix(".json")


def test_a_journal_is_written_under_the_books_hidden_directory(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(PAGE, "[300]", [300], *result(32))
    assert journal.path.parent == tmp_path / ".tunebook" / "journal"
    assert not (tmp_path / ".journal").exists()
