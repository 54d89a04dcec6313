"""A format-2 page directory (``_book/pagedir.py``) at its edges: news pending for one key is
never taken by another, a file name that is not UTF-8 never raises out of a read, one key
file that must be left alone does not stop the page's other writes, and a page.json another
process creates while this one looks is not taken for a corrupt one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import tunebook
from tunebook._book import DirectoryStore, Entry, Result, config_id, files, pagedir
from tunebook._book.pages import Book, KernelIdentity

KERNEL = {"name": "k", "hash": "h1", "key": ["n"], "id": "x"}
META: dict[str, Any] = {"kernel": KERNEL, "platform": {"id": "p"}}


def _entry(key: tuple[Any, ...], block: int, ms: float) -> Entry:
    config = {"kwargs": {"BLOCK": block}, "num_warps": 4}
    return Entry(key, {config_id(config): Result(config, (ms, ms, ms))})


def _holding(lock_file: Path) -> subprocess.Popen[str]:
    """Another process holding a key's lock (a frozen writer) until it is killed."""
    code = (  # the lock object kept in a name: one collected at once would release it
        "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_keys_write_folds_in_its_own_pending_news_only(tmp_path: Path) -> None:
    # Key [1,2]'s file name is a prefix of key [1,2.5]'s: the news pending for [1,2.5] (its
    # lock was held) must survive a write of [1,2], which deletes the news it folds in.
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    longer = "[1,2.5]"
    lock = pagedir._hidden(page, "locks") / f"{pagedir._stem(pagedir.key_file_name(longer))}.lock"
    holder = _holding(lock)
    try:
        pagedir.merge_key(page, META, longer, _entry((1, 2.5), 64, 1.0))
    finally:
        holder.kill()
        holder.wait()
    pending = sorted(p.name for p in (page / pagedir.HIDDEN / "pending").iterdir())
    assert len(pending) == 1 and pending[0].startswith("1,2.5.")
    pagedir.merge_key(page, META, "[1,2]", _entry((1, 2), 128, 2.0))
    assert sorted(p.name for p in (page / pagedir.HIDDEN / "pending").iterdir()) == pending
    kept = pagedir.read_key(page, META, longer)
    assert kept is not None and kept.best(list(kept.results)) == "BLOCK=64|num_warps=4"


def test_a_file_name_that_is_not_utf8_never_raises_out_of_a_read(tmp_path: Path) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    pagedir.merge_key(page, META, "[7]", _entry((7,), 64, 1.0))
    with open(os.path.join(os.fsencode(page), b"'\xff'.json"), "w") as f:  # not ours: a hostile name
        f.write("{}")
    store = DirectoryStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the foreign file is skipped with a warning
        document, why = files.read_book_file(page)
        index = store.fetch(page.name + ".json", ())
        everything = store.fetch(page.name + ".json")
    assert why is None and document is not None and list(document.entries) == ["[7]"]
    assert index is not None and index.index == frozenset({"[7]"})
    assert everything is not None and list(everything.entries) == ["[7]"]
    assert pagedir.key_file_name('["\udcff"]').startswith("#")  # a lone surrogate: a hashed name


def test_the_warning_naming_a_file_that_is_not_utf8_can_be_written_as_utf8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The name reaches the message as a lone surrogate; a handler writing UTF-8 (a log file,
    # pytest-xdist sending the captured log between processes) failed on it.
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    with open(os.path.join(os.fsencode(page), b"'\xff'.json"), "w") as f:
        f.write("{}")
    with pytest.warns(tunebook.BookWarning) as caught, caplog.at_level("WARNING", logger="tunebook"):
        files.read_book_file(page)
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any("\\udcff" in t for t in texts)  # the byte, named
    for text in texts:
        text.encode("utf-8")


def test_one_key_file_left_alone_does_not_stop_the_pages_other_writes(tmp_path: Path) -> None:
    # A newer tunebook wrote key [2] in a directory two versions share: that file is left
    # alone, the result stays in memory and is offered again, and every other key is written.
    page = Book(tmp_path).open(KernelIdentity("k", "h1", ("n",)), {"id": "p"}, "cpu", "p")
    page.record("[1]", _entry((1,), 64, 1.0))
    directory = tmp_path / pagedir.page_dir_name(page.file_name)
    newer = {"format": "tunebook-entry", "version": pagedir.VERSION + 1, "key": [2]}
    (directory / "2.json").write_text(json.dumps(newer))
    with pytest.warns(UserWarning, match=r"leaving the file of key \[2\].*newer tunebook"):
        page.record("[2]", _entry((2,), 64, 1.0))
    for n in (3, 4, 5):
        page.record(f"[{n}]", _entry((n,), 64, 1.0))
    assert sorted(p.name for p in directory.glob("*.json")) == [f"{n}.json" for n in (1, 2, 3, 4, 5)] + [
        "page.json"
    ]
    assert json.loads((directory / "2.json").read_text()) == newer  # untouched
    assert sorted(page.layers[0].pending) == ["[2]"]  # offered again with the next write


def test_a_page_json_created_meanwhile_is_not_kept_aside_as_corrupt(tmp_path: Path, monkeypatch) -> None:
    # Between this process finding no page.json and looking again, another process created
    # it (an atomic rename): read it again instead of moving a good file aside.
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    real = pagedir.read_page_file
    calls = []

    def first_not_there_yet(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
        calls.append(directory)
        return (None, None) if len(calls) == 1 else real(directory)

    monkeypatch.setattr(pagedir, "read_page_file", first_not_there_yet)
    pagedir.ensure_page(page, META)
    assert len(calls) == 2
    assert sorted(p.name for p in page.iterdir() if p.name != pagedir.HIDDEN) == ["page.json"]


def test_a_damaged_page_json_skipped_by_one_reader_is_still_reported_as_read_by_the_autotuner(
    tmp_path: Path,
) -> None:
    # A sibling search (no expected identity) skips the page and warns so; the autotuner's
    # own read, which reads the keys and rewrites page.json, must say that too, not be taken
    # for the same warning and kept quiet.
    from tunebook import _warnings

    _warnings.forget()
    name = "k--x--cpu--p.json"
    store = DirectoryStore(tmp_path)
    page = tmp_path / pagedir.page_dir_name(name)
    pagedir.merge_entries(page, META, {"[1]": _entry((1,), 64, 1.0)})
    (page / pagedir.PAGE_FILE).write_text("")
    with pytest.warns(tunebook.BookWarning, match="skipping the page"):
        assert DirectoryStore(tmp_path, writable=False).fetch(name, ["[1]"]) is None
    with pytest.warns(tunebook.BookWarning, match="keys were read without it.*It was rewritten"):
        doc = store.fetch(name, ["[1]"], expected=META)
    assert doc is not None and list(doc.entries) == ["[1]"]
    assert pagedir.read_meta(page) == META


def test_a_keys_files_under_other_names_are_read_and_folded_into_its_file_before_they_go(
    tmp_path: Path,
) -> None:
    """A copy of a key's file ("<name> (copy).json") and a key file whose name is not UTF-8
    were never read (the key's name said another key, or none), and replace_page deleted the
    copy: its results were lost, and the key of the other missing from every reader."""
    page = tmp_path / "k--p"
    pagedir.ensure_page(page, META)
    own = page / pagedir.key_file_name("[1]")
    own.write_text(pagedir.entry_text(_entry((1,), 64, 1.0), META))
    copy = page / (own.name[: -len(".json")] + " (copy).json")
    copy.write_text(pagedir.entry_text(_entry((1,), 128, 2.0), META))
    odd = os.fsencode(page) + b"/\xff.json"
    with open(odd, "w") as f:
        f.write(pagedir.entry_text(_entry((2,), 64, 3.0), META))
    found = pagedir.read_all(page, META)
    assert sorted(found) == ["[1]", "[2]"] and len(found["[1]"].results) == 2
    # Without a fold (an import replaces keys) a written key's other files go with the file it
    # replaces (a whole-book reader would fold the copy's configs back in); others' stay.
    pagedir.replace_page(page, META, {"[1]": _entry((1,), 64, 1.0)}, 5.0)
    assert not copy.exists() and os.path.exists(odd)
    assert len(pagedir.read_all(page, META)["[1]"].results) == 1
    copy.write_text(pagedir.entry_text(_entry((1,), 128, 2.0), META))
    # With one (merge's), they are folded into the key's own file, then removed.
    pagedir.replace_page(page, META, found, 5.0, fold=lambda a, b: b.merged_over(a))
    assert not copy.exists() and not os.path.exists(odd)
    again = pagedir.read_all(page, META)
    assert {k: len(e.results) for k, e in again.items()} == {"[1]": 2, "[2]": 1}
    assert sorted(os.listdir(page)) == sorted(
        [".tunebook", "page.json", own.name, pagedir.key_file_name("[2]")]
    )
