"""The directory book at the edges a review of the crash-consistency changes found (one test
per finding): a book shared by two users, `tunebook prune` against a writer of the page it
judged empty, `tunebook tune`'s kept results and the exit's warning, a reader between a
writer's fold and the key's next write, the exit retry's time bound, and the clean-up of a
page creation whose writer is alive after all.

Every writer, reader and command is a real process on real files; where two must meet at
one step, one waits at that step for the other (a file each says "here", then "go on").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TESTS, book_files
from test_cli import entry, module_file, result
from test_crash_consistency import (
    META,
    SRC,
    _child,
    _pending_files,
    _pending_news,
    _unwritable,
    another_kernel,
    read_with_writers_between,
    write_another_kernel,
)
from tunebook._book import DirectoryStore, Document, Entry, pagedir

NAME = "k--0123456789abcdef--cpu--0123456789abcdef.json"  # a page of META's kernel


def _doc(*keys: int) -> Document:
    return Document(
        META["kernel"], META["platform"], {f"[{k}]": entry([k], [result({"BLOCK": 32}, 1.0)]) for k in keys}
    )


def _wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _env(*paths: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(
            [*map(str, paths), str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]
        ),
    }


# ---------------------------------------------------------------- 1. a book shared by two users


@pytest.fixture
def shared_book() -> Iterator[Path]:
    """A book directory anyone may write (mode 1777, as /tmp), under /tmp: pytest's own
    temporary directories are its user's alone (mode 700)."""
    book = Path(tempfile.mkdtemp(prefix="tunebook-shared-")) / "book"
    book.mkdir()
    book.chmod(0o1777)
    book.parent.chmod(0o755)
    yield book
    shutil.rmtree(book.parent)


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="two users need root (a child becomes uid 65534); as one user, nothing in the book is another's",
)
def test_a_user_who_can_write_a_shared_book_creates_pages_in_it_whatever_another_left(
    shared_book: Path,
) -> None:
    old = os.umask(0o022)  # the usual umask: what one user creates, another cannot write into
    try:
        (shared_book / pagedir.HIDDEN / "journal").mkdir(parents=True)  # what a sweep leaves (root's)
        assert DirectoryStore(shared_book).merge("root_kernel" + NAME[1:], _doc(1)) is not None
    finally:
        os.umask(old)
    doc_file = shared_book.parent / "doc.json"
    doc_file.write_text(_doc(2, 3).dumps())
    doc_file.chmod(0o644)
    proc = _child(
        f"""
        import os, filelock
        from pathlib import Path
        from tunebook._book import DirectoryStore, read_document
        doc = read_document(Path({str(doc_file)!r}))
        os.setgid(65534)
        os.setuid(65534)  # nobody, with no capability left
        print("written", DirectoryStore(Path({str(shared_book)!r})).merge({NAME!r}, doc) is not None)
        """
    )
    assert "written True" in proc.stdout, proc.stderr
    page = shared_book / pagedir.page_dir_name(NAME)
    assert page.stat().st_uid == 65534 and (page / "page.json").is_file()
    assert sorted(p.name for p in page.glob("*.json")) == ["2.json", "3.json", "page.json"]
    assert not [p for p in shared_book.iterdir() if pagedir.CREATING in p.name]  # nothing left over


# ---------------------------------------------------------------- 2. prune against a writer

WAITING_KEEP = """
import os, pathlib, time
pathlib.Path(os.environ["PRUNE_READY"]).touch()  # the book is read: its pages are judged
while not os.path.exists(os.environ["PRUNE_GO"]):  # an import that takes seconds (torch)
    time.sleep(0.02)
"""


