"""What ``tunebook merge`` and ``push`` write, and what they say, when the book is not theirs
alone: another merge or a live autotuner writing the destination while a merge runs, a
second file of a key under another name, a key grown past the size every reader accepts,
input files skipped, Ctrl-C, a full disk and a destination that cannot be written.

The concurrency tests run real processes: a merge as a person runs it (``python -m
tunebook merge``), and a second merge or an autotuner's store writing the same book. The
merge is held on one key's lock (taken here) after it has read everything, so that the
other writer's work lands between its read and its writes every time, not by chance.

Marked ``once``: the command line is built on the book, never on Triton (tests/conftest.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import TESTS, side_by_side
from helpers_reliability import RedisServer
from redis_fixture import redis_server  # noqa: F401  (the `server` fixture)
from test_cli import entry, invoke, result
from tunebook._book import Document, pagedir
from tunebook._jsonio import key_text
from tunebook.cli._load import canonical_file_name, identity_of, platform_id_of

pytestmark = pytest.mark.once

PLATFORM = {
    "backend": "cuda",
    "device": "NVIDIA H200",
    "arch": "90",
    "runtime": "cuda 13.0",
    "sm_count": 132,
    "triton": "3.6.0",
    "timer": "events",
}


def meta(name: str = "mm") -> dict[str, Any]:
    platform = {**PLATFORM, "id": platform_id_of(PLATFORM)}
    kernel: dict[str, Any] = {"name": name, "hash": name.encode().hex() * 16, "key": ["M", "N"]}
    kernel["id"] = identity_of(Document(kernel, platform, {})).id
    return {"kernel": kernel, "platform": platform}


def page_name(name: str = "mm") -> str:
    m = meta(name)
    return pagedir.page_dir_name(canonical_file_name(Document(m["kernel"], m["platform"], {})))


def key(i: int) -> str:
    return key_text([i, 4096, "torch.float16"])


def write_book(book: Path, keys: range, configs: range, name: str = "mm") -> Path:
    """A format-2 page of kernel ``name`` in ``book``: each key with one result per config G
    in ``configs``."""
    page = book / page_name(name)
    m = meta(name)
    pagedir.ensure_page(page, m)
    for i in keys:
        e = entry([i, 4096, "torch.float16"], [result({"G": g}, 0.1 + g / 1000 + i / 1e6) for g in configs])
        (page / pagedir.key_file_name(key(i))).write_text(pagedir.entry_text(e, m))
    return page


def configs_by_key(page: Path) -> dict[int, set[int]]:
    """Key (its first field) -> the configs G its entry holds, as every reader reads them."""
    found = pagedir.read_all(page, pagedir.read_meta(page) or {})
    return {e.key[0]: {r.config["kwargs"]["G"] for r in e.results.values()} for e in found.values()}


def tunebook_cli(*args: object) -> subprocess.Popen[str]:
    """``python -m tunebook ARGS`` in a new process, as a person runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "tunebook", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_as_from_a_terminal,
    )


