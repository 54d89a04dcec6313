"""Tuning in worker processes, where a config that crashes or hangs takes down only the worker.

* ``supervisor.py`` — :func:`run_jobs`: starts workers, follows their events, records the
  candidate a dead or silent worker was measuring as failed, restarts the worker.
* ``child.py`` — the worker process itself (``python -m tunebook._worker -``, its jobs on stdin).
* ``isolated.py`` — :func:`tune_isolated`: one key of an ``isolate=True`` autotuner, tuned
  in a worker; :func:`record_crash`, the failure record the supervisor's callers write.
* ``session.py`` — :class:`~.session.WorkerSession`: one long-lived worker
  (``python -m tunebook._worker --serve``) measuring unit after unit of a sweep
  (``units.py``: plan a key, measure some of its configs, record a crash), restarted when a
  config takes it down; ``journal.py``: each such worker's results, kept before they are
  reported.
"""

from .child import inside_worker
from .isolated import record_crash, tune_isolated
from .supervisor import DEFAULT_TIMEOUT_S, JobReport, run_jobs

__all__ = ["DEFAULT_TIMEOUT_S", "JobReport", "inside_worker", "record_crash", "run_jobs", "tune_isolated"]
