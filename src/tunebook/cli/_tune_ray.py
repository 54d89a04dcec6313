"""``tunebook tune --ray``: the same jobs over every GPU of a Ray cluster (``tunebook._sweep``).

Progress shows keys, configs, GPUs busy and an ETA. As without ``--ray``, it never reports
success for work it lost: every result the driver persisted is checked against the book
at the end (``_unsaved``), what the book refused is written again or kept aside, and the
exit status is 1; Ctrl-C keeps what was received the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .._book import Page, Result
from .._errors import MissingDependency
from .._sweep.driver import KeyReport, SweepError, SweepOptions, SweepProgress, SweepReport, run_sweep
from ._common import err, out
from ._unsaved import Received


def check_ray() -> None:
    """Refuse now, with the install line, when Ray is not installed."""
    from .._optional import check

    try:
        check("ray", feature="tune --ray", extra="ray")
    except MissingDependency as exc:
        raise click.ClickException(str(exc)) from None


def run_on_ray(jobs: list[dict[str, Any]], book: Path, options: SweepOptions) -> None:
    from .tune import _keep, _report_lost

    received = Received()
    pages: dict[tuple[str, ...], Page] = {}
    numbers: dict[tuple[str, ...], int] = {}

    def on_result(job: dict[str, Any], page: Page, key_text: str, cid: str, key: Any, result: Result) -> None:
        target = (str(job["module"]), str(job["attr"]), page.file_name)
        pages[target] = page
        index = numbers.setdefault((*target, key_text), len(numbers))
        received.add(index, target, {"key_text": key_text, "key": list(key), "cid": cid}, result)

    try:
        report = _with_progress(jobs, options, on_result)
    except KeyboardInterrupt:
        if lost := _keep(received, pages):
            _report_lost(lost, received, pages, book)
        raise
    except (SweepError, MissingDependency) as exc:
        raise click.ClickException(str(exc)) from None
    lost = _keep(received, pages)
    _summary(jobs, report)
    if lost:
        _report_lost(lost, received, pages, book)
    if report.failed or lost:
        raise SystemExit(1)


def _summary(jobs: list[dict[str, Any]], report: SweepReport) -> None:
    gpus = ", ".join(f"{n} x {g}" for g, n in report.groups.items())
    tuned = [k for k in report.keys if k.state == "done"]
    out().print(
        f"done: {len(tuned)} of {len(report.keys)} key(s) tuned on {gpus} in {report.seconds:.1f} s, "
        f"{report.measured} config(s) measured, {len(report.crashed)} config(s) recorded as crashed or hung"
    )

    def what(key: KeyReport) -> str:
        job = jobs[key.job]
        return escape(f"{job['module']}:{job['attr']} {key.key_text}")

    for key in report.failed:
        err().print(f"[red]failed[/red] {what(key)}: {escape(key.reason)}")
    for key in report.keys:
        if key.left_out:
            err().print(
                f"[yellow]left out[/yellow] {key.left_out} config(s) of {what(key)}: each lost its GPU "
                "worker 3 times (the cluster's doing, not the config's: nothing was recorded for them); "
                "run the sweep again to measure them"
            )


def _with_progress(jobs: list[dict[str, Any]], options: SweepOptions, on_result: Any) -> SweepReport:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err(),
        transient=False,
    ) as progress:
        task = progress.add_task("sweep", total=None, status="starting the GPU workers")

        def on_progress(p: SweepProgress) -> None:
            total = p.configs_measured + p.configs_left if p.configs_left is not None else None
            progress.update(task, completed=p.configs_measured, total=total, status=describe(p))

        return run_sweep(
            jobs,
            options,
            on_progress=on_progress,
            on_result=on_result,
            on_event=lambda text: progress.console.print(f"[yellow]{escape(text)}[/yellow]"),
            keeps_unsaved=True,  # run_on_ray keeps them aside (or writes them) and says so
        )


def describe(p: SweepProgress) -> str:
    """One line of progress.

    >>> describe(SweepProgress(3, 1, 20, 120, 880, 2, 2, 95.0, 1))
    'configs 120 of ~1000 | keys 3 of 20 (1 failed) | GPUs 2 of 2 busy | 1 crashed | ETA 1:35'
    """
    configs = f"configs {p.configs_measured}" + (
        f" of ~{p.configs_measured + p.configs_left}" if p.configs_left is not None else ""
    )
    keys = f"keys {p.keys_done} of {p.keys_total}" + (f" ({p.keys_failed} failed)" if p.keys_failed else "")
    parts = [configs, keys, f"GPUs {p.gpus_busy} of {p.gpus} busy"]
    if p.crashed:
        parts.append(f"{p.crashed} crashed")
    if p.eta_s is not None:
        minutes, seconds = divmod(round(p.eta_s), 60)
        parts.append(f"ETA {minutes}:{seconds:02d}")
    return " | ".join(parts)