def _as_from_a_terminal() -> None:
    """In the child, before it runs: Ctrl-C reaches it as a person's. Python leaves SIGINT
    ignored when it starts ignored, and a blocked signal stays blocked across exec; in the
    full suite on the CI the merge never saw its SIGINT (it waited out the lock's 30 s)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def waiting_on_a_lock(
    proc: subprocess.Popen[str], timeout: float = 60.0, written: Callable[[], bool] | None = None
) -> None:
    """Return once ``proc`` waits for a key's lock, having read its inputs (and, with
    ``written``, once that says the keys before the held one are written): it sleeps at
    every look for a quarter of a second (its state in /proc is S; reading books, it runs or
    waits to run: R, or D on a disk), whatever filelock sleeps in. Without /proc, a generous
    pause."""
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            time.sleep(10)
            return
        ready = written is None or written()
        seen = seen + 1 if state == "S" and ready else 0
        if seen >= 5:
            return
        time.sleep(0.05)
    raise AssertionError("the merge never waited for the lock")


def holding(page: Path, text: str) -> Any:
    from filelock import FileLock

    locks = page / pagedir.HIDDEN / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / (pagedir.key_file_name(text)[: -len(".json")] + ".lock")))


# ------------------------------------------------------------------- writes while a merge runs


def test_a_merge_keeps_what_another_merge_wrote_into_its_destination_while_it_ran(tmp_path: Path) -> None:
    """Merge A read OUT, then merge B wrote every key of OUT's page mm, then A wrote them: A's
    decided entries replaced each file, B's configs were gone, and both exited 0."""
    out = tmp_path / "out"
    page = write_book(out, range(20), range(0, 2))
    first = write_book(out, range(0), range(0), name="aa")  # A writes page aa first; B has none of it
    write_book(tmp_path / "a", range(20), range(10, 14))
    write_book(tmp_path / "a", range(1), range(0, 1), name="aa")
    write_book(tmp_path / "b", range(20), range(20, 24))
    with holding(first, key(0)):  # A has read everything and waits here, before page mm
        a = tunebook_cli("merge", tmp_path / "a", "-o", out)
        waiting_on_a_lock(a)
        b = tunebook_cli("merge", tmp_path / "b", "-o", out)
        assert b.wait(120) == 0, b.communicate()
        assert all(g == {0, 1, 20, 21, 22, 23} for g in configs_by_key(page).values())
    stdout, stderr = a.communicate(timeout=120)
    assert a.returncode == 0, stdout + stderr
    found = configs_by_key(page)
    assert len(found) == 20 and all(g == {0, 1, 10, 11, 12, 13, 20, 21, 22, 23} for g in found.values()), (
        found
    )


def test_a_merge_keeps_what_a_live_autotuner_wrote_while_it_ran(tmp_path: Path) -> None:
    """A live autotuner's store (DirectoryStore.merge, in another process) wrote one new
    config into each key after the merge had read the book: the merge erased them all."""
    out = tmp_path / "out"
    page = write_book(out, range(20), range(0, 2))
    write_book(tmp_path / "a", range(20), range(10, 12))
    live = f"""
import json, sys
from pathlib import Path
from test_cli import entry, result
from tunebook._book import DirectoryStore, Document
from tunebook._jsonio import key_text
page = Path({str(page)!r})
m = json.loads((page / "page.json").read_text())
store = DirectoryStore(page.parent)
for i in range(1, 20):  # key 0's lock is held: its news would go to pending/ (folded anyway)
    e = entry([i, 4096, "torch.float16"], [result({{"G": 99}}, 0.001)])
    news = Document(m["kernel"], m["platform"], {{key_text(list(e.key)): e}})
    assert store.merge(page.name + ".json", news)
"""
    with holding(page, key(0)):
        merge = tunebook_cli("merge", tmp_path / "a", "-o", out)
        waiting_on_a_lock(merge)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", live], check=True, env=env, cwd=TESTS, timeout=120)
    stdout, stderr = merge.communicate(timeout=120)
    assert merge.returncode == 0, stdout + stderr
    found = configs_by_key(page)
    assert found[0] == {0, 1, 10, 11}
    assert all(found[i] == {0, 1, 10, 11, 99} for i in range(1, 20)), found


def test_two_merges_into_one_book_at_once_keep_both(tmp_path: Path) -> None:
    """Two merges of books with disjoint configs into one OUT, started together: keys ended
    with one side's configs only."""
    out = tmp_path / "out"
    write_book(tmp_path / "a", range(150), range(0, 10))
    write_book(tmp_path / "b", range(150), range(100, 110))

    def merge(book: Path) -> subprocess.Popen[str]:
        proc = tunebook_cli("merge", book, "-o", out)
        proc.communicate(timeout=300)
        return proc

    for proc in side_by_side(lambda: merge(tmp_path / "a"), lambda: merge(tmp_path / "b")):
        assert proc.returncode == 0
    found = configs_by_key(out / page_name())
    assert len(found) == 150 and all(g == set(range(10)) | set(range(100, 110)) for g in found.values())


