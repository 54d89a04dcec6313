"""Inside a tuning worker process: ``python -m tunebook._worker -`` (its jobs on stdin).

A job tunes one key of one kernel: ``{"module", "attr", "key_text", "call", "key"}``. The
worker imports the kernel by module and attribute, rebuilds the call (the kernel's
``inputs=`` factory, else tensors of the recorded layout and the recorded grids), and calls
the kernel in ``tune`` mode, which measures and persists as usual, here (the worker *is* the
isolation). It prints one JSON line per event on stdout, which the supervisor follows:

    {"event": "job", "index": 3}
    {"event": "candidate", "index": 3, "key_text": "...", "key": [...], "cid": "...", "config": {...}}
    {"event": "result", "index": 3, "key_text": "...", "key": [...], "cid": "...", "result": {...},
     "kept": true}                          (kept false: held out of the book, _tuner.tune_key)
    {"event": "done", "index": 3, "benchmarked": 48, "seconds": 3.1}
    {"event": "error", "index": 3, "reason": "..."}
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_inside = False
# Held while a result is persisted and reported: a worker whose parent is gone ends between
# two results, never halfway through telling one (which a driver would then measure again).
reporting = threading.Lock()


def inside_worker() -> bool:
    """Whether this process is a tuning worker (which tunes in process, never isolated again)."""
    return _inside


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def locate(module: str, attr: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def zeroed_names(tuner: Any) -> set[str]:
    """The arguments a rebuilt call keeps at zero whatever the check: locks, counters and
    scratch (``ignore``, ``reset_to_zero``, ``restore_value``; _calls.build_args). A spin
    lock that started at a random value hung every config."""
    return {*tuner.reset_to_zero, *tuner.restore_value, *(tuner.options.check or {}).get("ignore", ())}


def rebuild_call(tuner: Any, job: Mapping[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(grid, args, kwargs) for a job, through the kernel's inputs= factory or the recording."""
    from .. import _calls

    call = job.get("call")
    inputs = tuner.options.inputs
    if inputs is not None:
        built = inputs({"call": call, "key": job.get("key", {})})
        if not (isinstance(built, tuple | list) and len(built) == 3):
            raise TypeError(
                f"{job['module']}:{job['attr']}: inputs= returned {type(built).__name__} {built!r:.120}; it "
                "must return (grid, args, kwargs), grid None for the recorded call's grid"
            )
        grid, args, kwargs = built
        if grid is not None:
            return _of_the_key(tuner, job, grid, tuple(args), dict(kwargs))
    elif call is None:
        raise ValueError(
            f"{job['module']}:{job['attr']} has no recorded call for this key and no inputs= factory; "
            "register inputs= with tunebook.autotune to tune declared keys"
        )
    else:
        # A checked kernel's integers are random, else the check compares runs on zeros.
        args, kwargs = _calls.build_args(
            call,
            device=_default_device(),
            random_integers=tuner.options.check is not None,
            names=tuner.arg_names,
            zeroed=zeroed_names(tuner),
        )
    if call is None or not call.get("grids"):
        raise ValueError("no launch grid: the recorded call has no grids and inputs= returned grid=None")
    return _of_the_key(
        tuner, job, _calls.grid_from(call, tuner.config_index.id_for_meta), tuple(args), dict(kwargs)
    )


