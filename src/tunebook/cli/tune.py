"""``tunebook tune``: tune recorded misses or declared keys offline, one worker per GPU.

    tunebook tune --misses MODULE [MODULE ...]        # every recorded miss of those kernels
    tunebook tune MODULE:KERNEL --keys M=16,N=4096,K=4096 [--keys ...]
    tunebook tune ... --ray [ADDRESS]                 # every GPU of a Ray cluster (_tune_ray.py)

Jobs are spread over one worker process per local GPU (``--workers`` to change), all of one
model (a host of several is refused: ``CUDA_VISIBLE_DEVICES`` picks one model's); each
worker tunes in ``tune`` mode and persists as it measures, so an interrupted run resumes
where it stopped when started again. Every candidate runs in a worker: a config that
crashes or hangs (``--timeout``) is recorded as failed with its reason, and the worker is
restarted.

It never reports success for work it lost: it refuses to start when the book cannot be
written, and when the book refuses results midway (workers write it themselves, and the
library's writes fail soft), the results the workers also sent here are written into the
book if it takes them now, else kept in a directory the error names (see ``_unsaved``),
and the exit status is 1. Ctrl-C keeps what was received the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .. import _compat, _settings
from .._autotuner import Autotuner
from .._book import Entry, Page, Result, now_iso
from .._book.unwritten import forget_refused
from .._calls import validate
from .._sweep.jobs import candidate_ids, key_jobs, miss_jobs
from .._tuner import doubted_reference_warning
from .._worker import DEFAULT_TIMEOUT_S, record_crash, run_jobs
from .._worker.isolated import worker_path
from ._common import err, os_error_text, out, output_fix, parse_assignments, write_problem
from ._modules import import_module, module_autotuners, resolve_kernel
from ._unsaved import Received, save_aside, save_to_book


def _looks_like_kernel(target: str) -> bool:
    """``pkg.mod:kernel`` or ``file.py:kernel`` (but not a Windows drive, ``C:\\...``)."""
    module, sep, attr = target.rpartition(":")
    return bool(sep) and len(module) > 1 and attr.isidentifier()


def _key_values(tuner: Autotuner, text: str) -> dict[str, Any]:
    """``--keys M=16,N=4096`` -> ``{"M": 16, "N": 4096}``: every name of the kernel's key
    exactly once, checked before anything is tuned."""
    parts = [part for part in text.split(",") if part.strip()]
    values = parse_assignments(tuple(parts), "--keys")
    names = [str(k) for k in tuner.keys]
    given = [part.partition("=")[0].strip() for part in parts]
    twice = sorted({name for name in given if given.count(name) > 1})
    unknown = sorted(set(values) - set(names))
    missing = [name for name in names if name not in values]
    if twice or unknown or missing:
        problems = [
            *([f"{', '.join(twice)} given twice"] if twice else []),
            *([f"{', '.join(unknown)} not in the kernel's key"] if unknown else []),
            *([f"{', '.join(missing)} missing"] if missing else []),
        ]
        raise click.BadParameter(
            f"{'; '.join(problems)} in {text!r}: the kernel's key is {', '.join(names)}; give each once, "
            f"e.g. --keys {','.join(f'{name}=...' for name in names)}",
            param_hint="--keys",
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
# Not required=True: `--ray mypkg.ops:matmul` hands the one target to --ray, and click refused
# the command before _ray_address could take it back; the check follows that.
@click.argument("targets", nargs=-1)
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
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Tune on every GPU of a Ray cluster: ADDRESS (host:port, ray://..., auto), else RAY_ADDRESS, "
    "else a local one started for the run. Needs tunebook[ray].",
)
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="--ray: use at most this many GPUs.")
@click.option(
    "--unit-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="--ray: configs per unit of work handed to a GPU.",
)
@click.option("--each-model", is_flag=True, help="--ray: on a cluster of several GPU models, tune on each.")
@click.option("--gpu-model", default=None, help="--ray: on a cluster of several GPU models, use this one.")
@click.option(
    "--ray-resource",
    default="GPU",
    show_default=True,
    help="--ray: the Ray resource one worker takes (a custom resource that stands for a GPU).",
)
def command(
    targets: tuple[str, ...],
    misses: bool,
    keys: tuple[str, ...],
    workers: int | None,
    timeout: float,
    dry_run: bool,
    ray_address: str | None,
    gpus: int | None,
    unit_size: int,
    each_model: bool,
    gpu_model: str | None,
    ray_resource: str,
) -> None:
    """Tune recorded misses (--misses MODULE ...) or declared keys (MODULE:KERNEL --keys ...) offline,
    on this machine's GPUs or (--ray) every GPU of a Ray cluster."""
    if ray_address is None and (gpus or each_model or gpu_model or unit_size != 8 or ray_resource != "GPU"):
        raise click.UsageError("--gpus, --unit-size, --each-model, --gpu-model and --ray-resource need --ray")
    if ray_address is not None:
        if workers is not None:
            raise click.UsageError(
                "--workers is for this machine's GPUs; with --ray, --gpus N limits the GPUs"
            )
        ray_address, targets = _ray_address(ray_address, targets)
        from ._tune_ray import check_ray

        check_ray()  # before importing the kernels: the missing extra is the first thing to fix
    _check_targets(targets, misses, keys)
    book = _settings.book_dir()
    problem = write_problem(book)  # before importing anything: results must have somewhere to go
    refusal = click.ClickException(
        f"cannot write the book at {book} ({problem}), so tuning results would be lost. "
        f"{output_fix(book, 'Point TUNEBOOK_DIR at a writable directory')}"
    )
    if problem is not None and not dry_run:
        raise refusal
    if ray_address is None:  # the keys are this platform's: a process without a GPU says so in one line
        _platform_here()
        _one_model_here()
    tuners: dict[tuple[str, str], Autotuner] = {}
    jobs = _miss_jobs(targets, tuners) if misses else _key_jobs(targets[0], keys, tuners)
    for job in jobs:
        if job["call"] is not None and validate(job["call"], "call") is not None:
            raise click.ClickException(f"the recorded call for {job['key_text']} is not replayable")

    if not jobs:
        nothing = "nothing to tune: no recorded misses without results, or judged under other check= settings"
        out().print(nothing if misses else "no keys given")
        return
    if ray_address is not None:
        from .._sweep.driver import SweepOptions
        from ._tune_ray import run_on_ray

        out().print(f"{'would tune' if dry_run else 'tuning'} {len(jobs)} key(s) on a Ray cluster")
        if dry_run:
            _list_jobs(jobs, problem, refusal)
            return
        options = SweepOptions(
            address=ray_address or None,
            gpus=gpus,
            resource=ray_resource,
            unit_size=unit_size,
            timeout_s=timeout,
            each_model=each_model,
            gpu_model=gpu_model,
        )
        run_on_ray(jobs, book, options)
        return
    devices = _compat.local_gpu_ids()
    n_workers = workers or max(1, len(devices))
    out().print(
        f"{'would tune' if dry_run else 'tuning'} {len(jobs)} key(s) with {n_workers} worker(s)"
        + (f" on GPU(s) {', '.join(devices)}" if devices else "")
    )
    if dry_run:
        _list_jobs(jobs, problem, refusal)
        return
    _tune(jobs, tuners, book, n_workers, devices, timeout)