# ------------------------------------------------------------------- a key's other files


def test_a_second_file_of_a_key_is_merged_before_it_goes_and_an_odd_name_is_read(tmp_path: Path) -> None:
    """``merge BOOK -o BOOK`` deleted "<key> (copy).json" without merging its results, and a
    key whose only file had a name that is not UTF-8 was missing from show and merge."""
    book = tmp_path / "book"
    page = write_book(book, range(3), range(0, 2))
    m = meta()
    copy = entry([1, 4096, "torch.float16"], [result({"G": g}, 0.5) for g in (1, 7)])
    (page / "1,4096,'torch.float16' (copy).json").write_text(pagedir.entry_text(copy, m))
    odd = os.fsencode(page) + b"/\xff2.json"
    os.rename(page / pagedir.key_file_name(key(2)), odd)
    shown = json.loads(invoke("show", book, "--json").stdout)
    assert sorted(e["key"][0] for f in shown["files"] for e in f["entries"]) == [0, 1, 2]
    assert shown["skipped"] == []
    invoke("merge", book, "-o", book)
    assert configs_by_key(page) == {0: {0, 1}, 1: {0, 1, 7}, 2: {0, 1}}
    names = sorted(n for n in os.listdir(page) if n.endswith(".json"))
    assert names == [pagedir.key_file_name(key(i)) for i in range(3)] + [
        "page.json"
    ]  # now in each key's file


