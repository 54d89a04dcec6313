"""The directory book across crashes and many writers, at the edges a crash-consistency review
found (one test per finding): a writer killed while it creates a page, results a directory
refused that a process still holds at its exit, a reader between a writer's two steps, news
counted twice, a key grown past the readers' limit, temp files of killed writers, a file size
limit, `tunebook tune`'s job files and a book path with rich markup in it.

Kills are real: a child process SIGKILLs itself at an exact step of a write (``KILL_AT``,
below), as an OOM killer or a preemption would, and the book is then read by real commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import TESTS, book_files
from test_cli import entry, module_file, python_m_tunebook, result, the_doc, tune_add
from test_pagedir import _holding
from tunebook._book import DirectoryStore, Document, Entry, pagedir
from tunebook._book.pages import Book, KernelIdentity
from tunebook.cli._load import canonical_file_name

SRC = Path(__file__).resolve().parents[1] / "src"
KERNEL = {"name": "k", "hash": "h1", "key": ["n"], "id": "x"}
META: dict[str, Any] = {"kernel": KERNEL, "platform": {"id": "p"}}

# A child's prologue: SIGKILL this very process at one step of a write, KILL_AT=<when>:<part>,
# <when> "before_replace" (a temp file about to be renamed onto a name holding <part>) or
# "before_unlink" (a path holding <part> about to be deleted).
KILL_AT = """
import os, pathlib, signal
_when, _, _part = os.environ["KILL_AT"].partition(":")
_replace, _unlink, _path_unlink = os.replace, os.unlink, pathlib.Path.unlink

def _hit(path):
    if _part in str(path):
        os.kill(os.getpid(), signal.SIGKILL)

def _killing_replace(src, dst, *args, **kwargs):
    if _when == "before_replace":
        _hit(dst)
    return _replace(src, dst, *args, **kwargs)

def _killing_unlink(path, *args, **kwargs):
    if _when == "before_unlink":
        _hit(path)
    return _unlink(path, *args, **kwargs)

def _killing_path_unlink(self, *args, **kwargs):
    if _when == "before_unlink":
        _hit(self)
    return _path_unlink(self, *args, **kwargs)

os.replace, os.unlink, pathlib.Path.unlink = _killing_replace, _killing_unlink, _killing_path_unlink
"""


def _child(code: str, *, kill_at: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a new Python process (``kill_at``: armed to SIGKILL itself there)."""
    full_env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    if kill_at is not None:
        full_env["KILL_AT"] = kill_at
        code = KILL_AT + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )
    if kill_at is not None:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    return proc


def _miss(key: tuple[Any, ...]) -> Entry:
    return Entry(key, misses=1)


def _pending_news(page: Path, meta: dict[str, Any], key_text: str, news: Entry) -> None:
    """Leave ``news`` in the page's pending/ the way a writer does while another holds the lock."""
    lock = pagedir._hidden(page, "locks") / f"{pagedir._stem(pagedir.key_file_name(key_text))}.lock"
    holder = _holding(lock)
    try:
        pagedir.merge_key(page, meta, key_text, news)
    finally:
        holder.kill()
        holder.wait()


def _pending_files(page: Path) -> list[str]:
    return sorted(p.name for p in (page / pagedir.HIDDEN / "pending").glob("*.json"))


# ---------------------------------------------------------------- 1. a page being created


def _merge_and_show_go_on(book: Path, tmp_path: Path) -> None:
    """``merge`` (into another book and into itself) and ``show`` read ``book`` with nothing skipped."""
    for args in (("merge", book, "-o", tmp_path / "out"), ("merge", book, "-o", book), ("show", book)):
        res = python_m_tunebook(*args)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        assert "skipped" not in res.stderr and "intact" not in res.stderr, res.stderr


def another_kernel(book_dir: Path, tmp_path: Path) -> tuple[Document, str]:
    """A book with a tuned kernel's page, and (the page of another kernel, saved as
    ``tmp_path/other.json``; its file name in the book), not in the book yet."""
    tune_add((100,))
    doc = the_doc(book_dir)
    other = replace(doc, kernel={**doc.kernel, "name": "other_kernel", "hash": "2" * 64})
    (tmp_path / "other.json").write_text(other.dumps())
    return other, canonical_file_name(other)


def write_another_kernel(book_dir: Path, tmp_path: Path, name: str, kill_at: str | None = None) -> None:
    """The autotuner's write of ``another_kernel``'s page, in a process of its own."""
    _child(
        f"""
        from pathlib import Path
        from tunebook._book import DirectoryStore, read_document
        doc = read_document(Path({str(tmp_path / "other.json")!r}))
        assert DirectoryStore(Path({str(book_dir)!r})).merge({name!r}, doc) is not None
        """,
        kill_at=kill_at,
    )


