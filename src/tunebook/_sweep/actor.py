"""One GPU of a sweep: the Ray actor, and what it forwards to the isolated worker it runs.

The driver makes one actor per GPU (``num_gpus=1``, or one unit of a custom resource), so
Ray sets ``CUDA_VISIBLE_DEVICES`` for it and its worker process inherits it. The actor
itself never imports torch or touches the GPU: it only relays units to a
:class:`~tunebook._worker.session.WorkerSession`, so a config that crashes, hangs or
poisons the CUDA context costs the worker process (restarted, the config recorded as
failed), never the actor. An actor lost with its node costs the units it held; the driver
hands them out again.

This module does not import Ray: the driver wraps :class:`SweepActor` with ``ray.remote``,
and Ray finds the class by its module on every node (tunebook must be installed there).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._worker.session import WorkerFailed, WorkerSession

# Environment variables holding paths: meaningful on the driver's node only.
PATH_VARIABLES = frozenset(
    {"TUNEBOOK_DIR", "TUNEBOOK_PATH", "PYTHONPATH", "TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR"}
)


def forwarded_environment(environ: Mapping[str, str], cwd: str) -> dict[str, str]:
    """The driver's settings its workers need: every ``TUNEBOOK_*`` and ``TRITON_*`` variable
    and ``PYTHONPATH`` (with the driver's directory, where kernel modules are often found).

    >>> sorted(forwarded_environment({"TUNEBOOK_DIR": "/b", "HOME": "/root"}, "/src"))
    ['PYTHONPATH', 'TUNEBOOK_DIR']
    """
    env = {k: v for k, v in environ.items() if k.startswith(("TUNEBOOK_", "TRITON_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (environ.get("PYTHONPATH", ""), cwd) if p)
    return env


class SweepActor:
    """Measures units on one GPU through an isolated worker process (see the module docstring).

    ``env`` is the driver's environment (:func:`forwarded_environment`); its path variables
    apply only where the actor shares the driver's node, whose files they name.
    """

    def __init__(self, env: Mapping[str, str], driver_node: str, timeout_s: float) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        here = self.node == driver_node
        mine = {k: v for k, v in env.items() if here or k not in PATH_VARIABLES}
        self.session = WorkerSession(mine, timeout_s)

    def ready(self) -> dict[str, Any]:
        """Start the worker: its device (the platform it measures on), node and host."""
        return {
            "device": self.session.start(),
            "node": self.node,
            "host": socket.gethostname(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }

    def plan(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """``{"plan": ...}`` (``_worker/units.py``), or ``{"error": reason}``."""
        try:
            return {"plan": self.session.plan(job)}
        except WorkerFailed as exc:
            return {"error": str(exc)}

    def measure(
        self, job: Mapping[str, Any], cids: Sequence[str], full: bool, ok_known: bool
    ) -> dict[str, Any]:
        """The unit's results (``session.Measured`` as a dict) and its wall time."""
        start = time.perf_counter()
        try:
            out = self.session.measure(job, cids, full=full, ok_known=ok_known)
        except WorkerFailed as exc:
            return {"results": {}, "crashed": [], "error": str(exc), "seconds": 0.0}
        return {
            "results": out.results,
            "crashed": out.crashed,
            "error": out.error,
            "restarts": out.restarts,
            "seconds": time.perf_counter() - start,
        }

    def close(self) -> None:
        self.session.close()
