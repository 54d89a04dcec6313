"""A fork server for the tests' child processes: a Python with torch and triton imported.

The tests cross process boundaries where persistence is the point, so they start many
children, each a new Python that imports tunebook afresh. Most of a child's start-up is
``import torch`` (about 4 s a process on one CI core: 2.5 s of module imports, the rest
loading libtorch), which has nothing to do with what the tests check. The server imports
torch and triton once and nothing else (not tunebook, no kernel, no torch operation:
OpenMP's thread pool must not exist before a fork), then forks a child per request.

Each request is a ``python -c CODE`` as :func:`subprocess.run` would start it: the child
gets the given environment (``os.environ`` replaced), working directory and
``sys.path`` (``''``, then the request's ``PYTHONPATH``, then the interpreter's own), a
fresh ``__main__``, ``sys.argv == ['-c']``, stdin from /dev/null, stdout and stderr into
files, and exits as an interpreter does (non-daemon threads joined, ``atexit`` handlers
run, streams flushed). What it cannot give is a fresh torch or triton: both are the
server's, imported before the request's environment was set, so settings they read at
import keep the server's values: ``OMP_NUM_THREADS``, ``TRITON_DEBUG``, and above all
``TRITON_INTERPRET``, under which Triton decorates its own library functions at import
(the server runs with ``TRITON_INTERPRET=1``; a child without it, on a GPU, fails in
Triton's binder). A test that needs any of them, or that checks what a new process has
imported, starts a new interpreter (``conftest.run_python`` does so for a child without
``TRITON_INTERPRET=1``).

Protocol, over a Unix socket: one JSON request line; the server forks a handler, which
forks the child in a process group of its own, waits for it (killing the group at the
timeout) and answers one JSON line ``{"returncode": N, "timed_out": bool}``.
``TUNEBOOK_TESTS_FORK=0`` turns the server off (every child is a new interpreter).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ server


def _child(request: dict[str, Any], base_path: list[str]) -> None:
    """The requested ``python -c``, in this (forked) process; never returns."""
    import atexit
    import threading
    import traceback
    import types

    code = 1
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = ["", *[os.path.abspath(p) for p in extra], *base_path]
        sys.argv[:] = ["-c"]
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        try:
            exec(compile(request["code"], "<string>", "exec"), main.__dict__)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as exit does
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _handle(conn: socket.socket, base_path: list[str]) -> None:
    """A handler process: fork the child, wait for it, answer."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with conn, conn.makefile("rwb") as stream:
        request = json.loads(stream.readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(request, base_path)
        try:  # set on both sides of the fork: the group exists whichever runs first
            os.setpgid(pid, pid)
        except OSError:
            pass
        deadline = time.monotonic() + float(request["timeout"])
        timed_out, status = False, 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        reply = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        stream.write(json.dumps(reply).encode() + b"\n")
        stream.flush()


def serve(path: str) -> None:
    """Import torch and triton, then fork a handler for each connection on ``path``."""
    import torch  # noqa: F401
    import triton  # noqa: F401

    own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    base_path = [p for p in sys.path[1:] if os.path.abspath(p) not in own]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    server.settimeout(2.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test session is gone (killed): so is its server
                return
            continue
        conn.setblocking(True)
        if os.fork() == 0:
            server.close()
            try:
                _handle(conn, base_path)
            finally:
                os._exit(0)
        conn.close()


# ------------------------------------------------------------------------------ client


class ForkServer:
    """The tests' side: start the server once, run children through it."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="tunebook-forkserver-"))
        self._path = str(self._dir / "socket")
        self._process = subprocess.Popen(
            [sys.executable, str(_HERE), self._path],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TRITON_INTERPRET": "1"},
            start_new_session=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if line.strip() != b"ready":
            self.close()
            raise RuntimeError(f"the tests' fork server did not start (said {line!r})")

    def alive(self) -> bool:
        return self._process.poll() is None

    def run(
        self, code: str, env: dict[str, str], cwd: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Like ``subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
        env=env, cwd=cwd, timeout=timeout)``."""
        out = tempfile.NamedTemporaryFile(dir=self._dir, suffix=".out", delete=False)
        err = tempfile.NamedTemporaryFile(dir=self._dir, suffix=".err", delete=False)
        out.close()
        err.close()
        request = {
            "code": code,
            "env": env,
            "cwd": cwd or os.getcwd(),
            "stdout": out.name,
            "stderr": err.name,
            "timeout": timeout,
        }
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(self._path)
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as stream:
                    reply = json.loads(stream.readline())
            stdout, stderr = Path(out.name).read_text(), Path(err.name).read_text()
        finally:
            Path(out.name).unlink(missing_ok=True)
            Path(err.name).unlink(missing_ok=True)
        args = [sys.executable, "-c", code]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(args, reply["returncode"], stdout, stderr)

    def close(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
