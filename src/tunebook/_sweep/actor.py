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

# Variables each node sets for itself (Ray sets the GPU an actor may use, and its threads).
NODE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def is_path_variable(name: str) -> bool:
    """tunebook's and Triton's variables that hold paths (``TUNEBOOK_DIR``, ``TUNEBOOK_PATH``,
    ``TRITON_CACHE_DIR``, ``TRITON_PTXAS_PATH``, ``TRITON_HOME``...): meaningful on the
    driver's node only."""
    return name.startswith(("TUNEBOOK_", "TRITON_")) and name.endswith(("_DIR", "_PATH", "_HOME"))


def forwarded_environment(
    environ: Mapping[str, str], cwd: str, program_paths: Sequence[str] = ()
) -> dict[str, str]:
    """The driver's environment as its workers get it: all of it, but for what each node sets
    itself (``NODE_VARIABLES``, ``RAY_*``), with the driver's directory on ``PYTHONPATH``
    (where kernel modules are often found), after ``program_paths`` (folders the driver put
    on its ``sys.path`` itself: ``isolated.program_paths``). Paths (on ``PYTHONPATH``, in
    path variables) are made absolute from the driver's directory, ``~`` expanded: a worker
    runs in the cluster's directory (a ``~/book`` became ``./~/book`` there). :func:`for_node`
    narrows it for other nodes.

    >>> env = forwarded_environment({"TUNEBOOK_DIR": "b", "CUDA_VISIBLE_DEVICES": "3"}, "/src")
    >>> sorted(env), env["PYTHONPATH"], env["TUNEBOOK_DIR"]
    (['PYTHONPATH', 'TUNEBOOK_DIR'], '/src', '/src/b')
    """

    def absolute(value: str) -> str:
        return os.pathsep.join(
            os.path.join(cwd, os.path.expanduser(p)) if p else p for p in value.split(os.pathsep)
        )

    env = {k: v for k, v in environ.items() if k not in NODE_VARIABLES and not k.startswith("RAY_")}
    for name in [k for k in env if is_path_variable(k)]:
        env[name] = absolute(env[name])
    path = [absolute(p) for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*path, *program_paths, cwd]))
    return env


def for_node(env: Mapping[str, str], same_node: bool) -> dict[str, str]:
    """On the driver's node, the whole forwarded environment (as ``tunebook tune``'s workers
    inherit it); on another, only tunebook's and Triton's settings that are not paths.

    >>> for_node({"TUNEBOOK_DIR": "/b", "TUNEBOOK_REDIS_URL": "redis://h", "HOME": "/root"}, False)
    {'TUNEBOOK_REDIS_URL': 'redis://h'}
    """
    if same_node:
        return dict(env)
    return {
        k: v for k, v in env.items() if k.startswith(("TUNEBOOK_", "TRITON_")) and not is_path_variable(k)
    }


class SweepActor:
    """Measures units on one GPU through an isolated worker process (see the module docstring).

    ``env`` is the driver's environment (:func:`forwarded_environment`), of which an actor on
    another node takes only tunebook's and Triton's settings (:func:`for_node`).
    """

    def __init__(self, env: Mapping[str, str], driver_node: str, timeout_s: float) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.session = WorkerSession(for_node(env, self.node == driver_node), timeout_s)

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
