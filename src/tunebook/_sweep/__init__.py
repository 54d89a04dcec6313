"""Sweeps: many keys tuned across every GPU of a Ray cluster (``tunebook tune --ray``).

* ``schedule.py`` — the queue: each key's search (plan, ask/tell in small units, confirm,
  decide) and the rules that keep it equal to tuning the key in one process;
* ``driver.py`` — Ray: one actor per GPU, units handed out as workers free up, lost
  actors replaced and their units handed out again, results persisted as they arrive;
* ``actor.py`` — the actor, a relay to an isolated worker process (``_worker/session.py``);
* ``jobs.py`` — the jobs, shared with ``tunebook tune``.

Ray is imported only when a sweep starts (``pip install 'tunebook[ray]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._autotuner import Autotuner
    from .driver import SweepProgress, SweepReport


def tune_on_ray(
    kernels: Autotuner | ModuleType | Sequence[Autotuner | ModuleType],
    keys: Sequence[Mapping[str, Any]] | None = None,
    *,
    address: str | None = None,
    gpus: int | None = None,
    resource: str = "GPU",
    unit_size: int = 8,
    timeout: float = 300.0,
    each_model: bool = False,
    gpu_model: str | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    on_progress: Callable[[SweepProgress], None] | None = None,
) -> SweepReport:
    """Tune keys of tunebook kernels on every GPU of a Ray cluster; what ``tunebook tune --ray`` does.

    With ``keys`` (dicts of key values, e.g. ``[{"M": 16, "N": 4096, "K": 4096}]``), those
    keys of the one kernel given, built by its ``inputs=`` factory; without, the recorded
    misses of each kernel (a module stands for all of its kernels). Kernels must be globals
    of modules every node can import.

    One Ray actor per GPU (``resource``, at most ``gpus``) measures through an isolated
    worker process: a config that crashes, hangs (``timeout`` seconds without progress) or
    poisons the GPU context is recorded as failed and the sweep goes on. Candidates go out
    in units of ``unit_size`` configs to whichever GPU is free; each key keeps its
    strategy and budget. Results are persisted in this process's book as they arrive, in
    the page of the platform they were measured on; running it again measures nothing
    twice. A cluster with several GPU models is refused unless ``each_model`` (every key on
    each model) or ``gpu_model`` (one of them). ``address``: a Ray address (default
    ``RAY_ADDRESS``, else a local cluster started for the sweep).

    Returns a :class:`~tunebook._sweep.driver.SweepReport` (per key: ``state``,
    ``measured``, ``chosen``, ``reason``, ``left_out``; ``unsaved``: results the book
    refused, held by this process only); raises :class:`tunebook.MissingDependency`
    without Ray (``pip install 'tunebook[ray]'``).
    """
    from .._autotuner import Autotuner
    from .._optional import require
    from .._worker.isolated import import_path
    from .driver import SweepOptions, run_sweep
    from .jobs import key_jobs, miss_jobs

    require("ray", feature="tuning on a Ray cluster", extra="ray")
    options = SweepOptions(
        address=address,
        gpus=gpus,
        resource=resource,
        unit_size=unit_size,
        timeout_s=timeout,
        each_model=each_model,
        gpu_model=gpu_model,
        runtime_env=runtime_env,
    )
    if isinstance(kernels, str | bytes):  # iterated, a "module:attr" string was 6 kernels of letters
        raise TypeError(
            f"tune_on_ray: kernels= takes tunebook kernels or modules, not the text {kernels!r}; import "
            "the kernel and pass it (tunebook tune takes 'module:attr' on the command line)"
        )
    items = [kernels] if isinstance(kernels, Autotuner | ModuleType) else list(kernels)
    tuners: list[Autotuner] = []
    for item in items:
        if isinstance(item, ModuleType):
            tuners += [obj for _, obj in sorted(vars(item).items()) if isinstance(obj, Autotuner)]
        elif isinstance(item, Autotuner):
            tuners.append(item)
        else:
            raise TypeError(
                f"tune_on_ray: kernels= takes tunebook kernels (@tunebook.autotune) or modules; found "
                f"{type(item).__name__} {item!r:.80}"
            )
    jobs: list[dict[str, Any]] = []
    if keys is not None:
        if isinstance(keys, Mapping) or not all(isinstance(key, Mapping) for key in keys):
            raise TypeError(
                "tune_on_ray: keys= takes a list of dicts of key values, e.g. [{'M': 16, 'N': 4096}]; "
                f"found {keys!r:.120}"
            )
        if len(tuners) != 1:
            raise ValueError(f"keys= tunes one kernel; found {len(tuners)} kernels")
        module, attr = import_path(tuners[0])
        texts = [",".join(f"{k}={v}" for k, v in key.items()) for key in keys]
        jobs = key_jobs(module, attr, tuners[0], list(zip(texts, keys)))
    else:
        for tuner in tuners:
            jobs += miss_jobs(*import_path(tuner), tuner)
    if not jobs:
        from .driver import SweepReport

        return SweepReport()
    return run_sweep(jobs, options, on_progress=on_progress)
