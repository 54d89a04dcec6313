"""``isolate=True``: one key of an autotuner, tuned in a worker process.

A config that crashes (illegal memory access, device-side assert) or hangs takes down
only the worker; it is recorded as failed with its reason, the worker is restarted, and
this process and its CUDA context are never touched. The worker rebuilds the call from
its description (or the kernel's ``inputs=``), so the kernel must be a global of an
importable module; the worker imports it along this process's ``sys.path`` (a program that
put its kernels' folder on ``sys.path`` itself, or one run from another directory, is
understood as it is here).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import _calls, _compat, _warnings
from .._book import Entry, Page, Result, now_iso
from .._call import Call
from .._errors import BookFormatError, ConfigurationError, TuningFailed
from .._failures import is_wrong_result
from .._jsonio import stored_key
from .._policy import effective_budget
from .._progress import Progress
from .._tuner import Outcome, common_reasons, say_doubted_reference, wrong_results_fix
from .supervisor import run_jobs

if TYPE_CHECKING:
    from .._autotuner import Autotuner


def record_crash(
    page: Page, key_text: str, key: Sequence[Any], cid: str, record: Mapping[str, Any], reason: str
) -> None:
    """Persist that config ``cid`` took its worker down for this key (never retried)."""
    result = Result(dict(record), None, reason[:2000], now_iso())
    page.record(key_text, Entry(key=stored_key(key), results={cid: result}, updated_at=now_iso()))


def import_path(tuner: Autotuner) -> tuple[str, str]:
    """(module, attribute) under which a worker process can import ``tuner``."""
    base_module = getattr(tuner.base_fn, "__module__", None)
    for module_name in dict.fromkeys(m for m in (tuner.defined_in, base_module) if m and m != "__main__"):
        module = sys.modules.get(module_name)
        for attr, obj in list(vars(module).items()) if module is not None else ():
            # Follow .fn only through Triton's kernel wrappers (heuristics over us).
            inner = obj
            while isinstance(inner, _compat.KernelInterface) and inner is not tuner:
                inner = getattr(inner, "fn", None)
            if inner is tuner:
                return module_name, attr
    raise ConfigurationError(
        f"tunebook.autotune(isolate=True): {tuner.base_fn.__name__} must be a global of an importable "
        f"module for a worker process to load it (it was defined in {tuner.defined_in or '__main__'!r}); "
        "move the kernel into a module, or tune without isolate=True"
    )


def tune_isolated(
    tuner: Autotuner, call: Call, key: Sequence[Any], key_text: str, candidates: Mapping[str, Any], page: Page
) -> Outcome:
    """Tune one key in a worker process; ``candidates`` maps config ids to Configs."""
    module, attr = import_path(tuner)
    grids = _calls.evaluate_grids(call.grid, call.nargs, call.kwargs, candidates)
    job = {
        "module": module,
        "attr": attr,
        "key_text": key_text,
        "call": _calls.describe_call(call.args, call.kwargs, grids),
        "key": dict(zip([str(k) for k in tuner.keys], key)),
    }
    start = time.perf_counter()
    results: dict[str, Result] = {}  # to record here
    seen: dict[str, Result] = {}  # every result the worker measured
    # The worker's own progress goes to a pipe nobody shows: this process shows it from the
    # worker's results, as an in-process search would (the cap is the search's, as there).
    progress = Progress(tuner.label, key)
    cap = effective_budget(tuner.options.budget, len(candidates)).max_configs
    total = len(candidates) if cap is None else min(cap, len(candidates))

    def best_ms() -> float:
        return min((r.median for r in results.values() if r.ok), default=math.inf)

    def collect(slot: int, event: dict[str, Any]) -> None:
        if event.get("event") == "result" and event.get("key_text") == key_text:
            with contextlib.suppress(BookFormatError, KeyError):
                result = Result.from_json(event["result"], "worker result")
                seen[event["cid"]] = result
                if event.get("kept", True):  # else held out of the book by the worker's tuning
                    results[event["cid"]] = result
                progress.update(len(seen), max(total, len(seen)), best_ms(), "in a worker process")

    reports = run_jobs(
        [job],
        lambda event, reason: record_crash(
            page, event["key_text"], event["key"], event["cid"], event["config"], reason
        ),
        timeout_s=tuner.options.isolate_timeout,
        devices=_compat.current_device_ids(),
        env={"PYTHONPATH": worker_path()},
        on_event=collect,
    )
    report = reports[0]
    ended = "in a worker process" if report.status == "done" else "its worker failed"
    progress.close(len(seen), max(total, len(seen)), best_ms(), ended)
    if report.status == "error" and not report.crashed and not seen:
        raise TuningFailed(
            f"tunebook: isolated tuning of {tuner.label} key {list(key)}: its worker process "
            f"failed before measuring any config, and nothing was recorded: {report.reason}"
        )
    page.refresh(key_text)
    # The worker's results, also when it could not write them (a read-only book): kept
    # in this process's page, written if this process can.
    if results:
        page.record(key_text, Entry(key=stored_key(key), results=results, updated_at=now_iso()))
    entry = page.get(key_text)
    # What the worker warned of went to its stderr, which nobody reads: said here, from its results.
    ours = {cid: r for cid, r in {**(entry.results if entry else {}), **seen}.items() if cid in candidates}
    say_doubted_reference(ours, list(candidates), tuner.label, key, f"{page.file_name}:{key_text}")
    benchmarked = max(report.benchmarked, len(seen))  # a restarted worker's "done" counts its own
    said = ""
    if entry is None or entry.best(list(candidates)) is None:
        if report.status != "done":
            raise TuningFailed(
                f"tunebook: isolated tuning of {tuner.label} key {list(key)} found no config "
                f"that runs: {report.reason or 'every config failed'}; `tunebook show` lists each "
                "config's reason"
            )
        # The worker tuned to the end and none ran (it said so, and raised an error that is the
        # call's): as in this process, the first config is launched in their place (_tuner.none_ran).
        failed = list(ours.values())
        wrong = sum(1 for r in failed if is_wrong_result(r))
        said = (
            f"tunebook: {tuner.label} key {list(key)}: none of the {len(failed)} configs measured in a "
            f"worker process ran ({common_reasons(failed)}). "
            # Wrong results under check= ran: their fix is the check's, not the device's.
            + (f"{wrong_results_fix(wrong, ours)}. " if wrong else "")
            + "Those that gave no valid timing (NaN or inf from the timer) or raised an error that "
            "may be the call's are not recorded, so the next process that tunes the key measures "
            f"them again; {'the rest' if wrong else 'the others'} cannot run here. The first config is "
            "launched in their place"
        )
        _warnings.warn_once(f"none-ran:{page.file_name}:{key_text}", "%s", said)
        entry = entry or Entry(key=stored_key(key))
    return Outcome(entry, benchmarked, len(report.crashed), time.perf_counter() - start, none_ran=said)


def _sys_path() -> list[str]:
    """This process's ``sys.path``, once each ('' is the directory it runs in)."""
    return list(dict.fromkeys(p or os.getcwd() for p in sys.path if isinstance(p, str)))


def worker_path() -> str:
    """This process's ``sys.path`` as a worker's PYTHONPATH."""
    return os.pathsep.join(_sys_path())


def program_paths() -> list[str]:
    """The folders on ``sys.path`` that Python's environment does not put there (a program's
    own ``sys.path.insert``, the folder of a file ``tunebook tune path/to/file.py:kernel``
    imports): for a worker of another Python environment (a Ray actor's), which must find
    the program's modules but not this environment's packages."""
    prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out = []
    for path in _sys_path():
        real = os.path.realpath(path) + os.sep
        parts = set(real.split(os.sep))
        if real.startswith(tuple(prefixes)) or parts & {"site-packages", "dist-packages"}:
            continue
        out.append(path)
    return out
