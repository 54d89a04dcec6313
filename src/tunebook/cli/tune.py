"""``tunebook tune``: tune recorded misses or declared keys offline, one worker per GPU.

    tunebook tune --misses MODULE [MODULE ...]        # every recorded miss of those kernels
    tunebook tune MODULE:KERNEL --keys M=16,N=4096,K=4096 [--keys ...]

Jobs are spread over one worker process per local GPU (``--workers`` to change); each
worker tunes in ``tune`` mode and persists as it measures, so an interrupted run resumes
where it stopped when started again. Every candidate runs in a worker: a config that
crashes or hangs (``--timeout``) is recorded as failed with its reason, and the worker is
restarted.
"""

from __future__ import annotations

import os
from typing import Any

import click

from .._autotuner import Autotuner, record_crash
from .._calls import validate
from .._worker import DEFAULT_TIMEOUT_S, run_jobs
from ._common import err, out, parse_assignments
from ._modules import autotuners, import_module, resolve_kernel


def _gpu_devices() -> list[str]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return []
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [visible[i] if i < len(visible) else str(i) for i in range(count)]


def _pending(tuner: Autotuner) -> list[tuple[str, Any]]:
    """Recorded misses of this kernel on this platform that no tuning has finished."""
    page = tuner.page()
    page.refresh(force=True)
    return [
        (key_text, entry)
        for key_text, entry in sorted(page.entries.items())
        if entry.misses and entry.call is not None and not entry.chosen
    ]


def _looks_like_kernel(target: str) -> bool:
    """``pkg.mod:kernel`` or ``file.py:kernel`` (but not a Windows drive, ``C:\\...``)."""
    module, sep, attr = target.rpartition(":")
    return bool(sep) and len(module) > 1 and attr.isidentifier()


def _key_values(tuner: Autotuner, text: str) -> dict[str, Any]:
    values = parse_assignments((text,), "--keys")
    names = [str(k) for k in tuner.keys]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)} not in the kernel's key ({', '.join(names)})", param_hint="--keys"
        )
    parsed: dict[str, Any] = {}
    for name, raw in values.items():
        try:
            parsed[name] = int(raw)
        except ValueError:
            try:
                parsed[name] = float(raw)
            except ValueError:
                parsed[name] = raw
    return parsed


@click.command("tune")
@click.argument("targets", nargs=-1, required=True)
@click.option("--misses", is_flag=True, help="Tune every recorded miss of the kernels in these MODULEs.")
@click.option(
    "--keys", "keys", multiple=True, help="With MODULE:KERNEL, a key to tune: NAME=VALUE,... (repeatable)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes, at least 1 (default: one per local GPU, else 1).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds without progress before a candidate counts as hung.",
)
@click.option("--dry-run", is_flag=True, help="List the jobs, tune nothing.")
def command(
    targets: tuple[str, ...],
    misses: bool,
    keys: tuple[str, ...],
    workers: int | None,
    timeout: float,
    dry_run: bool,
) -> None:
    """Tune recorded misses (--misses MODULE ...) or declared keys (MODULE:KERNEL --keys ...) offline."""
    jobs: list[dict[str, Any]] = []
    tuners: dict[tuple[str, str], Autotuner] = {}
    if misses == bool(keys):
        raise click.UsageError("give either --misses MODULE ... or MODULE:KERNEL --keys NAME=VALUE,...")
    if misses:
        kernels = [t for t in targets if _looks_like_kernel(t)]
        if kernels:
            raise click.UsageError(
                f"--misses takes modules (e.g. myapp.kernels), found {kernels[0]!r}: it tunes the recorded "
                "misses of every kernel of a module. To tune keys of one kernel: MODULE:KERNEL --keys "
                "NAME=VALUE,..."
            )
        for target in targets:
            module = import_module(target)
            for attr, tuner in autotuners(module).items():
                tuners[(module.__name__, attr)] = tuner
                for key_text, entry in _pending(tuner):
                    jobs.append(
                        {
                            "module": module.__name__,
                            "attr": attr,
                            "key_text": key_text,
                            "call": entry.call,
                            "key": dict(zip(map(str, tuner.keys), entry.key)),
                        }
                    )
    else:
        if len(targets) != 1:
            raise click.UsageError("--keys tunes one kernel: give exactly one MODULE:KERNEL")
        attr, tuner = resolve_kernel(targets[0])
        module_name = targets[0].rpartition(":")[0]
        module_name = import_module(module_name).__name__
        tuners[(module_name, attr)] = tuner
        if tuner.inputs is None:
            raise click.ClickException(
                f"{targets[0]} has no inputs= factory, so tunebook cannot build its arguments from key "
                "values; "
                "add inputs=... to its tunebook.autotune(...) (see docs/guide.md), or tune recorded misses "
                "with --misses"
            )
        for text in keys:
            values = _key_values(tuner, text)
            jobs.append({"module": module_name, "attr": attr, "key_text": text, "call": None, "key": values})
    for job in jobs:
        if job["call"] is not None and validate(job["call"], "call") is not None:
            raise click.ClickException(f"the recorded call for {job['key_text']} is not replayable")

    if not jobs:
        out().print("nothing to tune: no recorded misses without results" if misses else "no keys given")
        return
    devices = _gpu_devices()
    n_workers = workers or max(1, len(devices))
    out().print(
        f"tuning {len(jobs)} key(s) with {n_workers} worker(s)"
        + (f" on GPU(s) {', '.join(devices)}" if devices else "")
    )
    if dry_run:
        for job in jobs:
            out().print(f"  {job['module']}:{job['attr']} {job['key_text']}")
        return

    def record_failure(event: dict[str, Any], reason: str) -> None:
        job = jobs[event["index"]]
        page = tuners[(job["module"], job["attr"])].page()
        record_crash(page, event["key_text"], event["key"], event["cid"], event["config"], reason)

    reports = _run_with_progress(jobs, record_failure, n_workers, devices, timeout)
    failed = [r for r in reports.values() if r.status != "done"]
    crashed = sum(len(r.crashed) for r in reports.values())
    out().print(
        f"done: {len(reports) - len(failed)} of {len(reports)} key(s) tuned, "
        f"{sum(r.benchmarked for r in reports.values())} config(s) measured, "
        f"{crashed} config(s) recorded as crashed or hung"
    )
    for r in failed:
        job = jobs[r.index]
        err().print(f"[red]failed[/red] {job['module']}:{job['attr']} {job['key_text']}: {r.reason}")
    if failed:
        raise SystemExit(1)


def _run_with_progress(
    jobs: list[dict[str, Any]], record_failure: Any, workers: int, devices: list[str], timeout: float
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err(),
        transient=False,
    ) as progress:
        task = progress.add_task("keys tuned", total=len(jobs))
        seen: set[int] = set()

        def on_event(slot: int, event: dict[str, Any]) -> None:
            kind, index = event.get("event"), event.get("index")
            if kind in ("done", "error") and index not in seen:
                seen.add(index)
                progress.advance(task)
            elif kind == "candidate":
                progress.update(
                    task, description=f"worker {slot}: {jobs[index]['attr']} {jobs[index]['key_text'][:40]}"
                )
            elif kind == "crash":
                progress.console.print(f"[yellow]worker {slot}[/yellow]: {event['cid']}: {event['reason']}")
            elif kind == "restart":
                progress.console.print(f"[yellow]worker {slot} restarted[/yellow]: {event['reason']}")

        return run_jobs(
            jobs,
            record_failure,
            workers=workers,
            devices=devices or None,
            timeout_s=timeout,
            on_event=on_event,
        )