def test_a_file_that_holds_no_key_of_the_page_is_never_deleted(tmp_path: Path) -> None:
    book = tmp_path / "book"
    page = write_book(book, range(2), range(0, 2))
    (page / "notes.json").write_text('{"mine": true}')
    res = invoke("merge", book, "-o", book, ok=False)
    assert res.exit_code == 1 and "notes.json" in res.output and "1 input file(s) skipped" in res.output
    kept = list(page.glob("notes.json*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"mine": True}  # there, or kept aside


def test_a_merge_says_which_pages_it_rewrote_and_which_already_held_the_merge(tmp_path: Path) -> None:
    """Merging a book into itself rewrites no key file, and says so, where it said "wrote"
    of every page; where some keys of a page change, the line counts the two apart."""
    book = tmp_path / "book"
    page = book / write_book(tmp_path / "first", range(3), range(0, 2)).name
    invoke("merge", tmp_path / "first", "-o", book)  # the book as a merge writes it

    def stamps() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in page.glob("*.json") if p.name != pagedir.PAGE_FILE}

    before = stamps()
    res = invoke("merge", book, "-o", book)
    assert f"unchanged {page} (3 keys already as merged)" in res.output, res.output
    assert "wrote" not in res.output and stamps() == before
    more = tmp_path / "more"
    write_book(more, range(2, 4), range(2, 3))  # key 2 gains a config, key 3 is new
    res = invoke("merge", more, "-o", book)
    assert f"wrote {page} (2 keys; 2 already as merged, left as they were)" in res.output, res.output
    after = stamps()
    assert all(after[name] == before[name] for name in (pagedir.key_file_name(key(i)) for i in (0, 1)))
    assert configs_by_key(page) == {0: {0, 1}, 1: {0, 1}, 2: {0, 1, 2}, 3: {2}}


# ------------------------------------------------------------------- size limit and skipped input


def test_a_merged_key_past_the_size_limit_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two books under the limit merged into one key file over it: every reader then
    refused the key ("over the limit"), and the merge exited 0."""
    write_book(tmp_path / "a", range(2), range(0, 8))
    out = tmp_path / "out"
    page = write_book(out, range(2), range(100, 108))
    before = {p.name: p.read_bytes() for p in page.glob("*.json")}
    size = max(len(v) for v in before.values())
    monkeypatch.setattr(pagedir, "MAX_ENTRY_BYTES", size + size // 2)  # each side fits, the union not
    res = invoke("merge", tmp_path / "a", "-o", out, ok=False)
    assert res.exit_code == 1, res.output
    assert f"over the {size + size // 2}-byte limit" in res.output and key(0) in res.output, res.output
    assert "Keep fewer configs" in res.output
    assert {p.name: p.read_bytes() for p in page.glob("*.json")} == before  # what it held stands


def test_merge_and_push_fail_when_an_input_file_was_skipped(server: RedisServer, tmp_path: Path) -> None:
    """A push whose only key file was over the limit sent 0 keys and exited 0."""
    book = tmp_path / "book"
    page = write_book(book, range(3), range(0, 2))
    (page / pagedir.key_file_name(key(1))).write_text("{not json")
    res = invoke("merge", book, "-o", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and "1 input file(s) skipped" in res.output, res.output
    assert configs_by_key(tmp_path / "out" / page_name()) == {0: {0, 1}, 2: {0, 1}}  # the rest merged
    env = {**os.environ, "TUNEBOOK_REDIS_URL": ""}
    push = subprocess.run(
        [sys.executable, "-m", "tunebook", "push", book, "--redis", server.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert push.returncode == 1, push.stdout + push.stderr
    assert "2 keys" in push.stdout and "1 input file(s) skipped" in push.stdout, push.stdout


# ------------------------------------------------------------------- Ctrl-C, full disk, read-only


def test_ctrl_c_during_a_merge_says_how_far_it_got(tmp_path: Path) -> None:
    """It printed only "Aborted!"."""
    out = tmp_path / "out"
    page = write_book(out, range(10), range(0, 2))
    write_book(tmp_path / "a", range(10), range(10, 12))
    with holding(page, key(5)):  # keys are written in key order: 0-4 are written, then it waits
        merge = tunebook_cli("merge", tmp_path / "a", "-o", out)
        waiting_on_a_lock(merge, written=lambda: all(10 in configs_by_key(page).get(i, ()) for i in range(5)))
        merge.send_signal(signal.SIGINT)
        stdout, stderr = merge.communicate(timeout=60)
    assert merge.returncode == 130, stdout + stderr
    assert "interrupted: 5 of 10 keys were written" in stderr and "running the merge again is safe" in stderr
    assert "Aborted" not in stderr


def test_ctrl_c_during_a_push_says_how_far_it_got(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunebook.cli import push

    class Store:
        shown, available, calls = "redis://fleet:6379/0", True, 0

        def fetch(self, *args: Any, **kwargs: Any) -> None:
            return None

        def merge(self, name: str, doc: Document) -> Document:
            Store.calls += 1
            if Store.calls == 2:
                raise KeyboardInterrupt
            return doc

    monkeypatch.setattr(push, "_store", lambda url: Store())
    write_book(tmp_path / "book", range(100), range(0, 1))
    res = invoke("push", tmp_path / "book", "--redis", "redis://fleet:6379/0", ok=False)
    assert res.exit_code == 130
    assert f"interrupted: {push._KEYS_A_REQUEST} of 100 keys were sent" in res.output, res.output
    assert "running the push again is safe" in res.output


def test_a_full_disk_during_a_merge_says_so_and_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix it named was "Choose a writable directory with -o", which no directory fixes."""
    write_book(tmp_path / "a", range(6), range(0, 2))
    real = pagedir._write
    writes = []

    def full(path: Path, text: str, tmp_dir: Path) -> None:
        if path.name != pagedir.PAGE_FILE and len(writes) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir / "x.tmp"))
        writes.append(path)
        real(path, text, tmp_dir)

    monkeypatch.setattr(pagedir, "_write", full)
    res = invoke("merge", tmp_path / "a", "-o", tmp_path / "out", ok=False)
    assert "No space left on device" in res.output and "The disk is full; free some space" in res.output
    assert "Choose a writable" not in res.output
    assert "3 of 6 keys were written" in res.output, res.output  # page.json, then 3 keys


