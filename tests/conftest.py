"""Test set-up: every test runs kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at the top.
Each test gets its own empty book directory and fresh counters.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNEBOOK_PATH", None)
os.environ.pop("TUNEBOOK_MODE", None)
os.environ.pop("TUNEBOOK_KERNELS_SHIPPED_BOOKS", None)
os.environ.pop("TRITON_PRINT_AUTOTUNING", None)

import pytest

import tunebook
from forkserver import ForkServer

TESTS = Path(__file__).resolve().parent
T = TypeVar("T")


def load_module(path: Path, name: str) -> ModuleType:
    """The Python file at ``path`` as module ``name``, loaded by path (a script's directory
    on sys.path would put its modules in front of every test's), registered in sys.modules
    (dataclasses and Triton's source lookup find their module there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """scripts/test runs the suite once per supported Triton, the oldest first; tests marked
    ``once`` run on its last pass (the newest Triton) only: TUNEBOOK_TESTS_ONCE_DONE=1 on the
    earlier passes skips them, which keeps CI within its time.

    Every pass runs what touches Triton's behaviour: the compatibility package (``_compat/``,
    the one door to Triton's internals) and the autotuner core built on it (the drop-in
    autotuner, modes, the book and its pages, persistence across processes, the miss rule,
    the hit path, result checking, identities, crash-isolated tuning, ``tunebook.patch``,
    adoption and the start-up hook), and every kernel of the pack against its PyTorch
    reference (``tests/pack/test_<op>.py``). A test that patches or reads Triton's internals
    (``triton.autotune``, ``JITFunction``, subclasses of Triton's ``Autotuner``, an
    interpreter quirk) is never marked ``once``.

    ``once`` marks what is built on that core and reaches Triton only through it (each file
    or test says why): the LLM demo (``tests/llm/``), the command line (``test_cli*.py``),
    Ray sweeps (``test_ray_sweep.py``, ``test_sweep_*.py``), torch.distributed groups
    (``test_distributed.py``), the Redis fleet book (``test_shared_book.py``,
    ``test_redis_store.py``), many processes on one book (``test_torture.py``,
    ``test_contention.py``), search strategies over recorded tables (``test_strategies.py``),
    the benchmark scripts' CPU modes (``test_benchmarks.py``, ``tests/pack/test_*benchmark*.py``,
    ``test_decode_structures.py``), the demo and the guide's quick start, the kernel pack's
    command-line plumbing and its tune-then-serve-in-a-new-process checks (the core's
    persistence across processes runs on every Triton), the shipped books' contents, the
    book parser's derandomized fuzzing, real libraries' adoption runs
    (``tests/adoption/test_libraries.py``: ``thirdparty.py`` does what they do to Triton's
    autotuner, and ``test_thirdparty.py`` runs it on every Triton), and cases of a kept test
    that differ from the one kept only in pure Python (``test_persistence.py``'s damages).

    pytest runs one test at a time and CI has two cores: where a test's work is child
    processes that share nothing, it runs them at once (``side_by_side`` below;
    ``test_benchmarks.py`` queues its scripts two at a time)."""
    if os.environ.get("TUNEBOOK_TESTS_ONCE_DONE") != "1":
        return
    skip = pytest.mark.skip(reason="marked once: scripts/test runs it on its last Triton")
    for item in items:
        if item.get_closest_marker("once") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def book_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh writable book for every test; counters zeroed."""
    directory = tmp_path / "book"
    monkeypatch.setenv("TUNEBOOK_DIR", str(directory))
    monkeypatch.delenv("TUNEBOOK_PATH", raising=False)
    monkeypatch.delenv("TUNEBOOK_MODE", raising=False)
    tunebook.reset_stats()
    from tunebook import _warnings
    from tunebook._book import unwritten

    _warnings.forget()
    yield directory
    # What a test's directories refused is the test's business: not written again (and said
    # lost) at the exit of pytest, long after the test and its directories are gone.
    unwritten._refused.clear()
    unwritten._held_misses.clear()
    unwritten._held_keys = 0


def book_files(directory: Path) -> list[Path]:
    """The book's pages: format-1 files and format-2 page directories (read_document reads both)."""
    return sorted(p for p in directory.glob("*") if p.suffix == ".json" or (p / "page.json").is_file())


def only_entry(directory: Path) -> Any:
    """The one key's entry of the one page a book directory holds."""
    from tunebook._book import read_document

    (path,) = book_files(directory)
    doc = read_document(path)
    assert doc is not None
    (entry,) = doc.entries.values()
    return entry


def as_format1(page: Path) -> Path:
    """Rewrite a format-2 page directory as the format-1 file of the same page (what older
    tunebooks wrote, and still read); returns the file."""
    import shutil

    from tunebook._book import read_document

    doc = read_document(page)
    assert doc is not None, page
    path = page.with_name(page.name + ".json")
    path.write_text(doc.dumps())
    shutil.rmtree(page)
    return path


def page_files(page: Path) -> dict[str, bytes]:
    """The visible files of a format-2 page (page.json and one per key), by name."""
    return {p.name: p.read_bytes() for p in sorted(page.glob("*.json"))}


def book_bytes(path: Path) -> object:
    """What a page holds on disk, to compare: a format-1 file's bytes, a page's visible files."""
    return page_files(path) if path.is_dir() else path.read_bytes()


def remove_page(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


_FORK_SERVER: list[ForkServer | None] = []


def _fork_server() -> ForkServer | None:
    """The session's fork server (tests/forkserver.py), started at the first child; None
    with TUNEBOOK_TESTS_FORK=0, or if it could not start or has died."""
    if not _FORK_SERVER:
        server = None
        if os.environ.get("TUNEBOOK_TESTS_FORK", "1") != "0":
            try:
                server = ForkServer()
            except Exception as exc:  # the children then start as new interpreters
                print(f"tests: no fork server ({exc}); children start as new interpreters", file=sys.stderr)
            else:
                atexit.register(server.close)
        _FORK_SERVER.append(server)
    server = _FORK_SERVER[0]
    return server if server is not None and server.alive() else None


def run_python(
    code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> dict:
    """Run ``code`` in a new Python process; it must print one JSON object as its last line.

    The process is forked from the session's fork server (tests/forkserver.py: torch and
    triton already imported, tunebook not), which saves each child the seconds of
    ``import torch``; ``TUNEBOOK_TESTS_FORK=0``, or a child env without TRITON_INTERPRET=1,
    starts a new interpreter instead."""
    full_env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(cwd or TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    full_env.update(env or {})
    # Triton decorates its own library functions at import, for the interpreter or not: a
    # child without the interpreter (the GPU tests) starts as a new Python.
    server = _fork_server() if full_env.get("TRITON_INTERPRET") == "1" else None
    if server is not None:
        proc = server.run(textwrap.dedent(code), full_env, None if cwd is None else str(cwd), timeout)
    else:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"child failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
        )
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    result["_stderr"] = proc.stderr
    result["_stdout"] = proc.stdout
    return result


def side_by_side(*calls: Callable[[], T]) -> list[T]:
    """Each of ``calls`` at once, on its own thread; their results, in order (the first
    exception raised, if any). For calls that each wait on a new process, none reading what
    another writes: a process keeps about one core busy, and CI has two."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]
