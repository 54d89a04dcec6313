"""The one door to torch.distributed: which group a kernel tunes in, and that group's store.

Ranks are coordinated through the process group's key-value store (the TCPStore that
``init_process_group`` made, or the FileStore or HashStore it was given), never through
collectives: a collective that only some ranks reach hangs the job, while every wait on the
store here has a deadline. It works alike under NCCL and gloo, and needs nothing beyond
torch.distributed. torch is imported only when a kernel has ``group=`` or
``TUNEBOOK_DISTRIBUTED=1`` is set.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import _settings, _stats
from ._errors import ConfigurationError
from ._options import WORLD, is_outsider
from ._warnings import warn_once

# Where a group's time goes, one DEBUG record per wait and per part measured, each carrying
# ``record.tunebook_group`` (a dict: ``event``, ``seconds`` and details). Silent unless a
# handler asks for DEBUG: ``benchmarks/distributed.py`` collects them into its split.
trace_log = logging.getLogger("tunebook.group")

POLL_S = 0.05  # the longest pause between two looks at the store in a wait's first 0.5 s


@dataclass(frozen=True)
class Team:
    """This process's place in the group a miss is resolved in."""

    rank: int  # in the group
    world: int  # ranks in the group
    store: Any  # a torch.distributed.Store shared by the group's ranks


def team(group: Any, label: str = "kernel") -> Team | None:
    """The group a miss is resolved in, or None to tune alone.

    ``group`` is the kernel's ``group=`` (a ProcessGroup, or "world": the default group as it
    is now); without it, the default group when ``TUNEBOOK_DISTRIBUTED=1`` and
    torch.distributed is initialized. A group of one rank is tuning alone.
    """
    if group is None and not _settings.distributed():
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ConfigurationError(
                f"tunebook.autotune(group=...) of {label}: torch.distributed is not initialized in this "
                "process; call torch.distributed.init_process_group(...) before the kernel's first call"
            )
        return None  # TUNEBOOK_DISTRIBUTED=1 in a process that is not part of a job
    if is_outsider(group):
        _outside(label, dist.get_rank())
        return None
    pg = dist.group.WORLD if group is None or group == WORLD else group
    try:
        world = dist.get_world_size(pg)
        rank = dist.get_rank(pg)
        store = _store_of(pg) if world > 1 else None
    except (ValueError, RuntimeError, KeyError) as exc:  # a group of a process group since destroyed
        raise ConfigurationError(
            f"tunebook.autotune(group=...) of {label}: torch.distributed no longer knows this group "
            f"({type(exc).__name__}: {exc}); a group made before destroy_process_group() cannot be used "
            "after it. Pass group='world' (the default group, looked up at each new key), or decorate "
            "the kernel again with the new group"
        ) from exc
    if world < 0 or rank < 0:  # torch's answer to a rank outside the group
        _outside(label, dist.get_rank())
        return None
    if world <= 1:
        return None
    return Team(rank, world, store)


def _outside(label: str, rank: int) -> None:
    warn_once(
        f"group-outsider:{label}",
        "tunebook: %s: this rank (%d of the job) is not a member of the kernel's group=, so it tunes "
        "its keys alone (said once)",
        label,
        rank,
    )


def alone_by_mistake(label: str) -> None:
    """Say once that a kernel given ``group=None`` runs in a job of several ranks: most often
    ``group=dist.group.WORLD`` written where the kernel is decorated, before
    ``init_process_group``, where it is None; the ranks then tune alone, and may launch
    different configs."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) or _settings.distributed():
        return
    world = dist.get_world_size()
    if world > 1:
        warn_once(
            f"group-none:{label}",
            "tunebook: %s was given group=None, so each of this job's %d ranks tunes its keys alone and "
            "they may launch different configs. dist.group.WORLD is None until init_process_group(): "
            "where the kernel is decorated before it, pass group='world' (said once)",
            label,
            world,
        )


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the group's store failing (torch's ``DistError``: its host, the
    rank that created it, has gone, or the network between), not the tuning."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch before 2.2
        return False
    return isinstance(exc, DistError)


def _store_of(pg: Any) -> Any:
    # torch keeps each group's store in a private table; both names have existed since torch 2.0.
    from torch.distributed import distributed_c10d as c10d

    if pg is c10d.GroupMember.WORLD or pg is None:
        return c10d._get_default_store()
    return c10d._get_process_group_store(pg)


def wait(store: Any, keys: list[str], seconds: float, what: str = "wait", **details: Any) -> bool:
    """Whether every key exists within ``seconds`` (never longer). The time is counted as
    waiting for the group (``tunebook.stats()["group_wait_seconds"]``) and traced as ``what``."""
    begun = time.perf_counter()
    deadline = begun + max(seconds, 0.001)
    pause = 0.001
    try:
        # Polled, never ``store.wait``: a TCPStore client serves one request at a time, and a
        # blocking wait held it for up to WAIT_S, stalling every other thread's store use in
        # this process (a second kernel's leader among them: two ranks, each leading one
        # kernel and following the other, waited on each other for WAIT_S).
        while not store.check(keys):
            if time.perf_counter() >= deadline:
                return False
            time.sleep(min(pause, max(deadline - time.perf_counter(), 0.0)))
            # 1 ms doubling to POLL_S; a long wait (a leader's search) looks less often, up to
            # once a second: a thousand ranks polling a TCPStore 20 times a second load it.
            waited = time.perf_counter() - begun
            pause = min(pause * 2, max(POLL_S, min(1.0, waited / 10)))
    except Exception:  # the store failing reads as a timeout, as a failed blocking wait did
        return False
    finally:
        waited_for(what, time.perf_counter() - begun, **details)
    return True


def waited_for(what: str, seconds: float, **details: Any) -> None:
    """Count ``seconds`` of waiting for the group, and trace it as ``what``."""
    _stats.add("group_wait_seconds", seconds)
    trace(what, seconds, **details)


def trace(event: str, seconds: float, **details: Any) -> None:
    """One DEBUG record of the group's time (see ``trace_log``); nearly free when nobody listens.

    >>> import logging
    >>> seen = []
    >>> class Keep(logging.Handler):
    ...     def emit(self, record): seen.append(record.tunebook_group)
    >>> trace_log.addHandler(Keep()); trace_log.setLevel(logging.DEBUG)
    >>> trace("gather", 0.25, rank=2)
    >>> seen
    [{'event': 'gather', 'seconds': 0.25, 'rank': 2}]
    >>> trace_log.handlers.clear(); trace_log.setLevel(logging.NOTSET)
    """
    if trace_log.isEnabledFor(logging.DEBUG):
        fields = {"event": event, "seconds": round(seconds, 6), **details}
        trace_log.debug("%s: %.3f s %s", event, seconds, details, extra={"tunebook_group": fields})
