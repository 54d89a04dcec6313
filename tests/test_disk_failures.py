"""A full disk or a vanished book directory never fails a kernel call or loses the book.

ENOSPC is injected where a real full disk reports it: part-way through writing the temp
file, or at its fsync (delayed allocation). For each condition: the kernel call returns
the right answer, the error is logged once, the book file on disk is byte-for-byte what it
was, no temp file is left behind, and writing resumes once the condition clears.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tunebook
from conftest import book_files, page_files
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import BookWarning, read_document

TABLE = {16: 0.3, 32: 0.2, 64: 0.25}


def _tuner() -> Any:
    replay = Replay(TABLE)
    return tunebook.autotune(block_configs(*TABLE), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
        add_kernel
    )


def _call(tuner: Any, n: int) -> None:
    x, y, out = vectors(n, seed=n)
    tuner[grid_1d(n)](x, y, out, n)
    assert bool((out == x + y).all()), "the kernel call returned a wrong answer"


def _keys_on_disk(directory: Path) -> set[int]:
    keys: set[int] = set()
    for path in book_files(directory):
        doc = read_document(path)
        assert doc is not None, f"{path} does not parse"
        keys |= {entry.key[0] for entry in doc.entries.values()}
    return keys


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunebook" and r.levelno >= logging.WARNING]


def _book_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if issubclass(w.category, BookWarning)]


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FillsUp:
    """A text file handle that writes half of what it is given, then reports a full disk."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, text: str) -> int:
        self._handle.write(text[: len(text) // 2])
        self._handle.flush()
        raise _no_space()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _in(directory: Path, fd: int) -> bool:
    with contextlib.suppress(OSError):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return directory.resolve() in path.parents and path.suffix == ".tmp"  # a book's temp file
    return True  # no /proc: every fdopen during the injection is the book's


@contextlib.contextmanager
def _disk_full(where: str, directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as patch:
        if where == "write":
            real_fdopen = os.fdopen

            def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
                handle = real_fdopen(fd, *args, **kwargs)
                return _FillsUp(handle) if _in(directory, fd) else handle

            patch.setattr(os, "fdopen", fdopen)
        else:
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if _in(directory, fd):  # the temp file; the directory itself is its own parent
                    raise _no_space()
                real_fsync(fd)

            patch.setattr(os, "fsync", fsync)
        yield


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk(
    where: str,
    book_dir: Path,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, logger="tunebook")
    tuner = _tuner()
    _call(tuner, 64)
    (page,) = book_files(book_dir)
    before = page_files(page)

    with _disk_full(where, book_dir, monkeypatch):
        _call(tuner, 96)
        _call(tuner, 128)
        _call(tuner, 96)  # remembered in memory meanwhile
        assert page_files(page) == before, "a failed write changed the book"

    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "No space left on device" in warnings[0]
    assert len(_book_warnings(recwarn)) == 1
    assert not [p.name for p in book_dir.rglob("*.tmp")], "a temp file was left behind"
    assert _keys_on_disk(book_dir) == {64}

    _call(tuner, 160)  # the disk has room again: what was tuned meanwhile is written too
    assert _keys_on_disk(book_dir) == {64, 96, 128, 160}
    assert len(_warnings(caplog)) == 1


def test_directory_vanishes_between_calls(book_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tunebook")
    tuner = _tuner()
    _call(tuner, 64)
    shutil.rmtree(book_dir)

    _call(tuner, 96)  # the next write recreates the directory
    _call(tuner, 64)  # and what this process tuned before is still served
    assert _keys_on_disk(book_dir) == {96}
    assert _warnings(caplog) == []


def test_directory_replaced_by_a_file(
    book_dir: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    caplog.set_level(logging.WARNING, logger="tunebook")
    tuner = _tuner()
    _call(tuner, 64)
    shutil.rmtree(book_dir)
    book_dir.write_text("not a directory")  # cannot be recreated while this is here

    _call(tuner, 96)
    _call(tuner, 128)
    _call(tuner, 64)
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert len(_book_warnings(recwarn)) == 1
    assert book_dir.read_text() == "not a directory"

    book_dir.unlink()
    _call(tuner, 160)  # writable again: the keys tuned while it was not are written too
    assert _keys_on_disk(book_dir) == {96, 128, 160}


def test_a_book_yet_to_be_created_is_probed_where_it_would_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tunebook tune`, `python -m tunebook.kernels tune --out` and the LLM demo's `tune --out`
    ask this before work whose results would be lost. Permission bits said yes to root where
    creating the directory then failed (``/proc``; an NFS export that squashes root): the
    tuning ran, and its results were kept in memory only. Bits that say yes (as they do for
    root) must not decide it."""
    from tunebook._writable import write_problem

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    problem = write_problem(Path("/proc/tunebook-no-such-dir/book"))
    assert problem is not None and problem.startswith("cannot create it in /proc: "), problem
    assert write_problem(tmp_path / "new" / "book") is None
    assert list(tmp_path.iterdir()) == [], "the probe is removed"


KERNEL = {"name": "k", "hash": "h", "key": ["n"], "id": "x"}
PAGE = "k--x--t--p.json"


def _misses(*ns: int, call: Any = None) -> Any:
    from tunebook._book import Document, Entry

    return Document(KERNEL, {"id": "p"}, {f"[{n}]": Entry((n,), misses=1, call=call) for n in ns})


def test_a_serve_mode_miss_the_directory_refused_goes_with_the_pages_next_miss_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused miss record is kept (it was dropped), and the next miss record of its page,
    once the directory takes it, carries it: the count of the key's misses adds up."""
    import warnings

    from tunebook._book import DirectoryStore, unwritten

    monkeypatch.setattr(unwritten, "MISS_RETRY_S", 0.0)  # the next miss offers the held ones again
    store = DirectoryStore(tmp_path / "book")
    with _disk_full("fsync", tmp_path, monkeypatch), warnings.catch_warnings():
        warnings.simplefilter("ignore", BookWarning)
        assert not unwritten.write_misses(store, PAGE, _misses(1))
    assert unwritten.write_misses(store, PAGE, _misses(1, 2))  # space again
    stored = store.fetch(PAGE)
    assert stored is not None
    assert {k: e.misses for k, e in stored.entries.items()} == {"[1]": 2, "[2]": 1}
    assert unwritten._held_misses == {} and unwritten._held_keys == 0


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from tunebook._book import DirectoryStore

    offered: list[str] = []
    real = DirectoryStore.merge_partly

    def merge_partly(self: Any, name: str, doc: Any) -> Any:
        offered.append(name)
        return real(self, name, doc)

    monkeypatch.setattr(DirectoryStore, "merge_partly", merge_partly)
    return offered


def test_held_misses_are_capped_and_a_refusing_directory_is_not_offered_every_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """Held miss records had no limit (5,000 keys: 48 MB; 20,000: 165 MB), and each new miss
    re-merged the page's whole held set and offered it to the directory again. Now at most
    MAX_HELD_MISS_KEYS keys are held, what goes past is counted; a miss within MISS_RETRY_S of
    the last refusal is only added to the held set."""
    from tunebook._book import DirectoryStore, unwritten

    monkeypatch.setattr(unwritten, "MAX_HELD_MISS_KEYS", 50)
    monkeypatch.setattr(unwritten, "MISS_RETRY_S", 3600.0)
    offered = _count_writes(monkeypatch)
    store = DirectoryStore(tmp_path / "book")
    with _disk_full("fsync", tmp_path, monkeypatch):
        for n in range(200):
            assert not unwritten.write_misses(store, PAGE, _misses(n, call={"args": []}))
        assert not unwritten.write_misses(store, PAGE, _misses(7))  # a key already held: adds to it
        assert len(offered) == 1, "the first refusal only: the others wait for MISS_RETRY_S"
        (held,) = unwritten._held_misses.values()
        kept = held.pages[PAGE][1]
        assert len(kept) == 50 == unwritten._held_keys and kept["[7]"].misses == 2
        assert (held.over_keys, held.over_misses) == (150, 150)
        assert unwritten.write_refused_at_exit(5.0) == 0
    said = [w for w in _book_warnings(recwarn) if "were not written" in w]
    assert len(said) == 1, said
    assert "51 serve-mode miss(es) of 50 key(s)" in said[0], said
    assert "150 serve-mode miss(es) not kept past the 50 keys held" in said[0], said


def test_a_miss_record_refused_for_good_is_counted_only_until_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory refused for good (a file in its path, read-only, permissions) is not
    offered each miss again before exit, and the held records lose their call descriptions
    (counts only); at exit they are offered once more."""
    import warnings

    from tunebook._book import DirectoryStore, unwritten

    monkeypatch.setattr(unwritten, "MISS_RETRY_S", 0.0)  # a refusal for good waits all the same
    offered = _count_writes(monkeypatch)
    (tmp_path / "a-file").write_text("not a directory")
    store = DirectoryStore(tmp_path / "a-file" / "book")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BookWarning)
        for n in (1, 2, 1):
            assert not unwritten.write_misses(store, PAGE, _misses(n, call={"args": []}))
    assert len(offered) == 1
    (held,) = unwritten._held_misses.values()
    assert held.final
    assert {k: (e.misses, e.call) for k, e in held.pages[PAGE][1].items()} == {
        "[1]": (2, None),
        "[2]": (1, None),
    }
    (tmp_path / "a-file").unlink()  # the directory can be made now
    assert unwritten.write_refused_at_exit(5.0) == 0
    stored = store.fetch(PAGE)
    assert stored is not None
    assert {k: e.misses for k, e in stored.entries.items()} == {"[1]": 2, "[2]": 1}


def test_a_miss_record_refused_partway_holds_only_the_keys_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up at the 2nd of 3 keys of a miss record has written the 1st: it was
    held with the others all the same, and written again at exit: misses add up on merge, so
    the book counted it twice. Now only the keys not written are held."""
    import warnings

    from tunebook._book import DirectoryStore, Document, Entry, unwritten

    book = tmp_path / "book"
    store = DirectoryStore(book)
    kernel = {"name": "k", "hash": "h", "key": ["n"], "id": "x"}
    name = "k--x--t--p.json"

    def misses(*ns: int) -> Document:
        return Document(kernel, {"id": "p"}, {f"[{n}]": Entry((n,), misses=1) for n in ns})

    assert unwritten.write_misses(store, name, misses(0))  # the page exists
    real_fsync = os.fsync
    synced = []

    def fsync(fd: int) -> None:
        if _in(book, fd):
            synced.append(fd)
            if len(synced) > 1:  # the disk is full from the 2nd key's temp file on
                raise _no_space()
        real_fsync(fd)

    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", BookWarning)
        patch.setattr(os, "fsync", fsync)
        assert not unwritten.write_misses(store, name, misses(1, 2, 3))
    assert len(synced) == 2
    assert unwritten.write_refused_at_exit(5.0) == 0  # space again: the exit writes what was held
    stored = store.fetch(name)
    assert stored is not None
    assert {k: e.misses for k, e in stored.entries.items()} == {"[0]": 1, "[1]": 1, "[2]": 1, "[3]": 1}


def test_a_page_counts_the_results_its_directory_refused(tmp_path: Path) -> None:
    """What a sweep's report counts (SweepReport.unsaved): tune_on_ray into a book that refuses
    writes said "done" with one warning, and nothing told the program its results were
    held in memory only."""
    import warnings

    from tunebook._book import Book, Entry, KernelIdentity, Result

    (tmp_path / "a-file").write_text("not a directory")
    kernel = KernelIdentity("k", "h", ("n",))
    page = Book(tmp_path / "a-file" / "book").open(kernel, {"backend": "t"}, "t", "p")
    ok = Result({"kwargs": {"B": 1}}, (1.0, 1.0, 1.0), None, "2026-01-01T00:00:00Z")
    two = Result({"kwargs": {"B": 2}}, (2.0, 2.0, 2.0), None, "2026-01-01T00:00:00Z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BookWarning)
        page.record("[1]", Entry(key=(1,), results={"B=1|": ok, "B=2|": two}))
    assert page.unsaved() == 2
    good = Book(tmp_path / "book").open(kernel, {"backend": "t"}, "t", "p")
    good.record("[1]", Entry(key=(1,), results={"B=1|": ok}))
    assert good.unsaved() == 0


def test_held_misses_the_writer_is_offering_as_the_process_exits_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """The miss writer took a page's held records out of the table while it wrote them: an
    exit whose queue flush gave up meanwhile (slow NFS, a busy lock) neither retried nor
    counted them. Now they are marked in flight, and counted."""
    import threading

    from tunebook._book import DirectoryStore, unwritten

    monkeypatch.setattr(unwritten, "MISS_RETRY_S", 0.0)
    store = DirectoryStore(tmp_path / "book")
    with _disk_full("fsync", tmp_path, monkeypatch):
        assert not unwritten.write_misses(store, PAGE, _misses(*range(100)))  # 100 held
        real = DirectoryStore.merge_partly
        writing, go_on = threading.Event(), threading.Event()

        def slow(self: Any, name: str, doc: Any) -> Any:
            writing.set()
            go_on.wait(30)
            return real(self, name, doc)

        monkeypatch.setattr(DirectoryStore, "merge_partly", slow)
        writer = threading.Thread(target=unwritten.write_misses, args=(store, PAGE, _misses(100)))
        writer.start()
        assert writing.wait(30)
        try:
            unwritten.write_refused_at_exit(0.1)  # meanwhile, the exit
        finally:
            go_on.set()
            writer.join(30)
    said = [w for w in _book_warnings(recwarn) if "were not written" in w]
    assert len(said) == 1, said
    assert "101 serve-mode miss(es) of 101 key(s) still being written" in said[0], said
    unwritten._held_misses.clear()  # what the writer held again after the exit: nobody's to write
    unwritten._held_keys = 0


def test_a_directory_refused_for_good_is_said_at_the_first_miss_not_again_at_exit(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """A read-only TUNEBOOK_DIR (by design, in a container) warned twice in each process: at the
    first miss, then at exit with the raw errno text. Now once, at the first miss."""
    from tunebook._book import DirectoryStore, unwritten

    (tmp_path / "a-file").write_text("not a directory")
    store = DirectoryStore(tmp_path / "a-file" / "book")
    for n in range(40):
        assert not unwritten.write_misses(store, PAGE, _misses(n))
    assert unwritten.write_refused_at_exit(5.0) == 0
    said = _book_warnings(recwarn)
    assert len(said) == 1, said
    assert "cannot write to book directory" in said[0] and "a part of its path, is a file" in said[0], said