def test_a_destination_that_cannot_be_written_is_refused_before_the_inputs_are_read(tmp_path: Path) -> None:
    """It was found only after every input had been read (hours, for a fleet's books)."""
    book = tmp_path / "book"
    page = write_book(book, range(2), range(0, 2))
    (page / pagedir.key_file_name(key(1))).write_text("{not json")  # reading it would say so
    (tmp_path / "file").write_text("")
    res = invoke("merge", book, "-o", tmp_path / "file" / "out", ok=False)
    assert res.exit_code == 1 and "is not a directory" in res.output, res.output
    assert "skipped" not in res.output  # no input was read


# ------------------------------------------------------------------ progress


def test_a_long_merge_says_how_far_it_has_got(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge of 50,000 keys wrote for minutes with nothing said until its last line."""
    from tunebook.cli import _ticker

    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    defaults = _ticker.Ticker.__init__.__kwdefaults__
    monkeypatch.setattr(
        _ticker.Ticker.__init__, "__kwdefaults__", {**defaults, "first_s": 0.0, "every_s": 0.0}
    )
    write_book(tmp_path / "a", range(3), range(0, 2))
    done = invoke("merge", tmp_path / "a", "-o", tmp_path / "out")
    lines = [line for line in done.stderr.splitlines() if line.startswith("merge: ")]
    assert [line.split(",")[0] for line in lines] == [
        "merge: 1 of 3 keys written (33%)",
        "merge: 2 of 3 keys written (67%)",
        "merge: 3 of 3 keys written (100%)",
    ], done.stderr


def test_progress_comes_late_seldom_and_only_where_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunebook.cli._ticker import Ticker

    now = [0.0]
    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    ticker = Ticker("push", 100, "keys sent", clock=lambda: now[0])
    for t, n in ((0.5, 10), (2.5, 10), (4.0, 10), (7.6, 10)):
        now[0] = t
        ticker.add(n)
    assert capsys.readouterr().err.splitlines() == [
        "push: 20 of 100 keys sent (20%), 2 s",  # none in the first 2 s, then one each 5 s
        "push: 40 of 100 keys sent (40%), 8 s",
    ]
    for mode in ("0", "auto"):  # never, and not where stderr is no terminal (captured here)
        monkeypatch.setenv("TUNEBOOK_PROGRESS", mode)
        quiet = Ticker("push", 100, clock=lambda: now[0])
        now[0] += 10
        quiet.add()
        assert capsys.readouterr().err == "" and quiet.done == 1
    monkeypatch.setenv("TUNEBOOK_PROGRESS", "1")
    monkeypatch.setattr(sys, "stderr", None)  # a process started with stderr closed
    gone = Ticker("push", 100, clock=lambda: now[0])
    now[0] += 10
    gone.add()
    assert not gone.shown and gone.done == 1


def test_a_merge_of_many_pages_lists_the_book_directory_once_and_still_removes_dead_creations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replace_page swept the book directory's killed page creations for every page it wrote:
    a merge of N pages listed the destination N times. Now once per command."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for name in ("mm", "mm2", "mm3", "mm4"):
        write_book(src, range(2), range(2), name=name)
    dest.mkdir()
    dead = dest / f".{page_name('mm')}{pagedir.CREATING}{'a' * 12}"  # a writer killed 2 h ago
    young = dest / f".{page_name('mm2')}{pagedir.CREATING}{'b' * 12}"  # a live writer's, perhaps
    for creation in (dead, young):
        pagedir.ensure_page(creation, meta())
    hours_ago = time.time() - 2 * 3600
    os.utime(dead, (hours_ago, hours_ago))
    listed: list[Path] = []
    scan = pagedir._scan

    def counting_scan(directory: Path) -> Any:
        listed.append(Path(directory))
        return scan(directory)

    monkeypatch.setattr(pagedir, "_scan", counting_scan)
    invoke("merge", src, "-o", dest)
    assert listed.count(dest) == 1, listed.count(dest)  # was 4: once per page written
    assert not dead.exists() and young.is_dir()
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(
        page_name(n) for n in ("mm", "mm2", "mm3", "mm4")
    )
