"""What a forked child must not inherit as it is: locks and the miss writer's queue.

``os.fork()`` copies a process with only the thread that forked. A lock another thread held
at that moment (an autotuner's, held for a whole tuning) stays held in the child for ever,
since its holder does not exist there, and a queue's unfinished work waits for a writer
thread the child never runs. A pre-fork server (gunicorn, ``multiprocessing``'s "fork" start
method) that forked while a warm-up thread was tuning got workers that hung at their first
new key of that kernel, and a child that exited waited 5 s for the parent's queued misses
(and then wrote them again as its own). Each module registers here what a child renews.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any


def renew_in_child(renew: Callable[[], None]) -> None:
    """Run ``renew`` in every child that ``os.fork()`` makes from now on (none where the
    platform has no fork: Windows)."""
    register = getattr(os, "register_at_fork", None)
    if register is not None:
        register(after_in_child=renew)


def renew_lock(namespace: dict[str, Any], name: str, make: Callable[[], Any]) -> None:
    """Give a module's lock (``namespace[name]``, made by ``make``) a fresh one in every child."""
    renew_in_child(lambda: namespace.__setitem__(name, make()))


# Objects whose ``_lock`` a child renews (an autotuner's, a scratch buffer's), and how to make one.
_holders: weakref.WeakKeyDictionary[Any, Callable[[], Any]] = weakref.WeakKeyDictionary()


def lock_for(holder: Any, make: Callable[[], Any]) -> Any:
    """A new lock for ``holder._lock``, which every forked child replaces with a fresh one."""
    _holders[holder] = make
    return make()


def _renew_holders() -> None:
    for holder, make in list(_holders.items()):
        holder._lock = make()


renew_in_child(_renew_holders)
