"""What a book remembers across real processes, and when it must forget.

Each test writes a small kernel module into a temp directory, then runs fresh Python
processes that import it and call the kernel, and reads their counters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import book_files, run_python
from store_contract import snapshot

KERNEL_MODULE = """
import triton
import triton.language as tl
{padding}

@triton.jit
def _combine(a, b):
    return a {op} b


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    {body}
"""
DEFAULT_BODY = (
    "tl.store(out_ptr + offs, _combine(tl.load(x_ptr + offs, mask=mask), "
    "tl.load(y_ptr + offs, mask=mask)), mask=mask)"
)

CHILD = """
import json, os, sys
import torch, triton
import tunebook
from small_kernels import Replay, grid_1d, vectors
import userkern

blocks = json.loads(os.environ.get("BLOCKS", "[32, 64, 128]"))
TABLE = '{"32": 3.0, "64": 1.0, "128": 2.0, "256": 0.5}'
table = {int(k): v for k, v in json.loads(os.environ.get("TABLE", TABLE)).items()}
replay = Replay(table)
hooked = os.environ.get("HOOKED") == "1"
hook_calls = []
def config_hook(nargs):
    hook_calls.append(nargs["BLOCK"])
configs = [triton.Config({"BLOCK": b}, pre_hook=config_hook if hooked else None) for b in blocks]
extra = {}
if os.environ.get("SHIPPED"):
    extra["books"] = [os.environ["SHIPPED"]]
tune = tunebook.autotune(configs, key=["n"], do_bench=replay, pre_hook=replay.pre_hook, **extra)
kernel = tune(userkern.add_kernel)
op = os.environ.get("OP", "+")
for n in json.loads(os.environ.get("NS", "[300]")):
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    expected = x + y if op == "+" else x * y
    assert torch.allclose(out, expected), "wrong output"
print(json.dumps({**tunebook.stats(), "best": kernel.best_config.kwargs["BLOCK"], "measured": replay.measured,
                  "hook_calls": hook_calls}))
"""


def write_kernel(directory: Path, *, op: str = "+", padding: str = "", body: str = DEFAULT_BODY) -> None:
    (directory / "userkern.py").write_text(KERNEL_MODULE.format(op=op, padding=padding, body=body))


def child(directory: Path, **env: object) -> dict:
    return run_python(CHILD, cwd=directory, env={k: str(v) for k, v in env.items()})


@pytest.fixture
def kdir(tmp_path: Path) -> Path:
    d = tmp_path / "mod"
    d.mkdir()
    write_kernel(d)
    return d


@pytest.fixture(scope="module")
def first_tuning(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default module tuned in a new process into an empty book, as most tests here start
    (``child(kdir)``): the book it wrote and the child's report. Done once for the module;
    each test copies the book (``tuned_into``) instead of spending a process on it again."""
    root = tmp_path_factory.mktemp("first-tuning")
    write_kernel(root)
    return root / "book", child(root, TUNEBOOK_DIR=root / "book")


def tuned_into(first_tuning: tuple[Path, dict], book: Path) -> dict:
    """``book`` (new) holds what ``child(kdir, TUNEBOOK_DIR=book)`` writes on an empty book;
    that child's report. The kernel's identity is its source, not its file's directory."""
    tuned, report = first_tuning
    shutil.copytree(tuned, book)
    return dict(report)


@pytest.mark.slow
def test_new_process_benchmarks_nothing_for_a_remembered_key(kdir, book_dir, first_tuning):
    first = tuned_into(first_tuning, book_dir)
    assert first["benchmarked"] == 3 and first["misses"] == 1 and first["best"] == 64
    second = child(kdir)
    assert second["benchmarked"] == 0 and second["measured"] == []
    assert second["book_hits"] == 1 and second["hits"] == 1 and second["misses"] == 0
    assert second["best"] == 64
    (page,) = book_files(book_dir)
    meta = json.loads((page / "page.json").read_text())
    assert meta["format"] == "tunebook-page" and meta["version"] == 2
    (key_file,) = (p for p in page.glob("*.json") if p.name != "page.json")
    entry = json.loads(key_file.read_text())
    assert entry["format"] == "tunebook-entry" and entry["version"] == 2
    assert len(entry["results"]) == 3 and entry["winner"].startswith("BLOCK=64|")


@pytest.mark.slow
def test_adding_a_config_measures_only_that_config(kdir, book_dir, first_tuning):
    tuned_into(first_tuning, book_dir)
    grown = child(kdir, BLOCKS="[32, 64, 128, 256]")
    assert grown["measured"] == [256] and grown["benchmarked"] == 1
    assert grown["best"] == 256  # the table makes the new config the fastest
    again = child(kdir, BLOCKS="[32, 64, 128, 256]")
    assert again["benchmarked"] == 0 and again["best"] == 256
    # Going back to the old list serves the old winner, still without benchmarking.
    back = child(kdir)
    assert back["benchmarked"] == 0 and back["best"] == 64


