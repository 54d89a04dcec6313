"""Serving a Triton ``Autotuner`` that tunebook did not build (``tunebook.patch()``).

Libraries build Triton autotuners that tunebook's decorator never sees: kernels decorated
before the patch, and subclasses of Triton's ``Autotuner`` (fla-core's ``CachedAutotuner``,
FlagGems' ``LibTuner``). While patched, their class's ``run`` hands each call to an
:class:`Adopted` autotuner made on the instance's first call: a tunebook ``Autotuner`` built
from the instance's own attributes, which keeps Triton's attributes *on the instance*, so
that the library reads and writes what it always did:

* ``cache`` — the instance's ``cache`` becomes tunebook's (a dict whose writes overrule
  decisions, as in Triton); what it held before, a caller's or an earlier tuning's, is
  served as written. A library that assigns a new dict is followed on its next call: the
  dict is copied, so later writes into it (rather than into ``cache``) are not seen.
* ``best_config``, ``configs_timings``, ``bench_time``, ``nargs`` — written on the instance.
* ``pre_hook`` / ``post_hook`` — read from the instance at each use (fla replaces Triton's
  defaults in its ``__init__``).
* ``prune_configs`` — the instance's own method (a subclass may override it), with
  ``nargs`` set as Triton sets it.

Timing is tunebook's (the instance's ``do_bench=``, ``warmup``/``rep``/``use_cuda_graph``
are honoured); a class that overrides Triton's timing steps is not adopted at all
(``_patch.py`` decides which).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import _compat
from ._autotuner import Autotuner
from ._forksafe import renew_lock
from ._hooks import Hooks
from ._options import Options

# Where an adopted instance keeps its tunebook autotuner (in its __dict__).
ATTRIBUTE = "_tunebook_autotuner"

_lock = threading.Lock()
renew_lock(globals(), "_lock", threading.Lock)
_adopted: weakref.WeakSet[Any] = weakref.WeakSet()


def readable_name(fn: Any) -> str:
    """A kernel's name in the book when tunebook was not told one: ``module.qualname`` of
    the Python function, so that a book says which library and function it holds.

    >>> import os.path
    >>> readable_name(os.path.join)
    'posixpath.join'
    """
    base = _compat.base_function(fn)
    module = getattr(base, "__module__", None)
    qualname = getattr(base, "__qualname__", getattr(base, "__name__", "kernel"))
    return f"{module}.{qualname}" if module else qualname


def _forwarded(name: str) -> property:
    """An attribute of the Adopted autotuner that lives on the Triton instance it serves."""

    def get(self: Any) -> Any:
        return getattr(self.host, name, None)

    def set_(self: Any, value: Any) -> None:
        setattr(self.host, name, value)

    return property(get, set_)


class _HostHooks(Hooks):
    """Triton's hooks, read from (and written to) the instance at each use."""

    def __init__(self, host: Any) -> None:  # Hooks.__init__ would install defaults: not here
        self.host = host

    reset_to_zero = property(lambda self: list(self.host.reset_to_zero))
    restore_value = property(lambda self: list(self.host.restore_value))
    pre_hook = _forwarded("pre_hook")
    post_hook = _forwarded("post_hook")
    user_defined_pre_hook = property(lambda self: bool(getattr(self.host, "user_defined_pre_hook", False)))
    user_defined_post_hook = property(lambda self: bool(getattr(self.host, "user_defined_post_hook", False)))
    restore_copies = property(lambda self: getattr(self.host, "restore_copies", {}))


class Adopted(Autotuner):
    """tunebook's autotuner for one Triton ``Autotuner`` instance (see the module docstring)."""

    best_config = _forwarded("best_config")
    configs_timings = _forwarded("configs_timings")
    bench_time = _forwarded("bench_time")
    nargs = _forwarded("nargs")

    def __init__(self, host: Any) -> None:
        self.host = host
        kept = {name: host.__dict__[name] for name in _KEPT if name in host.__dict__}
        settings = _compat.autotuner_settings(host)
        fn = host.fn
        super().__init__(
            fn,
            host.arg_names,
            host.configs,
            host.keys,
            host.reset_to_zero,
            host.restore_value,
            prune_configs_by=settings["prune_configs_by"],
            warmup=settings["warmup"],
            rep=settings["rep"],
            use_cuda_graph=settings["use_cuda_graph"],
            do_bench=settings["do_bench"],
            cache_results=bool(getattr(host, "cache_results", False)),
            options=Options(name=readable_name(fn)),
        )
        self.hooks = _HostHooks(host)
        self.defined_in = getattr(_compat.base_function(fn), "__module__", None)
        host.__dict__.update(kept)  # what Autotuner.__init__ reset on the instance: Triton's values stand
        self.cache = dict(host.__dict__.get("cache") or {})  # served as written (overrides)
        host.__dict__["cache"] = self.cache

    def prune_configs(self, kwargs: dict[str, Any], configs: list[Any] | None = None) -> list[Any]:
        """The instance's own pruning (Triton's, or its subclass's), as Triton calls it."""
        return list(self.host.prune_configs(kwargs))

    def follow_cache(self) -> None:
        """The library assigned a new dict to the instance's ``cache``: serve that one."""
        assigned = self.host.__dict__.get("cache")
        self.cache = assigned if assigned is not None else {}
        self.host.__dict__["cache"] = self.cache


# Triton's attributes that Autotuner.__init__ would reset on the instance it serves.
_KEPT = ("best_config", "configs_timings", "bench_time", "nargs")


def adopt(host: Any, on_error: Callable[[Any, BaseException], None]) -> Adopted | None:
    """The Adopted autotuner of ``host``, made on first use; None (Triton serves the
    instance, unchanged) when tunebook cannot be built from it, reported by ``on_error``."""
    with _lock:
        served = host.__dict__.get(ATTRIBUTE)
        if served is None:
            try:
                served = Adopted(host)
            except Exception as exc:
                served = False
                on_error(host, exc)
            host.__dict__[ATTRIBUTE] = served
            _adopted.add(host)
    return served or None


def leave_to_triton(host: Any) -> None:
    """Never adopt ``host``: Triton's own ``run`` serves it while patched."""
    with _lock:
        host.__dict__[ATTRIBUTE] = False
        _adopted.add(host)


def release_all() -> None:
    """Give every adopted instance back to Triton: a plain dict ``cache`` holding what it
    holds now, and no tunebook autotuner."""
    with _lock:
        for host in list(_adopted):
            served = host.__dict__.pop(ATTRIBUTE, None)
            if served:
                host.__dict__["cache"] = dict(served.cache)
        _adopted.clear()
