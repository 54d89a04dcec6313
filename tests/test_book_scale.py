"""A book's cost does not grow with its size, and no process waits on another's lock.

Issue 10 items 4 and 6: a 40,000-key book made the first kernel call take 5-6 s and a miss
24-38 s, and a process frozen while holding the book's lock stalled others 60-92 s and then
lost their results. Here: a hit reads nothing, a first call and a miss read a handful of
files whatever the book's size, and a key whose lock a stopped process holds is still
tuned within a second and its results reach the disk (benchmarks/book_scale.py measures
the times).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tunebook
from conftest import TESTS
from kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import Entry, Result, config_id, files, pagedir
from tunebook._jsonio import key_text

TABLE = {32: 3.0, 64: 1.0, 128: 2.0}


def _kernel() -> Any:
    replay = Replay(TABLE)
    return tunebook.autotune(
        block_configs(32, 64, 128), key=["n"], do_bench=replay, pre_hook=replay.pre_hook
    )(add_kernel)


def _call(kernel: Any, n: int) -> None:
    x, y, out = vectors(n)
    kernel[grid_1d(n)](x, y, out, n)
    torch.testing.assert_close(out, x + y)


def write_big_page(kernel: Any, directory: Path, keys: int) -> Path:
    """A page of ``keys`` keys for ``kernel`` (n = 1000, 1001, ...), as tuning writes them,
    without the fsync of every file (this is a fixture, not a write to test)."""
    ident = kernel.identity()
    meta = {"kernel": ident.kernel.to_json(), "platform": {**ident.platform, "id": ident.platform_id}}
    page = directory / pagedir.page_dir_name(ident.file_name)
    pagedir.ensure_page(page, meta)
    records = [kernel.config_index.record_of(c) for c in kernel.configs]
    for n in range(1000, 1000 + keys):
        key = (n, "torch.float32", "torch.float32", "torch.float32")
        results = {config_id(r): Result(r, (TABLE[r["kwargs"]["BLOCK"]],) * 3, None, "t") for r in records}
        entry = Entry(key, results, 1.0, "t", "t", "0", chosen=config_id(records[1]))
        (page / pagedir.key_file_name(key_text(key))).write_text(pagedir.entry_text(entry, meta))
    return page


def _reads(book_dir: Path, keys: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """Files read by a first call (a key the book holds), a hit, and a miss, in a book of
    ``keys`` keys."""
    monkeypatch.setenv("TUNEBOOK_DIR", str(book_dir))
    write_big_page(_kernel(), book_dir, keys)
    reads: list[str] = []
    real = pagedir.read_regular_file

    def counted(path: Path, limit: int) -> Any:
        reads.append(Path(path).name)
        return real(path, limit)

    monkeypatch.setattr(pagedir, "read_regular_file", counted)
    tunebook.reset_stats()
    kernel = _kernel()
    _call(kernel, 1000 + keys // 2)  # first call: a key the book holds
    first = len(reads)
    _call(kernel, 1000 + keys // 2)  # a hit
    hit = len(reads) - first
    _call(kernel, 999)  # a miss: tuned, with the nearest keys as hints, and written
    assert tunebook.stats()["benchmarked"] == 3
    return first, hit, len(reads) - first - hit


def test_first_calls_hits_and_misses_read_a_handful_of_files_whatever_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = _reads(tmp_path / "small", 40, monkeypatch)
    monkeypatch.setattr(pagedir, "read_regular_file", files.read_regular_file)
    large = _reads(tmp_path / "large", 2000, monkeypatch)
    first, hit, miss = large
    assert large == small, (small, large)  # 50 times the keys, not one file more
    assert hit == 0 and first <= 3 and miss <= 40, large


HOLDER = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_frozen_lock_holder_stalls_no_one_and_loses_no_result(book_dir: Path) -> None:
    kernel = _kernel()
    ident = kernel.identity()
    page = book_dir / pagedir.page_dir_name(ident.file_name)
    text = key_text((300, "torch.float32", "torch.float32", "torch.float32"))
    lock = page / pagedir.HIDDEN / "locks" / f"{pagedir.key_file_name(text)[: -len('.json')]}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)  # a debugger, ctrl-Z, a frozen container
        start = time.monotonic()
        _call(kernel, 300)
        took = time.monotonic() - start
        assert tunebook.stats()["benchmarked"] == 3
        assert took < 5.0, f"the miss waited {took:.1f} s on a frozen process's lock"
        # The results are on disk (pending), so a new process serves them without benchmarking.
        code = f"""
            import json, tunebook
            from kernels import Replay, add_kernel, block_configs, grid_1d, vectors
            replay = Replay({TABLE!r})
            k = tunebook.autotune(block_configs(32, 64, 128), key=["n"], do_bench=replay,
                                  pre_hook=replay.pre_hook)(add_kernel)
            x, y, out = vectors(300)
            k[grid_1d(300)](x, y, out, 300)
            print(json.dumps(tunebook.stats()))
        """
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert '"benchmarked": 0' in out.stdout.splitlines()[-1], out.stdout
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder is gone: the next write of the key folds the pending news into its file.
    pending = list((page / pagedir.HIDDEN / "pending").glob("*.json"))
    assert pending, "the news went to pending/ while the lock was held"
    meta = pagedir.read_meta(page)
    assert meta is not None
    merged = pagedir.merge_key(
        page, meta, text, Entry((300, "torch.float32", "torch.float32", "torch.float32"))
    )
    assert len(merged.results) == 3
    assert not list((page / pagedir.HIDDEN / "pending").glob("*.json"))
