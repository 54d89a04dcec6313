"""Hostile file-system objects at book paths: no kernel call may hang, crash or read without limit.

Planted where a kernel reads (its own book file, a book on TUNEBOOK_PATH, a file matching
its sibling pattern ``*--<kernel id>--*.json``; in a format-2 page directory, a key's
file, ``page.json`` and a file in ``pending/``): a symbolic link to ``/dev/zero`` or
``/dev/urandom`` (``st_size`` is 0, the content endless), a FIFO (``open`` blocks until a
writer comes), a dangling and a looping symbolic link. Every call must answer right within
seconds, in ``tune`` and ``serve`` mode, and the warning must name what was found.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import pagedir
from tunebook._book.files import Unusable, read_regular_file

T = TypeVar("T")

DEADLINE_S = 60.0  # a tuning of 3 configs in the interpreter takes about a second

PLANTS: dict[str, Callable[[Path], None]] = {
    "dev-zero": lambda p: os.symlink("/dev/zero", p),
    "dev-urandom": lambda p: os.symlink("/dev/urandom", p),
    "fifo": lambda p: os.mkfifo(p),
    "dangling-link": lambda p: os.symlink(p.with_name("nowhere.json"), p),
    "looping-link": lambda p: os.symlink(p.name, p),
}
REASONS = {
    "dev-zero": "character device",
    "dev-urandom": "character device",
    "fifo": "named pipe",
    "dangling-link": "does not exist",
    "looping-link": "loops",
}


def _kernel() -> tunebook.Autotuner:
    replay = Replay({32: 3.0, 64: 1.0, 128: 2.0})
    configs = block_configs(32, 64, 128)
    return tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(add_kernel)


def within_deadline(work: Callable[[], T], fifos: list[Path], deadline_s: float) -> tuple[T, list[str]]:
    """(what ``work()`` returned, the BookWarnings it issued), run in a thread; fail (and
    unblock any FIFO, so that the thread can end) if it does not return in time."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome["value"] = work()
            outcome["warnings"] = [
                str(w.message) for w in caught if issubclass(w.category, tunebook.BookWarning)
            ]
        except BaseException as exc:  # reported by the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        for fifo in fifos:  # let the stuck open() return, so the thread can end
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"it did not return within {deadline_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], outcome["warnings"]


def _call(kernel: tunebook.Autotuner, n: int = 300) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def _call_within_deadline(kernel: tunebook.Autotuner, fifos: list[Path]) -> list[str]:
    """Call ``kernel`` (and check its answer) within DEADLINE_S; the BookWarnings it issued."""
    return within_deadline(lambda: _call(kernel), fifos, DEADLINE_S)[1]


@pytest.mark.parametrize("mode", ["tune", "serve"])
@pytest.mark.parametrize("where", ["own", "readonly", "sibling"])
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_hostile_object_at_a_book_path_never_hangs_or_crashes_a_call(
    plant: str, where: str, mode: str, book_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEBOOK_MODE", mode)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("TUNEBOOK_PATH", str(shipped))
    kernel = _kernel()
    ident = kernel.identity()
    if where == "own":
        path = book_dir / ident.file_name
    elif where == "readonly":
        path = shipped / ident.file_name
    else:
        path = book_dir / f"add_kernel--{ident.kernel.id}--other-gpu--0123456789abcdef.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    PLANTS[plant](path)

    found = _call_within_deadline(kernel, [path] if plant == "fifo" else [])

    if where != "sibling" or mode == "tune":  # siblings are read for hints, on a tune-mode miss only
        assert any(str(path) in w and REASONS[plant] in w for w in found), found
    if mode == "tune":
        assert tunebook.stats()["benchmarked"] == 3


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_the_reader_refuses_what_is_not_a_regular_file_and_names_it(plant: str, tmp_path: Path) -> None:
    path = tmp_path / "book.json"
    PLANTS[plant](path)
    with pytest.raises(Unusable, match=REASONS[plant]):
        read_regular_file(path, 1 << 20)


def test_the_reader_stops_at_its_limit_whatever_the_size_claims(tmp_path: Path) -> None:
    path = tmp_path / "book.json"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100
    with pytest.raises(Unusable, match="over the 99-byte limit"):
        read_regular_file(path, 99)
    assert read_regular_file(tmp_path / "missing.json", 10) is None


def test_a_symlink_planted_at_the_lock_path_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    """filelock < 3.20.1 opened the planted link with O_TRUNC: its target became 0 bytes."""
    from store_contract import FILE, doc
    from tunebook._book import DirectoryStore

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    books = tmp_path / "books"
    news = doc(64, {16: 1.0})
    (text,) = news.entries
    lock = books / FILE.removesuffix(".json") / pagedir.HIDDEN / "locks"
    lock /= pagedir.key_file_name(text).removesuffix(".json") + ".lock"
    lock.parent.mkdir(parents=True)
    os.symlink(precious, lock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tunebook.BookWarning)
        DirectoryStore(books).merge(FILE, news)  # the key's lock refused: the news goes to pending/
    assert precious.read_text() == "keep me"


def _format2_path(page: Path, where: str, key: str) -> Path:
    if where == "page.json":
        return page / "page.json"
    name = pagedir.key_file_name(key)
    if where == "key":
        return page / name
    pending = page / pagedir.HIDDEN / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    return pending / f"{name.removesuffix('.json')}.1-2-3.json"


@pytest.mark.parametrize("mode", ["tune", "serve"])
@pytest.mark.parametrize("where", ["key", "page.json", "pending"])
@pytest.mark.parametrize("plant", ["fifo", "dev-zero"])
def test_a_hostile_object_in_a_page_directory_never_hangs_or_crashes_a_call(
    plant: str, where: str, mode: str, book_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Format 2's own paths: a key's file, the page's page.json, news in its pending/."""
    from test_book_scale import write_big_page
    from tunebook._jsonio import key_text

    page = write_big_page(_kernel(), book_dir, 1)  # n = 1000, BLOCK=64 chosen
    key = key_text((1000, "torch.float32", "torch.float32", "torch.float32"))
    path = _format2_path(page, where, key)
    path.unlink(missing_ok=True)
    PLANTS[plant](path)
    monkeypatch.setenv("TUNEBOOK_MODE", mode)

    kernel = _kernel()
    found = within_deadline(lambda: _call(kernel, 1000), [path] if plant == "fifo" else [], DEADLINE_S)[1]

    assert any(str(path) in w and REASONS[plant] in w for w in found), found
    # A hostile pending file leaves the key's own file serving, and so does a hostile
    # page.json (the call knows which page it asked for: the key's file says whose it is);
    # a hostile key's file loses the key to this call: tuned again (tune), or the default
    # config runs (serve).
    expected = 0 if where in ("pending", "page.json") or mode == "serve" else 3
    assert tunebook.stats()["benchmarked"] == expected