def test_prune_keeps_a_page_it_judged_empty_that_a_writer_wrote_to_since(
    book_dir: Path, tmp_path: Path
) -> None:
    other, name = another_kernel(book_dir, tmp_path)
    empty = book_dir / pagedir.page_dir_name(name)
    (empty / pagedir.HIDDEN / "tmp").mkdir(parents=True)  # an older tunebook's, killed at its creation
    keep = tmp_path / "waiting_keep.py"
    keep.write_text(WAITING_KEEP + module_file(tmp_path).read_text())
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**_env(), "PRUNE_READY": str(ready), "PRUNE_GO": str(go)}
    prune = subprocess.Popen(
        [sys.executable, "-m", "tunebook", "prune", str(book_dir), "--keep", str(keep)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(ready)
        write_another_kernel(book_dir, tmp_path, name)  # its page is that empty page
        go.touch()
        out, errors = prune.communicate(timeout=300)
    finally:
        if prune.poll() is None:
            prune.kill()
            prune.wait()
    assert prune.returncode == 0, errors
    assert f"kept {empty}: a writer wrote to it since it was read empty" in out, out
    assert f"dropped {empty}" not in out
    fresh = DirectoryStore(book_dir).fetch(name)
    assert fresh is not None and sorted(fresh.entries) == sorted(other.entries)
    assert not [p for p in book_dir.iterdir() if ".pruning-" in p.name]


# ---------------------------------------------------------------- 3. what `tunebook tune` kept

CRASHING_MODULE = """
import os, signal
import torch, triton, tunebook
from small_kernels import add_kernel, grid_1d

def crash(nargs):
    # This config takes its worker down, once a run (a config that crashes is run again
    # while its record cannot reach the book: a loop the run's timeout ends, minutes later).
    if not os.path.exists(os.environ["CRASHED"]):
        open(os.environ["CRASHED"], "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

add = tunebook.autotune(
    [triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64}, pre_hook=crash)], key=["n"], inputs=inputs
)(add_kernel)
"""


@pytest.mark.once
def test_results_tune_kept_aside_are_not_called_lost_at_exit(book_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "crashmod.py").write_text(CRASHING_MODULE)
    env = {**_env(tmp_path), "TUNEBOOK_DIR": str(book_dir)}

    def tune(n: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tunebook", "tune", "crashmod:add", "--keys", f"n={n}"],
            env={**env, "CRASHED": str(tmp_path / f"crashed-{n}")},
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    assert tune(128).returncode == 0  # the page is there
    (page,) = book_files(book_dir)
    _unwritable(page, True)  # its directory refuses every write of the next run
    try:
        res = tune(256)
    finally:
        _unwritable(page, False)
    assert res.returncode == 1, res.stderr
    (kept,) = tmp_path.glob("tunebook-unsaved-*")
    assert f"They are kept in {kept}" in " ".join(res.stderr.split()), res.stderr
    # The crash the command recorded itself is among them: the exit must not call it lost.
    assert "were not written to the book" not in res.stderr and "lost" not in res.stderr, res.stderr


# ---------------------------------------------------------------- 4. a reader between two writes


def test_a_reader_never_counts_news_twice_when_the_key_is_written_again_between_its_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    pagedir.merge_key(page, META, "[1]", Entry((1,), misses=1))  # process A missed the key
    _pending_news(page, META, "[1]", Entry((1,), misses=1))  # process B too, while the lock was busy
    assert pagedir.read_key(page, META, "[1]").misses == 2  # type: ignore[union-attr]
    # Between the reader's two reads: one write folds B's news in (its file lists it in
    # folded) and deletes it; the key's next write has nothing pending, so no folded list.
    seen = read_with_writers_between(page, 2, monkeypatch)
    assert _pending_files(page) == []
    assert seen is not None and seen.misses == 2  # two processes missed the key


# ---------------------------------------------------------------- 5. the exit's time bound

EXIT_BOUND = """
import atexit, json, os, subprocess, time, warnings
_stamp = {}
atexit.register(lambda: print(json.dumps({"exit_s": time.monotonic() - _stamp["t"]}), flush=True))
from pathlib import Path
from tunebook._book import Entry, Result, config_record, pagedir, unwritten
from tunebook._book.pages import Book, KernelIdentity

def unwritable(path, on):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)

def one(i):
    done = Result(config_record({"BLOCK": 32}, {}), (1.0, 1.0, 1.0), None, "2026-01-01T00:00:00Z")
    return Entry((i,), {"c": done})

unwritten.EXIT_WRITE_S = 0.3
warnings.simplefilter("ignore")  # the refusal's own warning
page = Book(Path(os.environ["BOOK"])).open(KernelIdentity("k", "h1", ("n",)), {"id": "p"}, "cpu", "p")
page.record("[0]", one(0))
directory = Path(os.environ["BOOK"]) / pagedir.page_dir_name(page.file_name)
unwritable(directory, True)
page.record_many({f"[{i}]": one(i) for i in range(1, 3001)})
unwritable(directory, False)  # writable again, near the end of the job: written at exit
warnings.simplefilter("default")
print("refused", page.unsaved(), flush=True)
atexit.register(lambda: _stamp.__setitem__("t", time.monotonic()))  # runs first: last in, first out
"""


def test_the_exit_retry_stops_writing_within_its_bound(tmp_path: Path) -> None:
    book = tmp_path / "book"
    proc = _child(EXIT_BOUND, BOOK=str(book))
    assert "refused 3000" in proc.stdout, proc.stdout
    exit_s = json.loads(proc.stdout.splitlines()[-1])["exit_s"]
    (directory,) = book_files(book)
    written = len(list(directory.glob("*.json"))) - 2  # page.json and key [0]
    assert 0 < written < 3000 and exit_s < 0.3 + 1.0, (written, exit_s)  # 3000 keys take ~6 s
    said = [line for line in proc.stderr.splitlines() if "were not written to the book directory" in line]
    assert len(said) == 1 and f"{3000 - written} result(s) of {3000 - written} key(s)" in said[0], proc.stderr


# ---------------------------------------------------------------- 6. a creation's clean-up

PAUSED_CREATOR = """
import os, pathlib, time
_rename = os.rename

def _paused_rename(src, dst, *args, **kwargs):  # a page's creation, stopped before its rename
    if str(dst) == os.environ["PAGE"]:
        pathlib.Path(os.environ["HERE"]).write_text(str(src))
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.02)
        try:
            return _rename(src, dst, *args, **kwargs)
        finally:
            pathlib.Path(os.environ["DONE"]).touch()
    return _rename(src, dst, *args, **kwargs)

os.rename = _paused_rename
from tunebook._book import DirectoryStore, read_document
doc = read_document(pathlib.Path(os.environ["DOC"]))
store = DirectoryStore(pathlib.Path(os.environ["BOOK"]))
print("first", store.merge(os.environ["NAME"], doc) is not None, flush=True)
os.rename = _rename
print("again", store.merge(os.environ["NAME"], doc) is not None, flush=True)
"""

# `tunebook merge BOOK -o BOOK`, whose clean-up lets the creator go on at its first removal of
# a file: the creator's rename, due an hour ago, comes while the stale creation is removed.
MERGE_MEETING_CREATOR = """
import os, runpy, sys, time
_unlink = os.unlink

def _meeting_unlink(path, *args, **kwargs):
    if str(path).endswith("page.json") and not os.path.exists(os.environ["GO"]):
        open(os.environ["GO"], "w").close()
        while not os.path.exists(os.environ["DONE"]):
            time.sleep(0.02)
    return _unlink(path, *args, **kwargs)

os.unlink = _meeting_unlink
sys.argv = ["tunebook", *sys.argv[1:]]
runpy.run_module("tunebook", run_name="__main__")
"""


def test_removing_a_stale_creation_never_removes_inside_the_page_it_became(tmp_path: Path) -> None:
    book = tmp_path / "book"
    DirectoryStore(book).merge("other" + NAME[1:], _doc(1))  # a page: merge cleans up as it writes it
    (tmp_path / "doc.json").write_text(_doc(2).dumps())
    page = book / pagedir.page_dir_name(NAME)
    signals = {k: str(tmp_path / k.lower()) for k in ("HERE", "GO", "DONE")}
    env = {
        **_env(),
        **signals,
        "BOOK": str(book),
        "PAGE": str(page),
        "NAME": NAME,
        "DOC": str(tmp_path / "doc.json"),
    }
    creator = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CREATOR],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(tmp_path / "here")
        staging = Path((tmp_path / "here").read_text())
        hour_ago = time.time() - 2 * 3600  # stopped for two hours (SIGSTOP, a frozen container)
        os.utime(staging, (hour_ago, hour_ago))
        merged = subprocess.run(
            [sys.executable, "-c", MERGE_MEETING_CREATOR, "merge", str(book), "-o", str(book)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        out, errors = creator.communicate(timeout=300)
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "go").exists()  # the clean-up did meet the creation
    # The creator's first write was refused (its creation was gone), its second made the page.
    assert "first False" in out and "again True" in out, (out, errors)
    assert (page / "page.json").is_file() and (page / "2.json").is_file()
    assert not [p for p in book.iterdir() if p.name.startswith(".")]