def _of_the_key(
    tuner: Any, job: Mapping[str, Any], grid: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The call, if it is of the job's key. A call of another key tunes that key, and the
    job was reported tuned while its own key stayed a miss, run after run."""
    from .._call import Call
    from .._jsonio import key_text

    call = Call.bind(tuner.arg_names, args, kwargs, grid)
    if job.get("call") is not None:  # a recorded miss: its key text is the key's
        wanted, built = str(job["key_text"]), key_text(tuner._key(call))
    else:  # a declared key: the values asked for, as the arguments must hold them
        named = call.named
        asked = dict(job.get("key") or {})
        wanted = ", ".join(f"{k}={v!r}" for k, v in asked.items())
        built = ", ".join(f"{k}={named.get(k)!r}" for k in asked)
    if built != wanted:
        raise ValueError(
            f"{job['module']}:{job['attr']}: the call rebuilt for key {wanted} is of key {built}; "
            "inputs= must build arguments whose key values are the description's (description['key'])"
        )
    return grid, args, kwargs


def _default_device() -> str | None:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        return None


class _Reporter:
    """Reports each candidate and result of the current job to the supervisor."""

    def __init__(self, index: int) -> None:
        self.index = index

    def candidate(
        self, key_text: str, key: Sequence[Any], cid: str, record: Mapping[str, Any], reference: bool = False
    ) -> None:
        event = {"key_text": key_text, "key": list(key), "cid": cid, "config": dict(record)}
        _emit(
            {"event": "candidate", "index": self.index, **event, **({"reference": True} if reference else {})}
        )

    def result(self, key_text: str, key: Sequence[Any], cid: str, result: Any, kept: bool = True) -> None:
        # The parent keeps every result kept here too: its book may be one this worker cannot
        # write. One held out of the book (``kept`` False, _tuner.tune_key) is for progress only.
        _emit(
            {
                "event": "result",
                "index": self.index,
                "key_text": key_text,
                "key": list(key),
                "cid": cid,
                "result": result.to_json(),
                "kept": kept,
            }
        )
        exit_if_gpu_broken(cid, result)


def _become_worker() -> None:
    global _inside
    _inside = True
    os.environ["TUNEBOOK_MODE"] = "tune"
    _end_with_parent()


def _end_with_parent() -> None:
    """Exit when the process that started this worker is gone (killed with SIGKILL, or a Ray
    actor whose node went away): an orphan would measure on, and write a book, for nobody."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        with reporting:
            os._exit(4)

    threading.Thread(target=watch, daemon=True, name="tunebook-parent-watch").start()


def worker_main(job_file: str) -> int:
    """``python -m tunebook._worker JOBFILE``: the jobs in JOBFILE (``-``: on stdin, as the
    supervisor sends them), each tuned in turn, its events on stdout."""
    _become_worker()
    spec = json.loads(sys.stdin.read() if job_file == "-" else Path(job_file).read_text())
    import tunebook
    from tunebook import _tuner

    for job in spec["jobs"]:
        index = job["index"]
        _emit({"event": "job", "index": index})
        try:
            tuner = locate(job["module"], job["attr"])
            grid, args, kwargs = rebuild_call(tuner, job)
            before = tunebook.stats()["benchmarked"]
            start = time.perf_counter()
            with _tuner.observed(_Reporter(index)):
                tuner[grid](*args, **kwargs)
            _sync()
            _emit(
                {
                    "event": "done",
                    "index": index,
                    "benchmarked": tunebook.stats()["benchmarked"] - before,
                    "seconds": time.perf_counter() - start,
                }
            )
        except Exception as exc:  # one bad job must not stop the others
            _emit(
                {
                    "event": "error",
                    "index": index,
                    "reason": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc(limit=5),
                }
            )
    return 0


def serve_main() -> int:
    """``python -m tunebook._worker --serve``: answer requests from stdin until it closes.

    First line out: ``{"event": "ready", "device": {...}}``, the platform this worker measures
    on (without the timer, which is the kernel's). Then one request per line in, its events
    out (see ``units.py``); a request that raises ends in an ``error`` event, and the worker
    takes the next one.
    """
    _become_worker()
    from .. import _compat, _settings
    from . import journal, units

    journal.fold(_settings.book_dir())  # what the worker before this one measured, into the book
    _emit({"event": "ready", "device": {**_compat.device_identity(), "triton": _compat.triton_version()}})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            units.handle(request, _emit)
        except Exception as exc:
            _emit(
                {
                    "event": "error",
                    "id": request.get("id"),
                    "reason": f"{type(exc).__name__}: {exc}",
                    "trace": traceback.format_exc(limit=5),
                }
            )
    return 0


def exit_if_gpu_broken(cid: str, result: Any) -> None:
    """After a failed config: if it left the CUDA context unusable (an illegal memory
    access or a device-side assert poisons it for every later launch), end this worker.
    The failure is already persisted with its real reason; the supervisor starts a fresh
    worker, which resumes without retrying the config."""
    if result.ok:
        return
    from .. import _compat

    broken = _compat.gpu_context_broken(RuntimeError(result.error or ""))
    if broken is not None:
        sys.stdout.flush()
        sys.stderr.write(f"tunebook worker: GPU context unusable after {cid}: {broken}\n")
        sys.stderr.flush()
        os._exit(3)


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:  # pragma: no cover
        pass
