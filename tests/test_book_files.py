"""The book on disk: bad files never break a kernel call, writers never lose each other's work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import tunebook
from conftest import TESTS, book_files
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import (
    DirectoryStore,
    Document,
    Entry,
    Result,
    config_id,
    config_record,
    read_document,
)


def tuned_add(replay: Replay | None = None):
    replay = replay or Replay({32: 3.0, 64: 1.0, 128: 2.0})
    return tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel), replay


def call(kernel, n: int = 300) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def make_book(book_dir: Path) -> Path:
    """Tune one key (n=300); the file that holds it (format 2: the key's file in its page)."""
    kernel, _ = tuned_add()
    call(kernel)
    (page,) = book_files(book_dir)
    (path,) = (p for p in page.glob("*.json") if p.name != "page.json")
    return path


BAD_CONTENTS = {
    "corrupt": b"{ this is not json",
    "truncated": None,  # filled in from a real book
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "foreign": json.dumps({"some": "other tool's cache"}).encode(),
    "newer": None,
    "wrong-types": None,
    "deep-nesting": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("kind", sorted(BAD_CONTENTS))
def test_unusable_book_file_is_skipped_with_one_warning(kind, book_dir, caplog):
    path = make_book(book_dir)
    good = path.read_text()
    data = BAD_CONTENTS[kind]
    if kind == "truncated":
        data = good[: len(good) // 2].encode()
    elif kind == "newer":
        doc = json.loads(good)
        doc["version"] = 99
        data = json.dumps(doc).encode()
    elif kind == "wrong-types":
        doc = json.loads(good)
        next(iter(doc["results"].values()))["ms"] = "fast"
        data = json.dumps(doc).encode()
    path.write_bytes(data)
    tunebook.reset_stats()

    kernel, _ = tuned_add()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(kernel)  # no exception: the kernel runs, tuned afresh
        call(kernel, 301)
    book_warnings = [str(w.message) for w in caught if issubclass(w.category, tunebook.BookWarning)]
    assert tunebook.stats()["benchmarked"] == 6
    if kind == "newer":
        # A newer tunebook's book is neither read nor replaced: one warning for each.
        assert len(book_warnings) == 2, book_warnings
        assert "newer tunebook" in book_warnings[0] and "upgrade" in book_warnings[0]
        assert "leaving" in book_warnings[1] and "as it is" in book_warnings[1]
        assert path.read_bytes() == data and not list(path.parent.glob("*.corrupt-*"))
        return
    assert len(book_warnings) == 1, book_warnings
    assert str(path) in book_warnings[0]
    # The unreadable file was kept aside, not destroyed, and a good book replaced it.
    aside = list(path.parent.glob("*.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data
    assert read_document(path.parent) is not None


def test_an_oversized_book_is_neither_read_nor_replaced(book_dir, monkeypatch):
    path = make_book(book_dir)
    before = path.read_bytes()
    from tunebook._book import pagedir

    monkeypatch.setattr(pagedir, "MAX_ENTRY_BYTES", len(before) - 1)
    tunebook.reset_stats()
    kernel, _ = tuned_add()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tunebook.BookWarning)
        call(kernel)  # tuned again; the write is refused rather than displacing the big file
    assert tunebook.stats()["benchmarked"] == 3
    assert path.read_bytes() == before and not list(path.parent.glob("*.corrupt-*"))


def test_oversized_book_is_not_read(book_dir, monkeypatch):
    path = make_book(book_dir)
    from tunebook._book import files, pagedir

    monkeypatch.setattr(pagedir, "MAX_ENTRY_BYTES", path.stat().st_size - 1)
    with pytest.warns(tunebook.BookWarning, match="over the .*limit"):
        doc = read_document(path.parent)
        assert doc is not None and not doc.entries
    old = book_dir / "format-1.json"
    old.write_text("{}")
    monkeypatch.setattr(files, "MAX_BOOK_BYTES", 1)
    with pytest.warns(tunebook.BookWarning, match="over the .*limit"):
        assert read_document(old) is None


def test_a_book_of_another_kernel_version_under_the_right_name_is_ignored(book_dir):
    page = make_book(book_dir).parent / "page.json"
    doc = json.loads(page.read_text())
    doc["kernel"]["hash"] = "0" * 64
    page.write_text(json.dumps(doc))
    tunebook.reset_stats()
    kernel, _ = tuned_add()
    with pytest.warns(tunebook.BookWarning, match="another kernel version"):
        call(kernel)
    assert tunebook.stats()["benchmarked"] == 3
    # Never merged into (issue 10 item 9): the foreign page is kept aside, whole, and ours is new.
    (aside,) = book_dir.glob("*.foreign-*")
    assert json.loads((aside / "page.json").read_text())["kernel"]["hash"] == "0" * 64
    assert json.loads(page.read_text())["kernel"]["hash"] != "0" * 64


def _result(block: int, ms: float | None, error: str | None = None) -> tuple[str, Result]:
    record = config_record({"BLOCK": block}, {"num_warps": 4})
    return config_id(record), Result(record, (ms, ms, ms) if ms is not None else None, error, "t")


def _doc(entries: dict[str, Entry]) -> Document:
    return Document(kernel={"hash": "h", "name": "k"}, platform={"device": "d"}, entries=entries)


def test_written_books_are_deterministic(tmp_path):
    """The same entries, given in another order (keys and results), give the same bytes."""
    results = [_result(32, 1.0), _result(64, 2.0)]
    entries = {"[1]": Entry((1,), dict(results)), "[2]": Entry((2,), dict(results[::-1]))}
    reordered = {"[2]": Entry((2,), dict(results)), "[1]": Entry((1,), dict(results[::-1]))}
    store = DirectoryStore(tmp_path)
    store.merge("k--a.json", _doc(entries))
    store.merge("k--b.json", _doc(reordered))
    a, b = sorted(tmp_path.glob("k--*"))
    assert sorted(p.name for p in a.glob("*.json")) == ["1.json", "2.json", "page.json"]
    assert all((a / p.name).read_bytes() == (b / p.name).read_bytes() for p in a.glob("*.json"))


WRITER = """
import json, os, sys, time
import torch, triton, tunebook
from small_kernels import Replay, add_kernel, grid_1d, vectors
replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
kernel = tunebook.autotune([triton.Config({"BLOCK": b}) for b in (32, 64, 128)], key=["n"],
                           do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)
go = sys.argv[1]
open(go + "." + sys.argv[3], "w").close()  # ready: imported and waiting at the start line
while not os.path.exists(go):
    time.sleep(0.001)
for n in json.loads(sys.argv[2]):
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    assert torch.allclose(out, x + y)
print(json.dumps(tunebook.stats()))
"""


@pytest.mark.slow
def test_concurrent_processes_tuning_different_keys_all_end_up_in_the_book(book_dir, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    key_sets = [list(range(100 + i, 160, 4)) for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(go), json.dumps(keys), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, keys in enumerate(key_sets)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.{i}").exists() for i in range(len(key_sets))):
        assert time.monotonic() < deadline, "the writers never reached the start line"
        time.sleep(0.01)
    go.touch()  # all start their first key at the same moment
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["benchmarked"] == 3 * 15
    (path,) = book_files(book_dir)
    doc = read_document(path)
    assert doc is not None
    expected = {n for keys in key_sets for n in keys}
    assert {e.key[0] for e in doc.entries.values()} == expected
    assert all(len(e.results) == 3 for e in doc.entries.values())


def test_book_files_are_readable_by_others_as_the_umask_allows(book_dir):
    old = os.umask(0o022)
    try:
        path = make_book(book_dir)
    finally:
        os.umask(old)
    for written in (path, path.parent / "page.json"):
        assert written.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