@pytest.mark.once
def test_a_writer_killed_while_it_creates_a_page_leaves_no_page_that_breaks_merge_or_show(
    book_dir: Path, tmp_path: Path
) -> None:
    other, name = another_kernel(book_dir, tmp_path)
    # The autotuner's write of a new page, killed before its page.json is in place.
    write_another_kernel(book_dir, tmp_path, name, kill_at="before_replace:page.json")
    assert not (book_dir / pagedir.page_dir_name(name)).exists()  # never a page without page.json
    _merge_and_show_go_on(book_dir, tmp_path)
    # The same write, not killed: the page is there whole.
    assert DirectoryStore(book_dir).merge(name, other) is not None
    assert (book_dir / pagedir.page_dir_name(name) / "page.json").is_file()


@pytest.mark.once
def test_an_empty_page_an_older_tunebook_left_is_no_error_and_prune_removes_it(
    book_dir: Path, tmp_path: Path
) -> None:
    _, name = another_kernel(book_dir, tmp_path)
    empty = book_dir / pagedir.page_dir_name(name)
    (empty / ".tunebook" / "tmp").mkdir(parents=True)  # mkdir, then killed writing page.json
    (empty / ".tunebook" / "tmp" / "page.json.20618-0.tmp").write_text("")
    _merge_and_show_go_on(book_dir, tmp_path)
    res = python_m_tunebook("prune", book_dir, "--keep", module_file(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"dropped {empty}: an empty page" in res.stdout
    assert not empty.exists() and len(book_files(book_dir)) == 1


@pytest.mark.once
def test_an_import_killed_while_it_created_its_page_can_be_run_again(tmp_path: Path) -> None:
    from test_cli import VLLM_NAME, _moe_doc, write_doc

    write_doc(tmp_path / "book", _moe_doc())
    exported = python_m_tunebook(
        "export", "--format", "vllm", tmp_path / "book", "-o", tmp_path / "v1", "--kernel", "fused_moe_kernel"
    )
    assert exported.returncode == 0, exported.stderr
    vllm_file = tmp_path / "v1" / VLLM_NAME
    args = ("import", "--format", "vllm", vllm_file, "--kernel", "moe", "-o", tmp_path / "imp")
    assert python_m_tunebook(*args).returncode == 0
    (page,) = (p for p in (tmp_path / "imp").iterdir() if p.is_dir() and p.name != pagedir.HIDDEN)
    (page / "page.json").unlink()  # as an older tunebook left it, killed right after its mkdir
    for key_file in page.glob("*.json"):
        key_file.unlink()
    res = python_m_tunebook(*args)
    assert res.returncode == 0, res.stderr
    assert len(the_doc(tmp_path / "imp").entries) == 3


# ---------------------------------------------------------------- 2. refused results at exit

EXIT_CHILD = """
import os, subprocess, sys
from pathlib import Path
import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors

def unwritable(path, on):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)

replay = Replay({32: 1.0, 64: 2.0})
add = tunebook.autotune(
    block_configs(32, 64), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
)(add_kernel)

def call(n):
    x, y, out = vectors(n)
    add[grid_1d(n)](x, y, out, n)

call(100)
(page,) = [p for p in Path(os.environ["TUNEBOOK_DIR"]).iterdir() if p.name != ".tunebook"]
unwritable(page, True)  # a remount, a permission fix: for a moment, near the end of the job
call(1000)
if os.environ["WRITABLE_AT_EXIT"] == "1":
    unwritable(page, False)
print("page", page)
"""


def _unwritable(path: Path, on: bool) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)


def _keys_of(book: Path) -> list[int]:
    (page,) = book_files(book)
    store = DirectoryStore(book)
    doc = store.fetch(page.name + ".json")
    assert doc is not None
    return sorted(e.key[0] for e in doc.entries.values())


def test_results_a_directory_refused_are_written_at_exit_or_said_lost_with_their_count(
    book_dir: Path,
) -> None:
    proc = _child(EXIT_CHILD, TUNEBOOK_DIR=str(book_dir), WRITABLE_AT_EXIT="1")
    assert "cannot write to book directory" in proc.stderr  # the refusal, while it lasted
    assert _keys_of(book_dir) == [100, 1000]  # written at exit, the directory writable again
    assert "were not written" not in proc.stderr
    # Still unwritable at exit: said once, with how many results of how many keys, and the fix.
    other = book_dir.parent / "other"
    proc = _child(EXIT_CHILD, TUNEBOOK_DIR=str(other), WRITABLE_AT_EXIT="0")
    page = Path(proc.stdout.split("page ", 1)[1].strip())
    _unwritable(page, False)
    said = [line for line in proc.stderr.splitlines() if "were not written to the book directory" in line]
    assert len(said) == 1, proc.stderr
    assert "2 result(s) of 1 key(s)" in said[0] and str(other) in said[0] and "TUNEBOOK_DIR" in said[0]
    assert _keys_of(other) == [100]


MISSES_EXIT_CHILD = """
import os, subprocess
from pathlib import Path
import tunebook
from tunebook import _misses
from small_kernels import add_kernel, block_configs, grid_1d, vectors

def unwritable(path, on):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if on else 0o755)

book = Path(os.environ["TUNEBOOK_DIR"])
book.mkdir(parents=True)
unwritable(book, True)  # no page can be made in it, for a moment
add = tunebook.autotune(block_configs(32, 64), key=["n"])(add_kernel)
again = tunebook.autotune(block_configs(32, 64), key=["n"])(add_kernel)  # meets key 100 too
for kernel, n in ((add, 100), (add, 1000), (again, 100)):
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
assert _misses.flush()  # written, and refused
if os.environ["WRITABLE_AT_EXIT"] == "1":
    unwritable(book, False)
"""


def test_serve_mode_misses_a_directory_refused_are_written_at_exit_or_said_lost_with_their_count(
    tmp_path: Path,
) -> None:
    """The miss records `tunebook tune --misses` reads were dropped when the directory refused
    them (only tuned results were kept for the exit): now kept, retried, or counted."""
    book = tmp_path / "book"
    proc = _child(MISSES_EXIT_CHILD, TUNEBOOK_DIR=str(book), TUNEBOOK_MODE="serve", WRITABLE_AT_EXIT="1")
    assert "cannot write to book directory" in proc.stderr  # the refusal, while it lasted
    assert "were not written" not in proc.stderr, proc.stderr
    (page,) = book_files(book)
    doc = DirectoryStore(book).fetch(page.name + ".json")
    assert doc is not None
    # A refusal for good (permissions: EACCES, or EPERM under chattr +i) keeps counts only,
    # not the call descriptions (memory: unwritten.MAX_HELD_MISS_KEYS), and waits for the exit.
    assert sorted((e.key[0], e.misses, e.call is not None) for e in doc.entries.values()) == [
        (100, 2, False),
        (1000, 1, False),
    ]
    # Still unwritable at exit, and refused for good (permissions): said once, at the first
    # miss, not again at every process's exit (a read-only TUNEBOOK_DIR by design).
    other = tmp_path / "other"
    proc = _child(MISSES_EXIT_CHILD, TUNEBOOK_DIR=str(other), TUNEBOOK_MODE="serve", WRITABLE_AT_EXIT="0")
    _unwritable(other, False)
    said = [line for line in proc.stderr.splitlines() if "BookWarning" in line]
    assert len(said) == 1, proc.stderr
    assert "cannot write to book directory" in said[0] and str(other) in said[0], said
    assert book_files(other) == []


# ---------------------------------------------------------------- 3. a reader between two steps


def read_with_writers_between(page: Path, writers: int, monkeypatch: pytest.MonkeyPatch) -> Entry | None:
    """Key [1] of ``page`` as a reader reads it while ``writers`` real writes of the key (one
    process each, adding nothing) come between its first read (the pending news) and the next."""
    writer = f"""
        from pathlib import Path
        from tunebook._book import Entry, pagedir
        pagedir.merge_key(Path({str(page)!r}), {META!r}, "[1]", Entry((1,)))
        """
    real_load = pagedir._load
    loads: list[Path] = []

    def load_then_let_writers_in(path: Path, limit: int) -> Any:
        found = real_load(path, limit)
        loads.append(path)
        if len(loads) == 1:
            for _ in range(writers):
                _child(writer)
        return found

    with monkeypatch.context() as patched:
        patched.setattr(pagedir, "_load", load_then_let_writers_in)
        return pagedir.read_key(page, META, "[1]")


def test_a_reader_never_misses_news_a_writer_folds_in_between_its_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    pagedir.merge_key(page, META, "[1]", entry([1], [result({"BLOCK": 32}, 1.0)]))
    _pending_news(page, META, "[1]", replace(entry([1], [result({"BLOCK": 64}, 2.0)]), misses=1))
    seen = read_with_writers_between(page, 1, monkeypatch)  # one folds the news in
    assert _pending_files(page) == []  # the writer did fold it in, and deleted it
    assert seen is not None and sorted(r.config["kwargs"]["BLOCK"] for r in seen.results.values()) == [32, 64]
    assert seen.misses == 1  # met in the news file and in the key's file: counted once


# ---------------------------------------------------------------- 4. news counted twice


def test_a_writer_killed_between_its_write_and_its_clean_up_adds_no_miss_twice(tmp_path: Path) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    _pending_news(page, META, "[1]", _miss((1,)))  # process 1's miss, while the key's lock was busy
    assert pagedir.read_key(page, META, "[1]").misses == 1  # type: ignore[union-attr]
    _child(  # process 2's: its write folds process 1's news in; killed before it deletes it
        f"""
        from pathlib import Path
        from tunebook._book import Entry, pagedir
        pagedir.merge_key(Path({str(page)!r}), {META!r}, "[1]", Entry((1,), misses=1))
        """,
        kill_at="before_unlink:pending",
    )
    assert len(_pending_files(page)) == 1  # the news it had folded in is still there
    assert pagedir.read_key(page, META, "[1]").misses == 2  # type: ignore[union-attr]
    pagedir.merge_key(page, META, "[1]", _miss((1,)))  # process 3's, an ordinary write
    assert _pending_files(page) == []
    assert pagedir.read_key(page, META, "[1]").misses == 3  # type: ignore[union-attr]


@pytest.mark.once
def test_merging_a_book_into_itself_with_news_pending_counts_the_news_once(book_dir: Path) -> None:
    tune_add((100,))
    (page,) = book_files(book_dir)
    meta = pagedir.read_meta(page)
    assert meta is not None
    (text,) = pagedir.list_keys(page, meta)
    key = tuple(json.loads(text))
    _pending_news(page, meta, text, _miss(key))
    assert pagedir.read_key(page, meta, text).misses == 1  # type: ignore[union-attr]
    for _ in range(2):
        res = python_m_tunebook("merge", book_dir, "-o", book_dir)
        assert res.returncode == 0, res.stderr
        assert _pending_files(page) == []
        assert pagedir.read_key(page, meta, text).misses == 1  # type: ignore[union-attr]


# ---------------------------------------------------------------- 5. a key past the size limit


def test_a_key_is_never_written_past_the_size_every_reader_accepts(tmp_path: Path) -> None:
    page = Book(tmp_path).open(KernelIdentity("k", "h1", ("n",)), {"id": "p"}, "cpu", "p")
    directory = tmp_path / pagedir.page_dir_name(page.file_name)

    def results(blocks: range) -> Entry:
        return entry([1], [result({"BLOCK": b}, 1.0 + b / 1e6) for b in blocks])

    page.record("[1]", results(range(60_000)))  # about 14 MB: within the 16 MiB limit
    size = (directory / "1.json").stat().st_size
    assert size < pagedir.MAX_ENTRY_BYTES
    with pytest.warns(UserWarning, match=r"leaving the file of key \[1\].*over the 16777216-byte limit"):
        page.record("[1]", results(range(60_000, 75_000)))  # 17 MB with them
    assert (directory / "1.json").stat().st_size == size  # left as it was, not past the limit
    fresh = DirectoryStore(tmp_path).fetch(page.file_name, ["[1]"])
    assert fresh is not None and len(fresh.entries["[1]"].results) == 60_000  # still read
    assert len(page.layers[0].pending["[1]"].results) == 15_000  # kept in memory, said


# ---------------------------------------------------------------- 6. temp files of killed writers


def test_a_temp_file_a_killed_writer_of_the_same_pid_left_never_fails_a_write(tmp_path: Path) -> None:
    page = tmp_path / "k--x--cpu--p"
    pagedir.ensure_page(page, META)
    (page / "page.json").unlink()  # to be written again, as after a killed creation
    tmp = pagedir._hidden(page, "tmp")
    n = next(pagedir._counter)
    for i in range(n, n + 50):  # what writers of this PID, killed before, left at the names it takes
        (tmp / f"page.json.{os.getpid()}-{i}.tmp").write_text("")
    pagedir.ensure_page(page, META)
    assert pagedir.read_page_file(page)[0] is not None


@pytest.mark.once
def test_merge_deletes_what_killed_writers_left_and_prune_names_it(book_dir: Path, tmp_path: Path) -> None:
    tune_add((100,))
    (page,) = book_files(book_dir)
    tmp = page / pagedir.HIDDEN / "tmp"
    (key_file,) = (p for p in page.glob("*.json") if p.name != "page.json")
    dead_key = tmp / f"{key_file.name}.12588-610.tmp"  # a killed writer of this key's
    old = [tmp / "page.json.20618-0.tmp", tmp / f"{key_file.stem}.1796500206569901489-10765-0.json.x1.tmp"]
    young = tmp / "page.json.q7wz2k.tmp"  # a live writer's, perhaps
    for path in (dead_key, *old, young):
        path.write_text("{")
    hour_ago = time.time() - 2 * 3600  # pagedir.LEFTOVER_AGE_S is an hour
    for path in old:
        os.utime(path, (hour_ago, hour_ago))
    new = book_dir / f".{page.name}.creating-a1b2c3d4e5f6"  # a page whose creation was killed
    (new / pagedir.HIDDEN / "tmp").mkdir(parents=True)
    os.utime(new, (hour_ago, hour_ago))
    res = python_m_tunebook("merge", book_dir, "-o", book_dir)
    assert res.returncode == 0, res.stderr
    assert sorted(tmp.iterdir()) == [young] and not new.exists()
    assert sorted(p.name for p in book_dir.iterdir()) == [page.name]  # its pages only
    # prune drops them too, and says so
    for path in old:
        path.write_text("{")
        os.utime(path, (hour_ago, hour_ago))
    new.mkdir()
    os.utime(new, (hour_ago, hour_ago))
    res = python_m_tunebook("prune", book_dir, "--keep", module_file(tmp_path))
    assert res.returncode == 0, res.stderr
    for path in (*old, new):
        assert f"dropped {path}: left by a write killed mid-way" in res.stdout, res.stdout
    assert sorted(tmp.iterdir()) == [young] and not new.exists()


# ---------------------------------------------------------------- 7. a file size limit

LIMIT = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # ulimit -f 2
sys.argv = ["tunebook", *sys.argv[1:]]
runpy.run_module("tunebook", run_name="__main__")
"""


LIMITED_TUNING = """
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # smaller than any book file
import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors

replay = Replay({32: 1.0, 64: 2.0})
add = tunebook.autotune(
    block_configs(32, 64), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
)(add_kernel)
x, y, out = vectors(100)
add[grid_1d(100)](x, y, out, 100)
"""


@pytest.mark.once
def test_a_file_size_limit_is_named_as_one_not_as_permissions(book_dir: Path, tmp_path: Path) -> None:
    tune_add((100,))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, "-c", LIMIT, "merge", str(book_dir), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "File too large" in res.stderr and "ulimit -f" in res.stderr, res.stderr
    assert "writable" not in res.stderr, res.stderr
    # The autotuner's warning, too.
    proc = _child(LIMITED_TUNING, TUNEBOOK_DIR=str(tmp_path / "limited"))
    said = [line for line in proc.stderr.splitlines() if "cannot write to book directory" in line]
    assert said and "ulimit -f" in said[0] and "Point TUNEBOOK_DIR" not in said[0], proc.stderr


# ---------------------------------------------------------------- 8. `tunebook tune`'s job files

TUNE_MODULE = """
import time
import torch, triton, tunebook
from small_kernels import add_kernel, grid_1d

def slow(nargs):
    time.sleep(60)  # the run is killed while its worker measures

def inputs(description):
    n = description["key"]["n"]
    return grid_1d(n), (torch.randn(n), torch.randn(n), torch.empty(n), n), {}

add = tunebook.autotune([triton.Config({"BLOCK": 32}, pre_hook=slow)], key=["n"], inputs=inputs)(add_kernel)
"""


def _workers_of(pid: int) -> list[int]:
    found = []
    for entry_name in os.listdir("/proc"):
        if not entry_name.isdigit():
            continue
        try:
            with open(f"/proc/{entry_name}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry_name}/cmdline", "rb") as fh:
                command = fh.read()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"tunebook._worker" in command:
            found.append(int(entry_name))
    return found


@pytest.mark.once
def test_a_killed_tune_run_leaves_no_job_file(book_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tunemod.py").write_text(TUNE_MODULE)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "TMPDIR": str(temp),
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]
        ),
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "tunebook", "tune", "tunemod:add", "--keys", "n=256"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _workers_of(run.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _workers_of(run.pid)
        assert workers, "no worker started"
        time.sleep(3)  # the worker has its jobs and measures
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)  # a worker ends with the run that started it
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert sorted(p.name for p in temp.glob("*.json")) == []


# ---------------------------------------------------------------- 9. markup in a book's path


@pytest.mark.once
def test_merge_prints_a_path_holding_brackets_as_it_is(book_dir: Path, tmp_path: Path) -> None:
    tune_add((100,))
    output = tmp_path / "[abc] out"
    res = python_m_tunebook("merge", book_dir, "-o", output)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].endswith(f"files in {output}"), res.stdout
