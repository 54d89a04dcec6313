"""``tunebook.autotune``: Triton's autotuner, with a memory.

The call path has two speeds:

* **Hit** — the call is laid out like one seen before in this process: a generated function
  turns its arguments into a tuple, one dict lookup finds the config, and the kernel
  launches (``_hits.py``, ``_launch.py``). No locks, no environment reads.
* **Miss** — under the autotuner's lock: bind the call, build Triton's key, list this call's
  candidates, and reuse or make the decision for its call key (``_hits.py`` states the
  rule). A new decision is the miss path's (``_miss.py``): the book, or by
  ``TUNEBOOK_MODE``, tuning (``_tuner.py``) or a served fallback (``_policy.py``). The
  autotuner then settles it: Triton's ``cache``, ``configs_timings``, ``bench_time``.

This class keeps Triton's surface (constructor order, attributes, hooks, ``warmup``,
``prune_configs``); tunebook's options arrive as one :class:`~tunebook._options.Options`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import (
    _buckets,
    _compat,
    _devices,
    _fingerprint,
    _launch,
    _listing,
    _miss,
    _options,
    _settings,
    _stats,
    _warnings,
)
from ._bench import Timers
from ._book import KernelIdentity, Page, config_id
from ._call import Call
from ._configs import ConfigIndex, prune
from ._errors import ConfigurationError, TuningFailed
from ._failures import NoneRan
from ._forksafe import lock_for
from ._hits import HitTable
from ._home import KernelHome
from ._hooks import Hooks
from ._listing import SpaceListing, candidate_ids
from ._options import Options, refuse_ignored_meta_parameters
from ._reads import ArgumentReads
from ._set_aside import SetAside
from ._space import Space
from ._tables import TablePage, Tables
from ._version import __version__

__all__ = ["Autotuner", "__version__", "autotune"]


class _Cache(dict):
    """``Autotuner.cache``: Triton's key -> the config a call of that key runs.

    The autotuner writes every decision here, as Triton does (for a bucketed key whose
    candidates depend on the call, the most recent decision of the bucket). A caller's own
    write overrules the autotuner for that key, as in Triton: the next call of the key
    runs the written config (where the call's candidates allow it). Deleting a key makes
    the next call decide it again (from the book, without benchmarking, if it is there).
    """

    def __init__(self, owner: Autotuner, items: Mapping[Any, Any] | None = None) -> None:
        super().__init__(items or {})
        self._owner = weakref.ref(owner)

    def _changed(self, keys: Iterable[Any]) -> None:
        owner = self._owner()
        if owner is not None:
            owner._overruled(list(keys))

    def _locked(self) -> Any:
        # A caller's write and its bookkeeping happen under the autotuner's lock: a tuning of
        # the key that ended between the two wrote its own decision over the caller's (which
        # was then lost, though the key was marked as the caller's). The write waits for it.
        owner = self._owner()
        return owner._lock if owner is not None else contextlib.nullcontext()

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._locked():
            super().__setitem__(key, value)
            self._changed([key])

    def __delitem__(self, key: Any) -> None:
        with self._locked():
            super().__delitem__(key)
            self._changed([key])

    def update(self, *args: Any, **kwargs: Any) -> None:
        news = dict(*args, **kwargs)
        with self._locked():
            super().update(news)
            self._changed(news)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def pop(self, key: Any, *default: Any) -> Any:
        with self._locked():
            value = super().pop(key, *default)
            self._changed([key])
        return value

    def clear(self) -> None:
        with self._locked():
            keys = list(self)
            super().clear()
            self._changed(keys)

    def pop_quietly(self, key: Any) -> None:
        """Drop the autotuner's own entry for ``key`` without marking it a caller's write."""
        super().pop(key, None)


class Autotuner(_compat.TritonAutotuner):
    """Drop-in for ``triton.runtime.autotuner.Autotuner`` that remembers in a book.

    Same constructor order and the same public attributes (``cache``, ``best_config``,
    ``configs_timings``, ``bench_time``, ``configs``, ``keys``, ``arg_names``, ``fn``,
    ``base_fn``, ``nargs``, ``pre_hook``, ``post_hook``, ``do_bench``, ``cache_results``);
    tunebook's options are the keyword-only ``options``. Thread-safe: concurrent misses
    are serialized per kernel; hits take no lock.

    A subclass of Triton's ``Autotuner``, so that libraries that check
    ``isinstance(fn, triton.runtime.Autotuner)`` accept it. Triton's ``__init__`` is not
    called (every attribute it sets is set here, with its meaning: calling it would
    validate, warn and install hooks of its own), and every entry to Triton's tuning path
    (``run``, ``prune_configs``, ``warmup``, ``do_bench``) is overridden, so Triton's own
    tuning never runs.
    """

    def __init__(
        self,
        fn: Any,
        arg_names: Sequence[str],
        configs: Sequence[Any] | Space | None,
        key: Sequence[str],
        reset_to_zero: Sequence[str] | None,
        restore_value: Sequence[str] | None,
        pre_hook: Callable[..., Any] | None = None,
        post_hook: Callable[..., Any] | None = None,
        prune_configs_by: dict[str, Any] | None = None,
        warmup: int | None = None,
        rep: int | None = None,
        use_cuda_graph: bool = False,
        do_bench: Callable[..., Any] | None = None,
        cache_results: bool = False,
        *,
        options: Options | None = None,
    ) -> None:
        self.options = options if options is not None else Options()
        self.cache_results = cache_results  # accepted as Triton's; the book subsumes Triton's disk cache
        _settings.check()  # an unknown TUNEBOOK_MODE (...) is an error now, not at the first request
        # A Space is enumerated per call (its argument constraints depend on the call).
        self.space: Space | None = configs if isinstance(configs, Space) else None
        self.configs: list[Any] = (
            []
            if self.space is not None
            else list(configs)
            if configs
            else [_compat.Config({}, num_warps=4, num_stages=3)]
        )
        # str names; a tunebook.bucket(...) is a str that also buckets. One name given as a
        # string is that name (list() would split it into letters, as Triton does).
        self.keys = _names(key)
        self._buckets = _buckets.bucketers(self.keys)
        self.arg_names = list(arg_names)
        self.fn = fn
        self.base_fn = _compat.base_function(fn)
        self.reset_to_zero = _names(reset_to_zero or [])
        self.restore_value = _names(restore_value or [])
        ignored = _names((self.options.check or {}).get("ignore", ()))
        _check_names(self.base_fn, self.arg_names, self.keys, self.reset_to_zero, self.restore_value, ignored)
        refuse_ignored_meta_parameters(self.base_fn, ignored)
        self.hooks = Hooks(self.reset_to_zero, self.restore_value, pre_hook, post_hook)
        _check_meta_names(self, bool(pre_hook or post_hook or prune_configs_by))
        prune = prune_configs_by or {}
        self.perf_model = prune.get("perf_model")
        self.configs_top_k = prune.get("top_k", 1.0)
        self.early_config_prune = prune.get("early_config_prune")
        self.num_warmups, self.num_reps, self.use_cuda_graph = warmup, rep, use_cuda_graph
        self._user_do_bench = do_bench
        self.configs_timings: dict[Any, list[float]] | None = None
        self.bench_time: float = 0.0
        self.best_config: Any = None
        self.nargs: dict[str, Any] | None = None  # the call's positional arguments, during a miss (Triton's)
        self.config_index = ConfigIndex(self.configs)
        self.defined_in: str | None = None  # the module autotune(...) was applied in (for workers)
        self.counters = _stats.register(self)
        self._required_keys = _required_key_arguments(self.base_fn, self.fn, self.keys)
        self._lock = lock_for(self, threading.RLock)  # renewed in a forked child (_forksafe.py)
        self._home = KernelHome(fn, self.keys, self.options, self._timer_settings)
        self._hits = HitTable(self.arg_names, self.keys, fn.run, self)
        self._listing = (
            SpaceListing(self.space, self.config_index, lambda: self.page().platform)
            if self.space is not None
            else None
        )
        self._cache = _Cache(self)
        self._overrides: set[Any] = set()  # keys whose config a caller wrote into .cache
        self._announced: set[Any] = set()  # keys printed for TRITON_PRINT_AUTOTUNING
        self._none_ran = NoneRan()  # keys where no config ran, per platform (_failures.py)
        self.set_aside = SetAside(self.label)  # served configs that cannot compile here (_set_aside.py)
        # Where a bucket holds calls with different values, two calls of one key can have
        # different candidates (a Space's arg_constraints and Triton's pruning see the values);
        # so can they where a Space's arg_constraints read an argument outside the key, bucketed
        # or not (``reads``). Triton's pruning of an unbucketed key is Triton's: per key.
        self._rules_see_values = bool(self._buckets) and bool(
            (self.space is not None and self.space.arg_constraints)
            or self.early_config_prune
            or self.perf_model
        )
        self.reads = ArgumentReads(self.keys)
        self._devices_known = False  # whether _by_device has looked at this process's GPUs
        if self._single:
            self._hits.serve_always(self._hits.hit(self.configs[0], self.counters.hits))

    @property
    def _call_dependent(self) -> bool:
        return self._rules_see_values or bool(self.reads.names)

    def _timer_settings(self) -> tuple[Any, int | None, int | None, bool, bool]:
        """Triton's timing attributes when the timers are first needed (a caller may set them)."""
        adaptive = self.options.adaptive
        return self._user_do_bench, self.num_warmups, self.num_reps, self.use_cuda_graph, adaptive

    @property
    def _single(self) -> bool:
        return self.space is None and len(self.configs) == 1

    @property
    def label(self) -> str:
        """The kernel's name in messages: ``name=`` if given, else the function's name."""
        return self.options.name or self.base_fn.__name__

    # ------------------------------------------------------------ Triton's attributes

    @property
    def cache(self) -> dict[Any, Any]:
        """Triton's key -> config (see :class:`_Cache` for what it holds and what writes do)."""
        return self._cache

    @cache.setter
    def cache(self, value: Mapping[Any, Any]) -> None:
        # Copied into a dict whose writes are watched: the hit path never reads ``cache``,
        # so writes into the caller's own dict afterwards are not seen (docs/adoption.md).
        # Under the lock, as a write into it is (_Cache._locked): a tuning that ended between
        # the swap and the bookkeeping wrote its decision into the caller's new dict.
        with self._lock:
            old = list(self._cache)
            self._cache = _Cache(self, value)
            self._overruled([*old, *self._cache])

    pre_hook = property(lambda self: self.hooks.pre_hook, lambda self, v: setattr(self.hooks, "pre_hook", v))
    post_hook = property(
        lambda self: self.hooks.post_hook, lambda self, v: setattr(self.hooks, "post_hook", v)
    )
    restore_copies = property(lambda self: self.hooks.restore_copies)
    user_defined_pre_hook = property(lambda self: self.hooks.user_defined_pre_hook)
    user_defined_post_hook = property(lambda self: self.hooks.user_defined_post_hook)

    @property
    def do_bench(self) -> Callable[..., Any]:
        return self.timers().full

    # ------------------------------------------------------------------ launching

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        # The common hit (positional arguments, no config pre_hook) is served by generated
        # code (``HitTable.getitem``); anything else goes through run().
        return self._hits.getitem(grid)

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        """Launch (Triton's KernelInterface entry point; ``triton.heuristics`` calls this)."""
        hits = self._hits
        try:
            hit = hits.by_binding[hits.binding_key(*args, **kwargs)]  # type: ignore[misc]
        except (KeyError, AttributeError, TypeError):
            hit = None
        if hit is None:
            hit = hits.other_layout(args, kwargs)
        if hit is None:  # outside the except block: errors of a first launch chain nothing
            return self._slow_run(args, kwargs, grid, warmup)
        launcher, config, counter, config_kwargs = hit
        if not (kwargs or warmup or config.pre_hook is not None):
            return launcher(args, grid)  # bumps the counter and sets best_config itself
        counter[0] += 1
        self.best_config = config
        launch_kwargs = {**kwargs, **config_kwargs}  # as the slow path merges them (Call.launch_kwargs)
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **launch_kwargs})
        lean = _launch.lean_options(launch_kwargs, self.option_defaults())
        return self.fn.run(*args, grid=grid, warmup=warmup, **lean)

    def option_defaults(self) -> Mapping[str, Any]:
        """The launch options every launch of a config leaves out where they equal the
        backend's defaults (``_launch.lean_options``): those of a bare jit function. A wrapper
        (``triton.heuristics``) gets every option on every launch, as Triton passes them: its
        functions may read ``num_warps``."""
        return _compat.launch_option_defaults() if _compat.is_jit_function(self.fn) else {}

    def _by_device(self) -> None:
        """At the first page open or miss: where this process drives GPUs of several models,
        keep what belongs to a platform per platform, picked by the current device from now on
        (``_devices.route``). A host of one model (the interpreter included) keeps its one of
        each, and its hit path asks no device."""
        if self._devices_known:
            return
        with self._lock:
            if not self._devices_known:
                _devices.route(self)
                self._devices_known = True

    def _slow_run(self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, warmup: bool) -> Any:
        self._by_device()
        call = Call.bind(self.arg_names, args, kwargs, grid)
        tried: dict[str, BaseException] = {}  # config id -> the error it raised in this call
        while True:
            with self._lock:
                self.nargs = call.nargs
                try:
                    config, counter = self._decision(call)
                    cid = self.config_index.id_of(config)
                    if cid in tried:  # decided again to a config that failed: nothing else to serve
                        raise tried[cid]
                    launch_kwargs = call.launch_kwargs(config)
                    # A served answer joins the hit path once it has launched: until then it
                    # may be one that cannot compile for its key here (_set_aside.py).
                    served = counter is self.counters.fallbacks
                    if not (self._single or served):
                        self._hits.remember(args, kwargs, self._hits.hit(config, counter))
                    self.best_config = config
                    if config.pre_hook is not None:
                        config.pre_hook({**call.nargs, **launch_kwargs})
                finally:
                    self.nargs = None
            # The options as the hits will pass them: one compiled kernel for both (lean_options).
            options = call.run_kwargs(config, self.option_defaults())
            try:
                launched = self.fn.run(*args, grid=grid, warmup=warmup, **options)
            except Exception as exc:
                if not (served and _compat.is_config_specific_error(exc) and self._set_aside(call, cid, exc)):
                    self._raise_if_none_ran(call, cid, exc)
                    raise
                tried[cid] = exc
                continue
            if served and not warmup:  # a warmup compiles without loading: it proves nothing
                with self._lock:  # unless the key was decided otherwise meanwhile (a set-aside, a caller)
                    key = self._key(call)
                    if self._cache.get(key) is config and key not in self._overrides:
                        self._hits.remember(args, kwargs, self._hits.hit(config, counter))
            return launched

    def _raise_if_none_ran(self, call: Call, cid: str, exc: Exception) -> None:
        """A launch in place of configs of which none ran for the key (``_tuner.none_ran``)
        failed: raise ``TuningFailed`` that says so. The key's hits are dropped, so that each
        later call of it says so too."""
        with self._lock:
            said = self._none_ran.said(self._key(call), cid)
            if said is None:
                return
            self._hits.clear()
        raise TuningFailed(f"{said}, and it failed too: {type(exc).__name__}: {str(exc)[:500]}") from exc

    def _set_aside(self, call: Call, cid: str, exc: BaseException) -> bool:
        """A served config cannot compile for this call's key (``_set_aside.py``): whether to
        decide the call again without it; if so, the key's decisions are forgotten."""
        with self._lock:
            key = self._key(call)
            already = cid in self.set_aside.of(key)  # by another call of the key, which decided again
            if not self.set_aside.add(key, cid, exc):
                return False
            fallbacks = self.counters.fallbacks  # the failed launch served nothing (never below 0: a reset)
            fallbacks[0] = max(0, fallbacks[0] - 1)
            if not already:
                self._forget(self._hits, key)  # this device's platform's: the config failed here
                self._hits.clear()  # served: never a one-config kernel's
                if key not in self._overrides:
                    self._cache.pop_quietly(key)
        return True

    def _decision(self, call: Call) -> tuple[Any, list[int]]:
        """(config, the counter its calls bump) for this call, by the rule in _hits.py."""
        key = self._key(call)
        if self._single:
            return self.configs[0], self.counters.hits
        if key in self._overrides:
            config = self._cache[key]
            if not self._call_dependent or self._allowed(call, config):
                self.counters.hits[0] += 1
                return config, self.counters.hits
        # serve mode over a Space: a key the book answers is decided from its entry's results,
        # without listing the Space (_miss.book_choice); keyed by the results the call allows,
        # as call-dependent decisions are keyed by the candidates.
        choice = _miss.book_choice(self, call, key) if self.space is not None else None
        candidates: Sequence[Any] | None = None
        decision_key: Any = key
        if choice is not None:
            decision_key = (key, "book", *choice.allowed)
        elif self._call_dependent:
            candidates = self._candidates(call)
            decision_key = (key, tuple(candidate_ids(self.config_index, candidates)))
        decided = self._hits.decisions.get(decision_key)
        if decided is not None:
            config, counter = decided
            dict.__setitem__(self._cache, key, config)
            counter[0] += 1
            return config, counter
        if choice is not None:
            decided = self._book_decision(call, key, choice)
        else:
            decided = self._decide(call, key, self._candidates(call) if candidates is None else candidates)
        self._hits.decisions[decision_key] = decided
        return decided

    def _book_decision(
        self, call: Call, key: tuple[Any, ...], choice: _miss.BookChoice
    ) -> tuple[Any, list[int]]:
        """Settle a book answer found without listing the Space, as ``_decide`` settles one;
        the call's candidates, for ``configs_timings``, are the results it allows."""
        _stats.add("book_hits")
        config = choice.allowed[choice.cid]
        dict.__setitem__(self._cache, key, config)
        resolution = _miss.Resolution(choice.cid, "book", choice.entry)
        return self._settle(call, key, config, resolution, list(choice.allowed.values()))

    def _decide(self, call: Call, key: tuple[Any, ...], candidates: Sequence[Any]) -> tuple[Any, list[int]]:
        """Resolve a miss (``_miss.py``) and settle it, as Triton's Autotuner.run settles a tuning."""
        if len(candidates) == 1:
            dict.__setitem__(self._cache, key, candidates[0])
            return candidates[0], self.counters.hits
        resolution = _miss.resolve(self, call, key, candidates)
        config = (
            candidates[0]
            if resolution.cid is None
            else _listing.config_of(self.config_index, candidates, resolution.cid)
        )
        dict.__setitem__(self._cache, key, config)
        self._none_ran.decided(key, self.config_index.id_of(config), resolution.none_ran)
        if resolution.source == "served":
            self.counters.fallbacks[0] += 1
            if resolution.unmeasured:
                self.set_aside.served(key, self.config_index.id_of(config), resolution.counted)
            return config, self.counters.fallbacks
        return self._settle(call, key, config, resolution, candidates)

    def _settle(
        self,
        call: Call,
        key: tuple[Any, ...],
        config: Any,
        resolution: _miss.Resolution,
        candidates: Sequence[Any],
    ) -> tuple[Any, list[int]]:
        """Triton's bookkeeping for a key answered by the book or tuned: ``configs_timings``
        over the candidates, ``bench_time`` and the post-tuning hooks, the hit count, and
        TRITON_PRINT_AUTOTUNING's line."""
        entry = resolution.entry
        results = entry.results if entry is not None else {}
        self.configs_timings = _listing.configs_timings(
            self.config_index, candidates, results, measured_only=self.space is not None
        )
        if resolution.source == "tuned":
            self.bench_time = resolution.seconds
            self.hooks.after_tuning(call, config)
        else:
            self.counters.hits[0] += 1
        if _settings.print_autotuning() and key not in self._announced:
            self._announced.add(key)
            _miss.announce(self, key, config, resolution, candidate_ids(self.config_index, candidates))
        return config, self.counters.hits

    def _overruled(self, keys: list[Any]) -> None:
        """A caller wrote (or deleted) ``cache[key]``: later calls of those keys follow it."""
        with self._lock:
            gone = []
            for key in keys:
                if key in self._cache:
                    self._overrides.add(key)
                else:
                    self._overrides.discard(key)
                    gone.append(key)
            # A caller's write holds on every device (the cache is one, as in Triton).
            for hits in _devices.each(self._hits):
                self._forget(hits, *gone)
                if not self._single:  # a one-config kernel's hit stands for every call
                    hits.clear()

    def _forget(self, hits: HitTable, *keys: Any) -> None:
        """Forget the decisions of ``keys`` in ``hits`` (under the lock; the caller clears the
        hits), in one pass over the decisions (one pass a key made ``cache.clear()`` quadratic)."""
        if not keys:
            return
        gone = set(keys)
        # Decisions are keyed by the key, by (key, candidate ids) (_decision), or by
        # (key, "book", result ids) (_book_decision).
        decisions = hits.decisions
        stale = [d for d in decisions if d in gone or (isinstance(d, tuple) and d and d[0] in gone)]
        for decision_key in stale:
            del decisions[decision_key]

    def _key(self, call: Call) -> tuple[Any, ...]:
        """Triton's key for the call (bucketed where declared); a missing key argument is named here,
        before any tuning starts."""
        missing = [name for name in self._required_keys if name not in call.nargs and name not in call.kwargs]
        if missing:
            passed = ", ".join([*call.nargs, *call.kwargs]) or "none"
            raise TypeError(
                f"{self.base_fn.__name__}() missing required argument{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} (in the key= of its autotune); arguments passed: {passed}"
            )
        return _fingerprint.canonical_key(self.arg_names, self.keys, call.args, call.kwargs, self._buckets)

    def _candidates(self, call: Call) -> Sequence[Any]:
        """The configs this call may run: the list or the Space's feasible configs (made when
        read, unless pruned), pruned as Triton prunes, one per config id."""
        # The rules see the arguments watched: what they read outside the key keys the hits.
        named = self.reads.watch(call.named)
        listed = None if self._listing is None else self._listing.allowed(named, self.label)
        if listed is not None and not (self.early_config_prune or self.perf_model):
            return listed
        configs = self.configs if listed is None else list(listed)
        # Triton's pruning of an unbucketed key is per key, as in Triton: its reads are not watched.
        if not (self._rules_see_values and (self.early_config_prune or self.perf_model)):
            return self.config_index.unique(self.prune_configs(call.kwargs, configs))
        self.reads.add(call.kwargs)  # the hooks get them as keywords, unwatched
        nargs, self.nargs = self.nargs, self.reads.watch(call.nargs)
        try:
            return self.config_index.unique(self.prune_configs(call.kwargs, configs))
        finally:
            self.nargs = nargs

    def declares(self, record: Mapping[str, Any]) -> bool:
        """Whether a config as the book stores it is one of this kernel's: in its list, or a
        point of its Space that the Space's constraints allow (whatever a call's pruning does)."""
        if self.space is not None:
            return self.space.declares(record)
        return config_id(record) in self.config_index.declared

    def key_and_candidates(self, call: Call) -> tuple[tuple[Any, ...], Sequence[Any]]:
        """(Triton's key, the candidates) of ``call``, as a miss sees them, for a sweep measuring
        a key in other processes (``tunebook._sweep``). A Space's are lazy, not picklable."""
        self._by_device()
        with self._lock:
            self.nargs = call.nargs
            try:
                return self._key(call), self._candidates(call)
            finally:
                self.nargs = None

    def _allowed(self, call: Call, config: Any) -> bool:
        allowed = set(candidate_ids(self.config_index, self._candidates(call)))
        return self.config_index.id_of(config) in allowed

    # ------------------------------------------------------------------ Triton's methods

    def prune_configs(self, kwargs: dict[str, Any], configs: list[Any] | None = None) -> list[Any]:
        """Triton's pruning: ``early_config_prune``, then the top-k of ``perf_model``."""
        return prune(
            self.configs if configs is None else configs,
            self.nargs or {},
            kwargs,
            self.early_config_prune,
            self.perf_model,
            self.configs_top_k,
        )

    def warmup(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Compile every candidate config for these arguments (as Triton's Autotuner.warmup)."""
        call = Call.bind(self.arg_names, args, kwargs, grid=None)
        self._by_device()
        with self._lock:
            self.nargs = call.nargs
            try:
                defaults = self.option_defaults()
                return [
                    self.fn.warmup(*args, **call.run_kwargs(cfg, defaults)) for cfg in self._candidates(call)
                ]
            finally:
                self.nargs = None

    # ------------------------------------------------------------------ identity and book

    def kernel_identity(self) -> KernelIdentity:
        """This kernel as a book names it (name, source hash, key names), whatever the
        platform: what ``tunebook prune`` compares, without asking for a GPU."""
        return self._home.kernel_identity()

    def identity(self) -> _fingerprint.Identity:
        """Who asks the book: this kernel (source hash, key names) on this platform.

        The one computation of identity: :meth:`page` and ``tunebook explain`` use it (prune
        needs :meth:`kernel_identity` alone). Touches no GPU driver (the timer is named, not
        made), but reads the device's identity.
        """
        return self._home.identity()

    def page(self) -> Page:
        """This kernel's page of the book for this platform, the current device's (opened on
        first use)."""
        self._by_device()
        return self._home.page()

    def imported_tables(self, device: str | None = None) -> list[TablePage]:
        """The imported tables ``tables=`` names, from the book's directories, read once per
        process: with ``device``, that GPU's only (serve mode), else every GPU's (tuning)."""
        self._by_device()
        return self._home.imported_tables(device)

    def timers(self) -> Timers:
        """The timers a tuning of this kernel uses (made on first use: may touch the GPU driver)."""
        self._by_device()
        return self._home.timers()


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _check_names(
    base_fn: Any,
    arg_names: list[str],
    keys: list[str],
    reset_to_zero: list[str],
    restore_value: list[str],
    ignored: list[str],
) -> None:
    """Every argument name the decorator was given must be one of the kernel's."""
    given = (("key", keys), ("reset_to_zero", reset_to_zero), ("restore_value", restore_value))
    for what, names in (*given, ("check's ignore", ignored)):
        unknown = [n for n in names if n not in arg_names]
        if unknown:
            raise ConfigurationError(
                f"tunebook.autotune: {what} names {', '.join(map(repr, unknown))}, which "
                f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} of kernel "
                f"{base_fn.__name__}({', '.join(arg_names)}). Use the kernel's argument names."
            )


def _check_meta_names(tuner: Autotuner, hooked: bool) -> None:
    """A Space's meta-parameter that is not an argument of the kernel is refused (a typo, or one
    left after an edit): Triton passes it on and the kernel ignores it, so the search times
    identical launches and the parameter meant is never tuned. A hook, a pruning function or a
    wrapper (``triton.heuristics``) may read such a name: then it is said once, not refused.
    A config list's names (a library's, adopted by ``patch()``) are never refused: said once
    where no hook, pruning function or wrapper may read them, else not at all."""
    fn, arg_names = tuner.fn, tuner.arg_names
    wrapped = tuner.base_fn is not getattr(fn, "fn", None)
    if tuner.space is not None:
        names = [n for n in tuner.space.params if n not in tuner.space.option_names]
    else:
        hooked = hooked or any(getattr(c, "pre_hook", None) is not None for c in tuner.configs)
        names = list(dict.fromkeys(str(n) for c in tuner.configs for n in getattr(c, "kwargs", {})))
    unknown = [n for n in names if n not in arg_names]
    if not unknown:
        return
    shown = []
    for name in unknown:
        close = difflib.get_close_matches(name, arg_names, n=1, cutoff=0.6)
        shown.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    what = "Space parameter" if tuner.space is not None else "config parameter"
    text = (
        f"tunebook.autotune: {what}{'s' * (len(unknown) > 1)} {', '.join(shown)} "
        f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} of kernel "
        f"{tuner.base_fn.__name__}({', '.join(arg_names)})"
    )
    if tuner.space is not None and not (hooked or wrapped):
        raise ConfigurationError(
            f"{text}. Triton would pass it to the kernel, which ignores it: name the kernel's "
            "meta-parameters, or remove it."
        )
    if tuner.space is not None or not (hooked or wrapped):
        _warnings.warn_once(
            f"meta-names:{tuner.label}:{unknown}",
            "%s. The kernel ignores %s%s (said once)",
            text,
            "it" if len(unknown) == 1 else "them",
            ", unless a hook, prune_configs_by or triton.heuristics reads it" if hooked or wrapped else "",
        )


