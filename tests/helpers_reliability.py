"""Helpers of the reliability tests: a real redis-server, the torture child, an atheris harness.

Run directly for the coverage-guided fuzzer (outside the test suite)::

    python tests/helpers_reliability.py atheris -atheris_runs=200000 tests/data/fuzz_corpus
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SKIP_REDIS_ENV = "TUNEBOOK_SKIP_REDIS"

# ----------------------------------------------------------------------------- redis-server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throw-away ``redis-server`` on 127.0.0.1 with no persistence; stop/start keep the port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str | None:
        return shutil.which("redis-server")

    def start(self, wait_s: float = 15.0) -> None:
        exe = self.executable()
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self._proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {wait_s:.0f} s")

    def ping(self) -> bool:
        """True when the server answers PING (raw RESP, so this needs no redis-py)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel, nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a frozen process dies only once it runs
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


# ----------------------------------------------------------------------------- torture child

# Where a writer can be stopped while it holds the book's lock, in the order it passes them.
KILL_POINTS = ("locked", "temp-written", "replaced")
TABLE = {16: 0.3, 32: 0.2, 64: 0.25}  # every child replays the same timings


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _install_handshakes(book: Path) -> None:
    """Stop the writer at each KILL_POINT until the parent answers "go" (or kills it there).

    Test-only: wraps the OS calls atomic_write_text makes around its critical steps (the
    ``os.open`` of its temp file in the page's ``.tunebook/tmp/``, right after the key's
    lock is taken and its file re-read; ``os.fsync`` of the temp file before ``os.replace``,
    and of the directory after it), so that a kill lands inside a write deterministically
    instead of by luck of timing.
    """
    import stat

    real_open, real_fsync = os.open, os.fsync
    writing = [False]

    def point(name: str) -> None:
        _emit(ev="point", at=name)
        if sys.stdin.readline().strip() != "go":
            os._exit(3)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        where = Path(path)
        if where.suffix == ".tmp" and book in where.resolve().parents:
            writing[0] = True
            point("locked")
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd: int) -> None:
        if writing[0]:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            writing[0] = not is_dir
            point("replaced" if is_dir else "temp-written")
        real_fsync(fd)

    os.open = open_  # type: ignore[assignment]
    os.fsync = fsync


def torture_child() -> None:
    """Tune the keys in $TORTURE_KEYS on two kernels; print each result known to be on disk."""
    import torch  # noqa: F401 - imported before triton, as users do
    import triton

    import tunebook
    from small_kernels import Replay, add_kernel, block_configs, grid_1d, scale_kernel, vectors
    from tunebook._book import DirectoryStore

    book = Path(os.environ["TUNEBOOK_DIR"]).resolve()
    book.mkdir(parents=True, exist_ok=True)
    _install_handshakes(book)
    plan: list[list[Any]] = json.loads(os.environ["TORTURE_PLAN"])  # [[kernel name, n], ...]
    replay = Replay(TABLE)
    tuners = {
        name: tunebook.autotune(block_configs(*TABLE), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
            fn
        )
        for name, fn in (("add", add_kernel), ("scale", scale_kernel))
    }
    _emit(ev="ready", pid=os.getpid())
    for name, n in plan:
        x, y, out = vectors(n, seed=n)
        if name == "add":
            tuners[name][grid_1d(n)](x, y, out, n)
            expected = x + y
        else:
            tuners[name][grid_1d(n)](x, out, n, 3.0)
            expected = x * 3.0
        if not bool((out == expected).all()):
            _emit(ev="wrong-answer", kernel=name, n=n)
            continue
        # Read the book back: only what is on disk now counts as persisted.
        page = tuners[name].page()
        doc = DirectoryStore(book).fetch(page.file_name)
        found = [(k, e) for k, e in (doc.entries.items() if doc else ()) if e.key and e.key[0] == n]
        if len(found) != 1 or len(found[0][1].results) != len(TABLE):
            _emit(ev="not-persisted", kernel=name, n=n)
            continue
        key_text, entry = found[0]
        _emit(
            ev="persisted",
            file=page.file_name,
            key=key_text,
            results={cid: list(r.ms or ()) for cid, r in entry.results.items()},
        )
    _emit(ev="done", triton=triton.__version__)


# ----------------------------------------------------------------------------- atheris


# Crashes pinned by tests/data/fuzz_corpus/bug-* inputs while they are open: counted, so the
# fuzzer goes on to new ones. Empty: the three the fuzzer found (non-finite numbers, huge
# integers, object-valued configs) are fixed, so hitting them again is a crash.
KNOWN_CRASHES: tuple[tuple[str, str], ...] = ()


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing of read_document: bytes in, Document or None out, writes back."""
    import tempfile

    import atheris

    with atheris.instrument_imports(include=["tunebook._book", "json"]):
        import tunebook  # noqa: F401 - imports tunebook._book (instrumented), triton (not)
        from tunebook._book import files, records

    target = Path(tempfile.mkdtemp()) / "book.json"
    count = [0]
    known: dict[str, int] = {}

    def one(data: bytes) -> None:
        count[0] += 1
        if count[0] % 100_000 == 0:  # libFuzzer ends the process with _exit: report as we go
            print(f"atheris: {count[0]} inputs tried; known crashes hit: {known}", file=sys.stderr)
        target.write_bytes(data)
        try:
            doc = files.read_document(target)
            assert doc is None or isinstance(doc, records.Document)
            if doc is not None:  # merge-on-write writes back what it read: that must work
                records.Document.from_json(json.loads(doc.dumps()))
        except Exception as exc:
            for name, text in KNOWN_CRASHES:
                if type(exc).__name__ == name and text in str(exc):
                    known[name + ": " + text] = known.get(name + ": " + text, 0) + 1
                    return
            raise

    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "atheris":
        with contextlib.suppress(KeyboardInterrupt):
            atheris_main([sys.argv[0], *sys.argv[2:]])
    else:
        raise SystemExit(__doc__)