@pytest.mark.slow
def test_a_different_winner_in_a_new_list_is_chosen_among_declared_configs(kdir):
    child(kdir, BLOCKS="[32, 64, 128, 256]")
    subset = child(kdir, BLOCKS="[32, 128]")
    assert subset["benchmarked"] == 0 and subset["best"] == 128


@pytest.mark.slow
def test_changing_the_kernel_source_starts_afresh(kdir, book_dir, first_tuning):
    tuned_into(first_tuning, book_dir)
    write_kernel(kdir, op="*")
    changed = child(kdir, OP="*")
    assert changed["benchmarked"] == 3
    assert len(book_files(book_dir)) == 2  # the old version's file is left for `tunebook prune`


@pytest.mark.slow
def test_changing_a_called_jit_helper_starts_afresh(kdir, book_dir, first_tuning):
    tuned_into(first_tuning, book_dir)
    write_kernel(kdir, op="*")  # only _combine changes; add_kernel's own text is identical
    assert child(kdir, OP="*")["benchmarked"] == 3


@pytest.mark.slow
def test_moving_the_kernel_down_its_file_keeps_its_results(kdir, book_dir, first_tuning):
    tuned_into(first_tuning, book_dir)
    write_kernel(kdir, padding="\n\n# a comment that moves every line down\nUNUSED = 1\n\n\n")
    moved = child(kdir)
    assert moved["benchmarked"] == 0 and moved["best"] == 64


@pytest.mark.slow
def test_configs_with_their_own_pre_hook_are_remembered(kdir):
    first = child(kdir, HOOKED=1)
    assert first["benchmarked"] == 3
    second = child(kdir, HOOKED=1)
    assert second["benchmarked"] == 0
    assert second["hook_calls"] == [64]  # the declared config's hook ran for the served call


@pytest.mark.slow
def test_shipped_read_only_book_on_tunebook_path(kdir, tmp_path, first_tuning):
    shipped = tmp_path / "shipped"
    tuned_into(first_tuning, shipped)
    before = snapshot(shipped)
    local = tmp_path / "local"
    served = child(kdir, TUNEBOOK_DIR=local, TUNEBOOK_PATH=f"{tmp_path / 'nothing'}{os.pathsep}{shipped}")
    assert served["benchmarked"] == 0 and served["best"] == 64
    # A key the shipped book lacks is tuned into the writable book, never into the shipped one.
    more = child(kdir, TUNEBOOK_DIR=local, TUNEBOOK_PATH=shipped, NS="[300, 500]")
    assert more["benchmarked"] == 3
    assert snapshot(shipped) == before
    assert len(book_files(local)) == 1


@pytest.mark.slow
def test_shipped_book_given_with_the_books_option(kdir, tmp_path, first_tuning):
    shipped = tmp_path / "shipped"
    tuned_into(first_tuning, shipped)
    served = child(kdir, TUNEBOOK_DIR=tmp_path / "local", SHIPPED=shipped)
    assert served["benchmarked"] == 0 and served["best"] == 64


def test_books_may_be_a_function_called_when_the_book_is_first_opened(tmp_path, monkeypatch):
    """books=fn: the directories are asked for at the first call, not at decoration (the
    kernel pack's TUNEBOOK_KERNELS_SHIPPED_BOOKS is read this way)."""
    import tunebook
    from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors

    replay = Replay({32: 2.0, 64: 1.0})
    shipped, where = tmp_path / "shipped", []
    monkeypatch.setenv("TUNEBOOK_DIR", str(shipped))
    x, y, out = vectors(300)
    timer = {"do_bench": replay, "pre_hook": replay.pre_hook}  # the timer is part of the platform: both
    tunebook.autotune(block_configs(32, 64), key=["n"], **timer)(add_kernel)[grid_1d(300)](x, y, out, 300)
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    served = tunebook.autotune(block_configs(32, 64), key=["n"], books=lambda: where, **timer)(add_kernel)
    where.append(shipped)  # after decoration, before the first call
    before = tunebook.stats()["benchmarked"]
    served[grid_1d(300)](x, y, out, 300)
    assert served.best_config.kwargs == {"BLOCK": 64} and tunebook.stats()["benchmarked"] == before
    assert tunebook.stats()["book_hits"] == 1 and out.eq(x + y).all()


@pytest.mark.slow
def test_local_results_complete_a_shipped_book(kdir, tmp_path, first_tuning):
    shipped = tmp_path / "shipped"
    tuned_into(first_tuning, shipped)
    local = tmp_path / "local"
    grown = child(kdir, TUNEBOOK_DIR=local, TUNEBOOK_PATH=shipped, BLOCKS="[32, 64, 128, 256]")
    assert grown["measured"] == [256]
    # The writable book now holds all four results, so it stands on its own.
    alone = child(kdir, TUNEBOOK_DIR=local, BLOCKS="[32, 64, 128, 256]")
    assert alone["benchmarked"] == 0 and alone["best"] == 256