def _required_key_arguments(base_fn: Callable[..., Any], fn: Any, keys: Sequence[str]) -> list[str]:
    """Key arguments every call must pass: no default value, and no ``triton.heuristics``
    between this autotuner and the kernel that computes them."""
    try:
        params = inspect.signature(base_fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a Python function always has one
        return []
    computed = _compat.heuristic_names(fn)
    return [
        str(k)
        for k in keys
        if str(k) in params and params[str(k)].default is inspect.Parameter.empty and str(k) not in computed
    ]


def autotune(
    configs: Sequence[Any] | Space,
    key: Sequence[str],
    prune_configs_by: dict[str, Any] | None = None,
    reset_to_zero: Sequence[str] | None = None,
    restore_value: Sequence[str] | None = None,
    pre_hook: Callable[..., Any] | None = None,
    post_hook: Callable[..., Any] | None = None,
    warmup: int | None = None,
    rep: int | None = None,
    use_cuda_graph: bool = False,
    do_bench: Callable[..., Any] | None = None,
    cache_results: bool = False,
    *,
    books: Sequence[str | Path] | Callable[[], Sequence[str | Path]] = (),
    name: str | None = None,
    strategy: str = "auto",
    max_configs: int | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    compile_workers: int | None = None,
    adaptive: bool = True,
    fallback: Callable[[tuple[Any, ...], list[Any]], Any] | None = None,
    prefer_nearest: bool = False,
    tables: Tables | None = None,
    inputs: Callable[[dict[str, Any]], Any] | None = None,
    isolate: bool = False,
    isolate_timeout: float = 300.0,
    check: bool | dict[str, Any] = False,
    group: Any = _options.NO_GROUP,
) -> Callable[[Any], Autotuner]:
    """Decorator for auto-tuning a ``triton.jit`` function, remembering results in a book.

    Takes everything ``triton.autotune`` takes, in the same order, and behaves the same,
    except that every measured (config, timing) is persisted and a later process with the
    same kernel, platform and key benchmarks nothing.

    ``cache_results`` (Triton's switch for its own on-disk cache of timings) is accepted
    and kept as the attribute of that name, and changes nothing: the book already
    remembers every result, also for configs with a ``pre_hook`` (which Triton's cache
    refuses). ``TUNEBOOK_MODE=off`` is the switch that stops remembering.

    Keyword-only additions:

    * ``books`` — read-only book directories shipped with the application, consulted after
      ``TUNEBOOK_DIR`` and before ``TUNEBOOK_PATH``; or a function returning them, called
      when the kernel's book is first opened (a setting read then, like ``TUNEBOOK_PATH``,
      rather than when the module is imported).
    * ``name`` — the kernel's name in the book and in messages (default: the function's
      qualified name).
    * ``strategy`` — which configs to measure for a new key: ``"auto"`` (default: every
      config of a list of up to 64, else a model-based or neighbour search), ``"exhaustive"``,
      ``"random"``, ``"bayes"`` (needs ``tunebook[optuna]``) or ``"neighbors"``.
    * ``max_configs`` / ``max_seconds`` — the budget per key (default: none for lists of up
      to 64 configs; 10% of a larger space, between 64 and 500 configs).
    * ``seed`` — for the random and model-based strategies.
    * ``compile_workers`` — threads compiling candidates ahead of measurement (default: the
      CPU count; Triton >= 3.5).
    * ``adaptive`` — screen every candidate with a short measurement and measure only the
      contenders in full (default True; a user ``do_bench`` is never adaptive).

    * ``fallback`` — ``fallback(key, configs) -> config`` picks the config for a key the book
      lacks in ``serve`` mode (default: the nearest remembered key's winner).
    * ``prefer_nearest`` — in ``serve`` mode, try the whole fallback chain (the key's own
      partial results, tables, its winner under an old Triton release or on another GPU of
      this architecture, the nearest remembered key's winner) before ``fallback``, which is
      then asked only where none of those answers (nothing comparable remembered: a
      hand-written rule as the last resort; the kernel pack's choice, since a neighbouring
      bucket's tuned winner beats it).
    * ``tables`` — a :class:`tunebook.Tables`: tables imported with ``tunebook import`` (vLLM's
      fused-MoE configs) that this kernel reads, and how their keys and configs map onto
      its own. A key the book lacks is served, in ``serve`` mode, by the entry of a table
      tuned on this GPU (after the key's own partial results, before the nearest key); in
      ``tune`` mode every table's entry is a hint the search measures first.
    * ``inputs`` — ``inputs(description) -> (grid, args, kwargs)`` rebuilds a call for offline
      tuning (``tunebook tune``) when random tensors of the recorded layout will not do
      (index tables, block tables). ``description`` has the recorded ``call`` (or None) and
      the ``key`` as a dict; return ``grid=None`` to use the recorded grids.

    * ``isolate`` — measure a new key's candidates in a worker process: a config that
      crashes (illegal memory access, device-side assert) or hangs (``isolate_timeout``
      seconds without progress) is recorded as failed and tuning goes on; this process and
      its CUDA context are never touched. The kernel must be a global of an importable
      module; the worker measures on inputs rebuilt from the call (see ``inputs``).

    * ``check`` — compare every candidate's outputs with those of the first config that
      runs (the reference), on the same inputs, restored between runs; a config that
      computes a different answer is recorded as failed ("wrong result: ..."). ``True`` or
      a dict of ``rtol``, ``atol``, ``ignore`` (argument names), ``max_bytes``; see
      docs/result-checking.md.

    * ``group`` — a ``torch.distributed`` process group (``TUNEBOOK_DISTRIBUTED=1``: the
      default group) whose ranks tune each new key together: one search, each batch of it
      measured across the ranks, one rank chooses and writes the book, and every rank
      launches the same config. Keys only
      some ranks reach never hang the job (docs/distributed.md).

    ``configs`` may also be a :class:`tunebook.Space`, a declarative config space, and a
    ``key`` name may be a :func:`tunebook.bucket` to bucket its values. Options are checked
    here, when the kernel is decorated (as is ``TUNEBOOK_MODE``): a mistake stops a server
    at start-up, not at its first request.

    Example (runs on a CPU with ``TRITON_INTERPRET=1``)::

        @tunebook.autotune(
            configs=[triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})],
            key=["n"],
        )
        @triton.jit
        def add_kernel(x, y, out, n, BLOCK: tl.constexpr):
            ...

        add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n)
    """
    options = _options.from_arguments(locals())

    def decorator(fn: Any) -> Autotuner:
        tuner = Autotuner(
            fn,
            fn.arg_names,
            configs,
            key,
            reset_to_zero,
            restore_value,
            pre_hook=pre_hook,
            post_hook=post_hook,
            prune_configs_by=prune_configs_by,
            warmup=warmup,
            rep=rep,
            use_cuda_graph=use_cuda_graph,
            do_bench=do_bench,
            cache_results=cache_results,
            options=options,
        )
        # Where a worker process can import this kernel from (isolate=True, tunebook tune).
        tuner.defined_in = sys._getframe(1).f_globals.get("__name__")
        return tuner

    return decorator