def _list_jobs(jobs: list[dict[str, Any]], problem: str | None, refusal: click.ClickException) -> None:
    for job in jobs:
        out().print(escape(f"  {job['module']}:{job['attr']} {job['key_text']}"))
    if problem is not None:  # what the real run would stop on
        raise refusal


def _ray_address(value: str, targets: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """``--ray`` takes an optional ADDRESS, so ``--ray mypkg.ops:matmul`` would read the kernel as
    one: a value that is not an address (auto, local, ray://..., host:port) is a target."""
    host, sep, port = value.rpartition(":")
    if not value or value in ("auto", "local") or "://" in value or (sep and host and port.isdigit()):
        return value, targets
    return "", (value, *targets)


def _check_targets(targets: tuple[str, ...], misses: bool, keys: tuple[str, ...]) -> None:
    if not targets:
        raise click.UsageError(
            "Missing argument 'TARGETS...': give --misses MODULE ... or MODULE:KERNEL --keys NAME=VALUE,..."
        )
    if misses == bool(keys):
        raise click.UsageError("give either --misses MODULE ... or MODULE:KERNEL --keys NAME=VALUE,...")
    kernels = [t for t in targets if _looks_like_kernel(t)]
    if misses and kernels:
        raise click.UsageError(
            f"--misses takes modules (e.g. myapp.kernels), found {kernels[0]!r}: it tunes the recorded "
            "misses of every kernel of a module. To tune keys of one kernel: MODULE:KERNEL --keys "
            "NAME=VALUE,..."
        )
    if keys and len(targets) != 1:
        raise click.UsageError("--keys tunes one kernel: give exactly one MODULE:KERNEL")


def _platform_here() -> None:
    """Ask Triton for this process's device once, turning "no GPU driver" into one line."""
    from .._compat import device_identity

    try:
        device_identity()
    except RuntimeError as exc:  # Triton found no GPU driver
        raise click.ClickException(
            f"cannot tell this process's platform: {str(exc).rstrip('.')}. On a machine without a GPU, "
            "tune for Triton's interpreter with TRITON_INTERPRET=1, or tune on a GPU machine (--ray)."
        ) from None


def _one_model_here() -> None:
    """Refuse a host whose GPUs are of several models, before any work: the misses listed
    and the pages checked are one platform's, and a worker takes any key."""
    models = _compat.device_models()
    if len(set(models)) < 2:
        return
    ids = _compat.local_gpu_ids()
    groups: dict[tuple[Any, ...], list[str]] = {}
    for index, model in enumerate(models):
        groups.setdefault(model, []).append(ids[index] if index < len(ids) else str(index))
    names = [str(model[0]) for model in groups]

    def label(model: tuple[Any, ...]) -> str:  # the arch and SM count where a name is not enough
        name, arch, sm_count = model
        return str(name) if names.count(str(name)) == 1 else f"{name} (arch {arch}, {sm_count} SMs)"

    listing = "; ".join(f"{label(model)}: GPU {', '.join(gpus)}" for model, gpus in groups.items())
    first = ",".join(next(iter(groups.values())))
    raise click.ClickException(
        f"this host has GPUs of {len(groups)} models ({listing}). A timing on one model says nothing "
        "about another, and one run reads and fills the book pages of one model: tune on the GPUs of "
        "one model at a time by naming them in CUDA_VISIBLE_DEVICES, e.g. "
        f"CUDA_VISIBLE_DEVICES={first} tunebook tune ..., then the same for each other model."
    )


def _miss_jobs(targets: tuple[str, ...], tuners: dict[tuple[str, str], Autotuner]) -> list[dict[str, Any]]:
    jobs = []
    for target in targets:
        found = module_autotuners(target, "--misses names the modules that define the kernels")
        module_name = import_module(target).__name__  # imported already: the same module
        for attr, tuner in found.items():
            tuners[(module_name, attr)] = tuner
            jobs += miss_jobs(module_name, attr, tuner)
    return jobs


def _key_jobs(
    target: str, keys: tuple[str, ...], tuners: dict[tuple[str, str], Autotuner]
) -> list[dict[str, Any]]:
    attr, tuner = resolve_kernel(target)
    module_name = import_module(target.rpartition(":")[0]).__name__
    tuners[(module_name, attr)] = tuner
    try:
        return key_jobs(module_name, attr, tuner, [(text, _key_values(tuner, text)) for text in keys])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _tune(
    jobs: list[dict[str, Any]],
    tuners: dict[tuple[str, str], Autotuner],
    book: Path,
    workers: int,
    devices: list[str],
    timeout: float,
) -> None:
    """Run the jobs, then make sure every result reached the book (or a file named on stderr)."""
    target = [(job["module"], job["attr"]) for job in jobs]
    pages: dict[tuple[str, ...], Page] = {t: tuner.page() for t, tuner in tuners.items()}
    received = Received()

    def record_failure(event: dict[str, Any], reason: str) -> None:
        page = pages[target[event["index"]]]
        record_crash(page, event["key_text"], event["key"], event["cid"], event["config"], reason)
        received.add(
            event["index"],
            target[event["index"]],
            event,
            Result(event["config"], None, reason[:2000], now_iso()),
        )

    def on_result(event: dict[str, Any]) -> None:
        if not event.get("kept", True):  # held out of the book by the worker's tuning
            return
        received.add(
            event["index"], target[event["index"]], event, Result.from_json(event["result"], "result")
        )

    try:
        reports = _run_with_progress(jobs, record_failure, on_result, workers, devices, timeout)
    except KeyboardInterrupt:
        if lost := _keep(received, pages):
            _report_lost(lost, received, pages, book)
        raise
    lost = _keep(received, pages)
    _say_doubts(received, pages, tuners)
    failed = [r for r in reports.values() if r.status != "done"]
    tuned = [r for r in reports.values() if r.status == "done" and r.index not in lost]
    crashed = sum(len(r.crashed) for r in reports.values())
    out().print(
        f"done: {len(tuned)} of {len(reports)} key(s) tuned, "
        f"{sum(r.benchmarked for r in reports.values())} config(s) measured, "
        f"{crashed} config(s) recorded as crashed or hung"
    )
    for r in failed:
        job = jobs[r.index]
        what = f"{job['module']}:{job['attr']} {job['key_text']}"
        err().print(f"[red]failed[/red] {escape(what)}: {escape(r.reason)}")
    if lost:
        _report_lost(lost, received, pages, book)
    if failed or lost:
        raise SystemExit(1)


def _say_doubts(
    received: Received, pages: dict[tuple[str, ...], Page], tuners: dict[tuple[str, str], Autotuner]
) -> None:
    """The warning that a key's reference config may itself be wrong (check=), said in its
    worker, whose stderr nobody reads: said here, from the book and what the workers reported."""
    said: set[tuple[tuple[str, ...], str]] = set()  # bucketed jobs of one key: said once
    for keyed in received.by_job.values():
        if (keyed.target, keyed.key_text) in said:
            continue
        said.add((keyed.target, keyed.key_text))
        page, tuner = pages[keyed.target], tuners[(keyed.target[0], keyed.target[1])]
        page.refresh(keyed.key_text)
        known = page.get(keyed.key_text)
        results = {**(known.results if known is not None else {}), **keyed.results}
        ids = candidate_ids(tuner, known or Entry(key=tuple(keyed.key), results=results))
        text = doubted_reference_warning(results, ids, tuner.label, keyed.key)
        if text:
            err().print(f"[yellow]{escape(text)}[/yellow]")


def _keep(received: Received, pages: dict[tuple[str, ...], Page]) -> dict[int, Entry]:
    """Write what the book lacks into it if it takes writes now; return what it still lacks."""
    lost = received.missing(pages)
    if lost:
        save_to_book(lost, received, pages)
        lost = received.missing(pages)
    if not lost:  # the crashes this process recorded, that the book refused, are in it now
        forget_refused(pages.values())
    return lost


def _report_lost(
    lost: dict[int, Entry], received: Received, pages: dict[tuple[str, ...], Page], book: Path
) -> None:
    count = sum(len(entry.results) for entry in lost.values())
    why = write_problem(book) or "the book refused the write"
    try:
        kept = save_aside(lost, received, pages)
    except OSError as exc:
        raise click.ClickException(
            f"{count} result(s) of {len(lost)} key(s) could not be written to the book at {book} ({why}), "
            f"nor kept aside ({os_error_text(exc)}). Free some space or fix the permissions, then run "
            "tunebook tune again."
        ) from None
    forget_refused(pages.values())  # kept: the exit must not write them again, nor call them lost
    err().print(
        f"[red]not saved[/red]: {count} result(s) of {len(lost)} key(s) could not be written to the book at "
        f"{escape(str(book))} ({escape(why)}). They are kept in {escape(str(kept))}; once the book is "
        f"writable, run: tunebook merge {escape(str(kept))} -o {escape(str(book))}"
    )


def _run_with_progress(
    jobs: list[dict[str, Any]],
    record_failure: Callable[[dict[str, Any], str], None],
    on_result: Callable[[dict[str, Any]], None],
    workers: int,
    devices: list[str],
    timeout: float,
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]}"),
        TimeElapsedColumn(),
        console=err(),
        transient=False,
    ) as progress:
        # The bar counts keys tuned; keys that failed are counted beside it, never as progress.
        task = progress.add_task("keys tuned", total=len(jobs), failed="")
        finished: set[int] = set()

        def on_event(slot: int, event: dict[str, Any]) -> None:
            kind, index = event.get("event"), int(event.get("index", -1))
            if kind in ("done", "error") and index not in finished:
                finished.add(index)
                if kind == "done":
                    progress.advance(task)
                else:
                    failed = len(finished) - int(progress.tasks[0].completed)
                    progress.update(task, failed=f"{failed} failed")
            elif kind == "result" and "key_text" in event:
                on_result(event)
            elif kind == "candidate":
                job = jobs[index]
                where = f"worker {slot}: {job['attr']} {job['key_text'][:40]}"
                progress.update(task, description=f"keys tuned ({where})")
            elif kind == "crash":
                progress.console.print(
                    f"[yellow]worker {slot}[/yellow]: {escape(event['cid'])}: {escape(event['reason'])}"
                )
            elif kind == "restart":
                progress.console.print(f"[yellow]worker {slot} restarted[/yellow]: {escape(event['reason'])}")

        return run_jobs(
            jobs,
            record_failure,
            workers=workers,
            devices=devices or None,
            timeout_s=timeout,
            env={"PYTHONPATH": worker_path()},  # a path/to/file.py's folder, as this process imported it
            on_event=on_event,
        )