@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` and everything in it unwritable, also for root (who ignores permissions)."""
    paths = [directory, *directory.rglob("*")]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
    else:
        for p in paths:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for p in paths:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow
def test_read_only_book_directory_works_and_writes_nothing(kdir, tmp_path, first_tuning):
    ro = tmp_path / "ro"
    tuned_into(first_tuning, ro)  # tuned while writable
    before = snapshot(ro)
    with read_only(ro):
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # the directory really is read-only
        result = child(kdir, TUNEBOOK_DIR=ro, NS="[300, 700]")
    assert result["book_hits"] == 1  # n=300 remembered
    assert result["benchmarked"] == 3  # n=700 tuned, kept in memory
    assert snapshot(ro) == before
    assert result["_stderr"].count("cannot write to book directory") == 1
    assert "Traceback" not in result["_stderr"]


def test_a_read_only_book_that_is_not_there_is_reported_once(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A typo in TUNEBOOK_PATH (or books=) used to show only as fallbacks in serve mode."""
    from tunebook import BookWarning
    from tunebook._book import Book

    missing, a_file = tmp_path / "shiped", tmp_path / "afile"
    a_file.write_text("")
    monkeypatch.setenv("TUNEBOOK_PATH", f"{missing}{os.pathsep}{tmp_path}")
    with pytest.warns(BookWarning) as caught:
        Book.from_env([a_file])
        Book.from_env([a_file])  # once per path and process
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2, said
    assert f"the read-only book {a_file} (from books=) is not a directory" in said[0]
    assert f"the read-only book {missing} (from TUNEBOOK_PATH) does not exist" in said[1]


# A page.json that cannot be read (a truncated write from another tool, a bad byte, an empty
# file): the page's key files are intact, and the autotuner knows which page it asked for.
DAMAGED_PAGE_JSON = [b"", b'{"format": "tunebook-page", "version": 2, "kern', b"\xff\xfe"]


def _damage_page_json(book: Path, raw: bytes) -> Path:
    (page,) = book_files(book)
    (page / "page.json").write_bytes(raw)
    return page


@pytest.mark.slow
@pytest.mark.parametrize(
    "raw",
    # The three differ only in how reading page.json fails (pure Python): the oldest Triton
    # runs the first, the last Triton all three (tests/conftest.py).
    [DAMAGED_PAGE_JSON[0], *(pytest.param(raw, marks=pytest.mark.once) for raw in DAMAGED_PAGE_JSON[1:])],
    ids=["empty", "truncated", "not-utf8"],
)
def test_a_damaged_page_json_costs_no_benchmark_and_the_next_process_rewrites_it(
    kdir, book_dir, first_tuning, raw
):
    tuned_into(first_tuning, book_dir)
    page = _damage_page_json(book_dir, raw)
    tuned = child(kdir)  # tune mode, the damaged book as TUNEBOOK_DIR
    assert tuned["benchmarked"] == 0 and tuned["book_hits"] == 1 and tuned["best"] == 64
    assert tuned["_stderr"].count("the page's keys were read without it") == 1
    assert "It was rewritten" in tuned["_stderr"]
    meta = json.loads((page / "page.json").read_text())
    assert meta["format"] == "tunebook-page" and meta["kernel"]["name"] == "add_kernel"
    (aside,) = page.glob("page.json.corrupt-*")  # the damaged one, kept for a person
    assert aside.read_bytes() == raw
    again = child(kdir)
    assert again["benchmarked"] == 0 and again["best"] == 64
    assert "tunebook:" not in again["_stderr"]


@pytest.mark.slow
def test_a_shipped_book_with_a_damaged_page_json_still_serves_and_says_how_to_repair_it(
    kdir, tmp_path, first_tuning
):
    shipped = tmp_path / "shipped"
    tuned_into(first_tuning, shipped)
    page = _damage_page_json(shipped, b'{"format": "tunebook-page"')
    before = snapshot(shipped)
    local = tmp_path / "local"
    served = child(kdir, TUNEBOOK_DIR=local, TUNEBOOK_PATH=shipped, TUNEBOOK_MODE="serve")
    assert served["benchmarked"] == 0 and served["best"] == 64 and served["book_hits"] == 1
    assert snapshot(shipped) == before  # a read-only book is never written, not even repaired
    assert "is unreadable" in served["_stderr"] and f"TUNEBOOK_DIR={shipped}" in served["_stderr"]
    # The fix it names: one call with the book as TUNEBOOK_DIR, which benchmarks nothing.
    fixed = child(kdir, TUNEBOOK_DIR=shipped)
    assert fixed["benchmarked"] == 0 and json.loads((page / "page.json").read_text())["version"] == 2
    again = child(kdir, TUNEBOOK_DIR=local, TUNEBOOK_PATH=shipped, TUNEBOOK_MODE="serve")
    assert again["benchmarked"] == 0 and "tunebook:" not in again["_stderr"]
