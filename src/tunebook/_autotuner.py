"""``tunebook.autotune``: Triton's autotuner, with a memory.

The call path has two speeds:

* **Hit** — the key was seen in this process: one generated function turns the call's
  arguments into a tuple, one dict lookup finds the config, and the kernel launches. No
  locks, no environment reads, no allocation beyond the key tuple.
* **Miss** — under a lock: build the key exactly as Triton does, prune the configs, then ask
  the book. If the book measured every candidate, that is a hit from the book (nothing is
  benchmarked). Otherwise the mode decides: ``tune`` measures only the configs the book
  lacks and persists them; ``serve`` never measures and picks a fallback; ``off`` behaves
  like ``triton.autotune`` with no book at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import _buckets, _calls, _compat, _fingerprint, _launch, _misses, _settings, _stats
from ._bench import QUANTILES, Timers, choose_timers
from ._book import (
    Book,
    BookFormatError,
    Entry,
    KernelIdentity,
    Page,
    Result,
    config_id,
    config_record,
    now_iso,
)
from ._progress import Progress
from ._search import SMALL_SPACE, Budget, strategy_names
from ._space import Space
from ._tuner import KeyTuning, Outcome, tune_key

log = logging.getLogger("tunebook")

__version__ = "0.1.0"

_FastEntry = tuple[_launch.Launcher, Any, list[int], dict[str, Any]]


class Autotuner(_compat.KernelInterface):
    """Drop-in for ``triton.runtime.autotuner.Autotuner`` that remembers in a book.

    Same constructor order and the same public attributes (``cache``, ``best_config``,
    ``configs_timings``, ``bench_time``, ``configs``, ``keys``, ``arg_names``, ``fn``); the
    new options are keyword-only. Thread-safe: concurrent misses are serialized per kernel.
    """

    def __init__(
        self,
        fn: Any,
        arg_names: Sequence[str],
        configs: Sequence[Any] | None,
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
        *,
        books: Sequence[str | Path] = (),
        name: str | None = None,
        strategy: str = "auto",
        max_configs: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        compile_workers: int | None = None,
        adaptive: bool = True,
        fallback: Callable[[tuple[Any, ...], list[Any]], Any] | None = None,
        inputs: Callable[[dict[str, Any]], Any] | None = None,
        isolate: bool = False,
        isolate_timeout: float = 300.0,
        check: bool | dict[str, Any] = False,
    ) -> None:
        # A Space is enumerated per key (its argument constraints depend on the call).
        self.space: Space | None = configs if isinstance(configs, Space) else None
        self.configs: list[Any] = (
            []
            if self.space is not None
            else list(configs)
            if configs
            else [_compat.Config({}, num_warps=4, num_stages=3)]
        )
        self.keys = list(key)  # str names; a tunebook.bucket(...) is a str that also buckets
        self._buckets = _buckets.bucketers(self.keys)
        self.arg_names = list(arg_names)
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.configs_timings: dict[Any, list[float]] | None = None
        self.bench_time: float = 0.0
        self.best_config: Any = None
        self.nargs: dict[str, Any] | None = None
        self.fn = fn
        self.base_fn = _compat.base_function(fn)
        self.reset_to_zero = list(reset_to_zero or [])
        self.restore_value = list(restore_value or [])
        for what, names in (
            ("key", self.keys),
            ("reset_to_zero", self.reset_to_zero),
            ("restore_value", self.restore_value),
        ):
            unknown = [n for n in names if n not in self.arg_names]
            if unknown:
                raise ValueError(
                    f"tunebook.autotune: {what} names {', '.join(map(repr, unknown))}, which "
                    f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} of kernel "
                    f"{self.base_fn.__name__}({', '.join(self.arg_names)}). Use the kernel's argument names."
                )
        self._install_hooks(pre_hook, post_hook)
        prune = prune_configs_by or {}
        self.perf_model = prune.get("perf_model")
        self.configs_top_k = prune.get("top_k", 1.0)
        self.early_config_prune = prune.get("early_config_prune")
        self.num_warmups, self.num_reps, self.use_cuda_graph = warmup, rep, use_cuda_graph
        self._user_do_bench = do_bench
        self._books = tuple(books)
        self._name = name
        if strategy != "auto" and strategy not in strategy_names():
            raise ValueError(
                f"tunebook.autotune: unknown strategy {strategy!r}; choose one of "
                f"{', '.join(['auto', *strategy_names()])}"
            )
        self.strategy = strategy
        self.budget = Budget(max_configs=max_configs, max_seconds=max_seconds)
        self.seed = seed
        self.compile_workers = compile_workers if compile_workers is not None else (os.cpu_count() or 1)
        self.adaptive = adaptive
        self.fallback = fallback
        self.inputs = inputs
        self.isolate = isolate
        self.isolate_timeout = isolate_timeout
        self._check: dict[str, Any] | None = {} if check is True else dict(check) if check else None
        unknown = set(self._check or {}) - {"rtol", "atol", "ignore", "max_bytes"}
        if unknown:
            raise ValueError(
                "tunebook.autotune: check= takes rtol, atol, ignore and max_bytes; "
                f"found {', '.join(sorted(unknown))}"
            )
        # Set by a tuning worker process to announce each candidate before it runs.
        self._on_candidate: Callable[[str, dict[str, Any], str, list[Any]], None] | None = None
        self._after_result: Callable[[str, Result], None] | None = None
        self._meta_index: tuple[tuple[str, ...], dict[tuple[Any, ...], str], int] | None = None
        self._defined_in: str | None = None  # the module autotune(...) was applied in

        # Configs as the book names them. Configs equal in every launch parameter (a list
        # with duplicates, or two that differ only in their pre_hook) share one id: the first
        # declared stands for them, as it would win Triton's tie, and is the one measured.
        self._config_ids: dict[int, str] = {}
        self._configs_by_id: dict[str, Any] = {}
        for cfg in self.configs:
            cid = config_id(config_record(cfg.kwargs, _compat.config_options(cfg)))
            self._config_ids[id(cfg)] = cid
            self._configs_by_id.setdefault(cid, cfg)
        self._records = {id(c): config_record(c.kwargs, _compat.config_options(c)) for c in self.configs}
        self._space_configs: dict[str, Any] = {}  # config id -> the one Config object made for it

        self._lock = threading.RLock()
        self._page: Page | None = None
        self._timers: Timers | None = None
        # Hit-path tables: key tuple -> (launcher, config, the counter the call bumps: hits
        # or fallbacks, launch kwargs). _fast_pos serves calls with positional arguments
        # only (the common case, keyed by index); _fast serves any call (keyed by binding).
        self._fast: dict[tuple[Any, ...], _FastEntry] = {}
        self._fast_pos: dict[tuple[Any, ...], _FastEntry] = {}
        self._bind_key: Callable[..., tuple[Any, ...]] | None = None
        self._pos_key: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
        self._pos_key_tried = False
        self._tensor_slots: frozenset[str] = frozenset()
        self._call_kwargs: dict[str, Any] = {}
        self._launchers: dict[int, _launch.Launcher] = {}
        self._hit_counter = [0]
        self._fallback_counter = [0]
        self._fallback_keys: set[tuple[Any, ...]] = set()
        self._announced: set[tuple[Any, ...]] = set()
        _stats.register(self)
        if self.space is None and len(self.configs) == 1:
            only = self.configs[0]
            self._bind_key, self._pos_key, self._pos_key_tried = _constant_key, _constant_key, True
            entry = (self._launcher(only), only, self._hit_counter, only.all_kwargs())
            self._fast[()] = self._fast_pos[()] = entry

    # ----------------------------------------------------------------- hooks (as Triton)

    def _install_hooks(
        self, pre_hook: Callable[..., Any] | None, post_hook: Callable[..., Any] | None
    ) -> None:
        self.restore_copies: dict[str, Any] = {}
        self.user_defined_pre_hook = pre_hook is not None
        self.user_defined_post_hook = post_hook is not None
        if pre_hook is not None:
            self.pre_hook = pre_hook
        elif self.reset_to_zero or self.restore_value:

            def _pre_hook(kwargs: dict[str, Any], reset_only: bool = False) -> None:
                for name in self.reset_to_zero:
                    if kwargs.get(name) is not None:
                        kwargs[name].zero_()
                if not reset_only:
                    self.restore_copies = {
                        n: kwargs[n].clone() for n in self.restore_value if kwargs.get(n) is not None
                    }

            self.pre_hook = _pre_hook
        else:
            self.pre_hook = lambda kwargs, reset_only=False: 0
        if post_hook is not None:
            self.post_hook = post_hook
        elif self.restore_value:

            def _post_hook(kwargs: dict[str, Any], exception: BaseException | None) -> None:
                for name, value in self.restore_copies.items():
                    kwargs[name].copy_(value)
                self.restore_copies = {}

            self.post_hook = _post_hook
        else:
            self.post_hook = lambda kwargs, exception: 0

    # ------------------------------------------------------------------------ launching

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        # The common hit (positional arguments, no config pre_hook) is served right here
        # by generated code; anything else goes through run().
        def launch(*args: Any, **kwargs: Any) -> Any:
            if not kwargs:
                try:
                    launcher, config, counter, _ = self._fast_pos[self._pos_key(args)]  # type: ignore[misc]
                except (KeyError, AttributeError, IndexError, TypeError):
                    pass
                else:
                    if config.pre_hook is None:
                        counter[0] += 1
                        self.best_config = config
                        return launcher(args, grid)
            return self.run(*args, grid=grid, warmup=False, **kwargs)

        return launch

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        """Launch (Triton's KernelInterface entry point; ``triton.heuristics`` calls this)."""
        try:
            launcher, config, counter, config_kwargs = self._fast[self._bind_key(*args, **kwargs)]  # type: ignore[misc]
        except (KeyError, AttributeError, TypeError):
            return self._slow_run(args, kwargs, grid, warmup)
        counter[0] += 1
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config_kwargs})
        if kwargs or warmup:
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config_kwargs)
        return launcher(args, grid)

    def _slow_run(self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, warmup: bool) -> Any:
        with self._lock:
            self.nargs = dict(zip(self.arg_names, args))
            self._call_kwargs = kwargs
            try:
                key = _fingerprint.canonical_key(self.arg_names, self.keys, args, kwargs, self._buckets)
                if self.space is None and len(self.configs) == 1:
                    config = self.configs[0]
                else:
                    config = self.cache.get(key)
                    if config is not None and not self._allowed_for_call(config, kwargs):
                        config = None  # chosen in this bucket for a call this one's constraints differ from
                    if config is None:
                        config = self._decide(key, args, kwargs, grid)
                    else:
                        self._counter_for(key)[0] += 1
                conflicts = kwargs.keys() & config.kwargs.keys()
                if conflicts:
                    raise ValueError(
                        f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}. Make sure that you "
                        "don't re-define auto-tuned symbols."
                    )
                if self.space is not None or len(self.configs) > 1:
                    self._remember_fast(args, kwargs, key, config)
                self.best_config = config
                config_kwargs = config.all_kwargs()
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config_kwargs})
            finally:
                self.nargs = None
                self._call_kwargs = {}
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config_kwargs)

    def _allowed_for_call(self, config: Any, kwargs: dict[str, Any]) -> bool:
        """Whether ``config``, cached for this call's key, is among this call's own candidates.

        Only bucketing can make them differ: calls with different values share a bucketed
        key, while a Space's argument constraints and Triton's pruning see the values."""
        if not self._buckets or (self.space is None and not self.early_config_prune and not self.perf_model):
            return True
        allowed = {self._identify(c) for c in self.prune_configs(kwargs, self._candidates(kwargs))}
        return self._identify(config) in allowed

    def _counter_for(self, key: tuple[Any, ...]) -> list[int]:
        return self._fallback_counter if key in self._fallback_keys else self._hit_counter

    def _launcher(self, config: Any) -> _launch.Launcher:
        launcher = self._launchers.get(id(config))
        if launcher is None:
            launcher = self._launchers[id(config)] = _launch.config_launcher(
                self.fn.run, config.all_kwargs(), _compat.launch_option_defaults()
            )
        return launcher

    def _remember_fast(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: tuple[Any, ...], config: Any
    ) -> None:
        entry = (self._launcher(config), config, self._counter_for(key), config.all_kwargs())
        slots = _launch.tensor_slots(self.arg_names, args, kwargs)
        if self._bind_key is None:
            self._bind_key = _launch.binding_key(self.arg_names, self.keys, args, kwargs)
            self._tensor_slots = slots
        # The key functions read dtypes where the first call had tensors. A call with tensors
        # elsewhere would key the same as one without them: it is never entered, and stays on
        # the slow path, which builds Triton's key from scratch.
        if slots != self._tensor_slots:
            return
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            self._fast[self._bind_key(*args, **kwargs)] = entry
        if kwargs:
            return
        if not self._pos_key_tried:
            self._pos_key_tried = True
            self._pos_key = _launch.positional_key(self.arg_names, self.keys, args)
        if self._pos_key is not None:
            with contextlib.suppress(AttributeError, IndexError, TypeError):
                self._fast_pos[self._pos_key(args)] = entry

    def warmup(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Compile every candidate config for these arguments (as Triton's Autotuner.warmup)."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            candidates = self._candidates(kwargs)
            return [
                self.fn.warmup(*args, **kwargs, **cfg.all_kwargs())
                for cfg in self.prune_configs(kwargs, candidates)
            ]
        finally:
            self.nargs = None

    # ------------------------------------------------------------------------ pruning

    def prune_configs(self, kwargs: dict[str, Any], configs: list[Any] | None = None) -> list[Any]:
        """Triton's pruning: ``early_config_prune``, then the top-k of ``perf_model``."""
        pruned = self.configs if configs is None else configs
        nargs = self.nargs or {}
        if self.early_config_prune:
            pruned = self.early_config_prune(pruned, nargs, **kwargs)
            if not pruned:
                raise ValueError(
                    "tunebook.autotune: early_config_prune returned no configs for this call; it must "
                    "return at least one config."
                )
        if self.perf_model:
            top_k = self.configs_top_k
            if isinstance(top_k, float) and top_k <= 1.0:
                top_k = max(1, int(len(pruned) * top_k))
            elif not isinstance(top_k, int):
                raise TypeError(
                    "Error while pruning configs, top_k must be either 1) a float <= 1.0 or 2) an int"
                )
            if len(pruned) > top_k:
                est = {cfg: self.perf_model(**nargs, **kwargs, **cfg.all_kwargs()) for cfg in pruned}
                pruned = sorted(est, key=lambda c: est[c])[:top_k]
        return list(pruned)

    # ------------------------------------------------------------------------ deciding

    def _kernel_identity(self) -> KernelIdentity:
        name = self._name or _fingerprint.kernel_name(self.fn)
        return KernelIdentity(name, _fingerprint.kernel_hash(self.fn), _buckets.identity(self.keys))

    @functools.cached_property
    def _timer_choice(self) -> tuple[Callable[[], Timers], str]:
        """(a factory for the timers, their id); the factory may touch the GPU driver, the id not."""
        return choose_timers(
            self._user_do_bench, self.num_warmups, self.num_reps, self.use_cuda_graph, self.adaptive
        )

    def _ensure_timers(self) -> Timers:
        if self._timers is None:
            self._timers = self._timer_choice[0]()
        return self._timers

    def _timer_name(self) -> str:
        return self._timer_choice[1]

    @property
    def do_bench(self) -> Callable[..., Any]:
        return self._ensure_timers().full

    def page(self) -> Page:
        """This kernel's page of the book for this platform (loaded on first use)."""
        if self._page is None:
            platform = _fingerprint.platform_fingerprint(self._timer_name())
            pid = _fingerprint.platform_id(platform)
            book = Book.from_env(self._books)
            self._page = book.open(
                self._kernel_identity(), {**platform, "id": pid}, _fingerprint.platform_slug(platform), pid
            )
        return self._page

    def _identify(self, config: Any) -> str:
        cid = self._config_ids.get(id(config))
        if cid is None:  # a Space candidate: ids are computed once per config object
            record = config_record(config.kwargs, _compat.config_options(config))
            cid = config_id(record)
            self._config_ids[id(config)] = cid
            self._configs_by_id[cid] = config
            self._records[id(config)] = record
        return cid

    def _candidates(self, kwargs: dict[str, Any]) -> list[Any]:
        """The configs for this call: the declared list, or the Space's feasible configs."""
        if self.space is None:
            return self.configs
        platform = self.page().platform
        named = {**(self.nargs or {}), **kwargs}
        out = []
        for candidate in self.space.candidates(platform=platform, args=named):
            record = config_record(
                {k: v for k, v in candidate.items() if k not in self.space.option_names},
                {k: v for k, v in candidate.items() if k in self.space.option_names},
            )
            cid = config_id(record)
            config = self._space_configs.get(cid)
            if config is None:
                config = self._space_configs[cid] = self.space.to_config(candidate)
            out.append(config)
        if not out:
            raise ValueError(
                f"tunebook.autotune: the Space of {self.base_fn.__name__} has no feasible config for "
                "this call "
                f"({', '.join(f'{k}={v!r}' for k, v in named.items() if not hasattr(v, 'dtype'))}); "
                "loosen its constraints or arg_constraints."
            )
        return out

    def _decide(self, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any) -> Any:
        # Configs equal in every launch parameter are one candidate: the first declared.
        by_id: dict[str, Any] = {}
        for c in self.prune_configs(kwargs, self._candidates(kwargs)):
            cid = self._identify(c)
            by_id.setdefault(cid, self._configs_by_id[cid])
        pruned = list(by_id.values())
        if len(pruned) == 1:
            self.cache[key] = pruned[0]
            return pruned[0]
        mode = _settings.mode()
        ids = [self._identify(c) for c in pruned]
        key_text = _fingerprint.canonical_key_text(key)
        page = self.page() if mode != "off" else None
        entry = page.get(key_text) if page is not None else None

        if page is not None:
            missing = [cid for cid in ids if entry is None or cid not in entry.results]
            if missing:
                page.refresh()  # another process (or host, through Redis) may have tuned it meanwhile
                entry = page.get(key_text)
                missing = [cid for cid in ids if entry is None or cid not in entry.results]
            if entry is not None and (not missing or self._search_done(entry, ids)):
                _stats.add("book_hits")
                self._hit_counter[0] += 1
                return self._settle(key, pruned, ids, entry, source="book")
            _stats.add("misses")
            if mode == "serve":
                config = self._fallback(key, pruned, ids, entry, page)
                self._record_miss(key, key_text, pruned, ids, page, args, kwargs, grid)
                return config

        outcome = self._tune(key, key_text, pruned, ids, entry, page, args, kwargs, grid)
        self.bench_time = outcome.seconds
        _stats.add("benchmarked", outcome.measured)
        _stats.add("tuning_seconds", outcome.seconds)
        _stats.add("failures", outcome.failures)
        return self._settle(key, pruned, ids, outcome.entry, source="tuned", benchmarked=outcome.measured)

    def _search_done(self, entry: Entry, ids: list[str]) -> bool:
        """Whether a budgeted search already ran for this key (it need not measure everything)."""
        if self.budget.unlimited and len(ids) <= SMALL_SPACE:
            return False
        measured = sum(1 for cid in ids if cid in entry.results)
        cap = self._effective_budget(len(ids)).max_configs
        # A search ends with a choice; with a time budget alone (no cap on configs) that
        # choice is final, or every new process would spend its time budget again.
        return bool(entry.chosen) and (cap is None or measured >= min(cap, len(ids)))

    def _effective_budget(self, n: int) -> Budget:
        """The user's budget, or for a large space a default: 10% of it, 64 to 500 configs."""
        if not self.budget.unlimited or n <= SMALL_SPACE:
            return self.budget
        return Budget(max_configs=min(n, max(SMALL_SPACE, min(500, n // 10))))

    def _hints(self, key: tuple[Any, ...], ids: list[str], page: Page | None) -> list[int]:
        """Candidate indices of the winners of the nearest remembered keys, nearest first."""
        if page is None:
            return []
        index = {cid: i for i, cid in enumerate(ids)}
        hints: list[int] = []
        for e in [*_nearest_entries(key, page.entries.values())[:4], *page.sibling_winners(key)]:
            best = e.best(ids)
            if best is not None and index[best] not in hints:
                hints.append(index[best])
        return hints

    def _tune(
        self,
        key: tuple[Any, ...],
        key_text: str,
        pruned: list[Any],
        ids: list[str],
        entry: Entry | None,
        page: Page | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grid: Any,
    ) -> Any:
        stored_key = tuple(_json_key(key))
        state = {"seconds": 0.0, "entry": entry}

        def persist(fresh: dict[str, Result], chosen: str, seconds: float) -> Entry:
            stamp = now_iso()
            previous = state["entry"]
            # Carry what is known for the key (e.g. from a shipped read-only book) into the
            # writable book, so that it stands on its own.
            news = Entry(
                key=stored_key,
                results={**(previous.results if previous is not None else {}), **fresh},
                tuning_seconds=seconds - state["seconds"],
                tuned_at=previous.tuned_at if previous is not None and previous.tuned_at else stamp,
                updated_at=stamp,
                tunebook=__version__,
                chosen=chosen,
                first=ids[0],
            )
            state["seconds"] = seconds
            if page is None:  # mode off: remember in this call only
                merged = replace(
                    news.merged_over(previous), chosen=chosen or (previous.chosen if previous else "")
                )
            else:
                merged = page.record(key_text, news)
            state["entry"] = merged
            return merged

        precompile = None
        if not _compat.interpreting() and self.compile_workers > 1:

            def precompile(configs: list[Any]) -> None:
                _compat.precompile(
                    [functools.partial(self._warmup_one, args, kwargs, grid, c) for c in configs],
                    self.compile_workers,
                )

        if self.isolate and page is not None:
            return self._tune_isolated(key, key_text, pruned, ids, page, args, kwargs, grid)
        announce = self._on_candidate
        records = [self._records[id(c)] for c in pruned]
        timers = self._ensure_timers()
        bench = self._checked_bench(args, kwargs, grid, pruned)
        job = KeyTuning(
            configs=pruned,
            ids=ids,
            records=records,
            known=entry,
            timers=timers,
            bench=bench,
            persist=persist,
            is_unexpected=lambda exc: (
                not isinstance(exc, WrongResult) and not _compat.is_unrunnable_config_error(exc)
            ),
            precompile=precompile,
            strategy=self.strategy,
            budget=self._effective_budget(len(pruned)),
            hints=self._hints(key, ids, page),
            seed=self.seed,
            progress=Progress(self.base_fn.__name__, key),
            on_candidate=(
                (lambda i: announce(ids[i], records[i], key_text, _json_key(key)))
                if announce is not None
                else None
            ),
            after_result=(
                (lambda i, result: after(ids[i], result))
                if (after := self._after_result) is not None
                else None
            ),
        )
        try:
            return tune_key(job)
        finally:
            restore = getattr(bench, "restore", None)
            if restore is not None:
                restore()  # the caller's own launch sees its original inputs

    def _checked_bench(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, pruned: list[Any]
    ) -> Callable[[Callable[..., Any], Any], Any]:
        """The benchmark function for a key; with ``check=``, each config's output is first
        compared with the reference config's on the same inputs (a mismatch is a failure)."""
        if self._check is None:
            return lambda timer, cfg: self._bench(timer, args, kwargs, grid, cfg)
        from ._check import OutputCheck

        checker = OutputCheck(args, kwargs, names=self.arg_names, **self._check)
        state: dict[str, Any] = {"reference": None, "checked": set()}

        def run_once(config: Any) -> None:
            self._run_once(args, kwargs, grid, config)

        def ensure_reference() -> None:
            if state["reference"] is not None:
                return
            for candidate in pruned:  # the first config that runs is the reference
                try:
                    checker.reference(lambda c=candidate: run_once(c))
                except Exception:  # it fails again when measured, and is recorded then
                    continue
                state["reference"] = candidate
                return
            state["reference"] = False

        def bench(timer: Callable[..., Any], cfg: Any) -> Any:
            ensure_reference()
            if state["reference"] is not False and id(cfg) not in state["checked"]:
                state["checked"].add(id(cfg))
                reason = checker.check(lambda: run_once(cfg))
                if reason is not None:
                    raise WrongResult(reason)
            return self._bench(timer, args, kwargs, grid, cfg)

        bench.restore = checker.restore  # type: ignore[attr-defined]
        return bench

    def _run_once(self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, config: Any) -> None:
        """One launch of ``config`` for result checking: no restore_value post_hook, which would
        undo the very output that is being compared (the check restores inputs itself)."""
        current = dict(kwargs, **config.all_kwargs())
        full_nargs = {**(self.nargs or {}), **current}
        if config.pre_hook:
            config.pre_hook(full_nargs)
        if self.user_defined_pre_hook:
            self.pre_hook(full_nargs)
        else:
            self.pre_hook(full_nargs, reset_only=True)
        self.fn.run(*args, grid=grid, warmup=False, **current)
        if self.user_defined_post_hook:
            self.post_hook(full_nargs, exception=None)

    def _tune_isolated(
        self,
        key: tuple[Any, ...],
        key_text: str,
        pruned: list[Any],
        ids: list[str],
        page: Page,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grid: Any,
    ) -> Any:
        """Tune this key in a worker process: a config that crashes or hangs takes down only
        the worker, is recorded as failed, and the worker is restarted."""
        module, attr = self._import_path()
        grids = _calls.evaluate_grids(grid, self.nargs or {}, kwargs, dict(zip(ids, pruned)))
        job = {
            "module": module,
            "attr": attr,
            "key_text": key_text,
            "call": _calls.describe_call(args, kwargs, grids),
            "key": dict(zip([str(k) for k in self.keys], key)),
        }
        from . import _worker  # only isolation needs it

        devices = _compat.current_device_ids()
        start = time.perf_counter()
        results: dict[str, Result] = {}

        def collect(slot: int, event: dict[str, Any]) -> None:
            if event.get("event") == "result" and event.get("key_text") == key_text:
                with contextlib.suppress(BookFormatError, KeyError):
                    results[event["cid"]] = Result.from_json(event["result"], "worker result")

        reports = _worker.run_jobs(
            [job],
            lambda event, reason: record_crash(
                page, event["key_text"], event["key"], event["cid"], event["config"], reason
            ),
            timeout_s=self.isolate_timeout,
            devices=devices,
            on_event=collect,
        )
        report = reports[0]
        page.refresh(force=True)
        # The worker's results, also when it could not write them (a read-only book): kept
        # in this process's page, written if this process can.
        if results:
            page.record(key_text, Entry(key=tuple(_json_key(key)), results=results, updated_at=now_iso()))
        entry = page.get(key_text)
        if entry is None or entry.best(ids) is None:
            raise RuntimeError(
                f"tunebook: isolated tuning of {self.base_fn.__name__} key {list(key)} found no config "
                f"that runs: {report.reason or 'every config failed'}; `tunebook show` lists each "
                "config's reason"
            )
        return Outcome(entry, report.benchmarked, len(report.crashed), time.perf_counter() - start)

    def _import_path(self) -> tuple[str, str]:
        """(module, attribute) under which a worker process can import this kernel."""
        base_module = getattr(self.base_fn, "__module__", None)
        for module_name in dict.fromkeys(m for m in (self._defined_in, base_module) if m and m != "__main__"):
            module = sys.modules.get(module_name)
            for attr, obj in list(vars(module).items()) if module is not None else ():
                # Follow .fn only through Triton's kernel wrappers (heuristics over us).
                inner = obj
                while isinstance(inner, _compat.KernelInterface) and inner is not self:
                    inner = getattr(inner, "fn", None)
                if inner is self:
                    return module_name, attr
        raise ValueError(
            f"tunebook.autotune(isolate=True): {self.base_fn.__name__} must be a global of an importable "
            f"module for a worker process to load it (it was defined in {self._defined_in or '__main__'!r}); "
            "move the kernel into a module, or tune without isolate=True"
        )

    def _identify_meta(self, meta: dict[str, Any]) -> str | None:
        """A config id with the meta-parameters of this launch (to look up a recorded grid).

        A grid callable sees the kernel's parameters, never num_warps/num_stages, so configs
        that differ only in those launch with the same grid: any of them will do.
        """
        if self._meta_index is None or self._meta_index[2] != len(self._configs_by_id):
            names = tuple(sorted({n for c in self._configs_by_id.values() for n in c.kwargs}))
            index: dict[tuple[Any, ...], str] = {}
            for cid, c in self._configs_by_id.items():
                index.setdefault(tuple(c.kwargs.get(n) for n in names), cid)
            self._meta_index = (names, index, len(self._configs_by_id))
        names, index, _ = self._meta_index
        return index.get(tuple(meta.get(n) for n in names))

    def _warmup_one(self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, config: Any) -> Any:
        return self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())

    def _settle(
        self,
        key: tuple[Any, ...],
        pruned: list[Any],
        ids: list[str],
        entry: Entry,
        *,
        source: str,
        benchmarked: int = 0,
    ) -> Any:
        best = entry.best(ids)
        config = self._configs_by_id[best] if best is not None else pruned[0]
        self.cache[key] = config
        self.configs_timings = {
            cfg: list(entry.results[cid].ms or (math.inf,) * 3) if cid in entry.results else [math.inf] * 3
            for cfg, cid in zip(pruned, ids)
        }
        if source == "tuned":
            # As Triton: reset_to_zero arguments are zeroed after benchmarking, keyword ones too.
            full_nargs = {**(self.nargs or {}), **self._call_kwargs, **config.all_kwargs()}
            self.pre_hook(full_nargs, reset_only=True)
        self._announce(key, config, source, benchmarked, len(pruned))
        return config

    def _bench(
        self, timer: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, config: Any
    ) -> Any:
        conflicts = kwargs.keys() & config.kwargs.keys()
        if conflicts:
            raise ValueError(
                f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}. Make sure that you don't "
                "re-define auto-tuned symbols."
            )
        current = dict(kwargs, **config.all_kwargs())
        full_nargs = {**(self.nargs or {}), **current}

        def kernel_call() -> None:
            if config.pre_hook:
                config.pre_hook(full_nargs)
            self.pre_hook(full_nargs)
            try:
                self.fn.run(*args, grid=grid, warmup=False, **current)
            except Exception as exc:
                try:
                    self.post_hook(full_nargs, exception=exc)
                finally:
                    raise
            self.post_hook(full_nargs, exception=None)

        return timer(kernel_call, quantiles=QUANTILES)

    def _fallback(
        self,
        key: tuple[Any, ...],
        pruned: list[Any],
        ids: list[str],
        entry: Entry | None,
        page: Page,
    ) -> Any:
        """``serve`` mode: a config with zero benchmarking.

        In order: the user's ``fallback=``; the best of the configs already measured for this
        key; the winner of the nearest remembered key; the first config.
        """
        self._fallback_keys.add(key)
        self._fallback_counter[0] += 1
        chosen: str | None = None
        how = ""
        if self.fallback is not None:
            picked = self.fallback(key, list(pruned))
            if picked is not None:
                chosen = next((cid for cid, c in zip(ids, pruned) if c is picked), None)
                if chosen is None:
                    record = config_record(picked.kwargs, _compat.config_options(picked))
                    chosen = config_id(record) if config_id(record) in ids else None
                if chosen is None:
                    log.warning(
                        "tunebook: %s: fallback= returned %s, which is not one of the kernel's configs "
                        "for this call; ignoring it",
                        self.base_fn.__name__,
                        picked,
                    )
                else:
                    how = "the config chosen by fallback="
        if chosen is None and entry is not None:
            chosen = entry.best(ids)
            how = "the best of its own partial results"
        if chosen is None:
            neighbour = next((e for e in _nearest_entries(key, page.entries.values()) if e.best(ids)), None)
            if neighbour is not None:
                chosen = neighbour.best(ids)
                how = f"the winner of the nearest remembered key {list(neighbour.key)}"
        config = self._configs_by_id[chosen] if chosen is not None else pruned[0]
        if chosen is None:
            how = "the first config (nothing remembered for this kernel on this platform)"
        log.warning(
            "tunebook: %s key %s is not in the book; serving %s without benchmarking (TUNEBOOK_MODE=serve)",
            self.base_fn.__name__,
            list(key),
            how,
        )
        self.cache[key] = config
        return config

    def _record_miss(
        self,
        key: tuple[Any, ...],
        key_text: str,
        pruned: list[Any],
        ids: list[str],
        page: Page,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grid: Any,
    ) -> None:
        """Remember the miss and how to replay the call, off the request path."""
        grids = _calls.evaluate_grids(grid, self.nargs or {}, kwargs, dict(zip(ids, pruned)))
        call = _calls.describe_call(args, kwargs, grids)
        if _calls.validate(call, "call") is not None:
            call = None  # e.g. a scalar the JSON schema cannot hold: count the miss anyway
        entry = Entry(
            key=tuple(_json_key(key)), misses=1, call=call, updated_at=now_iso(), tunebook=__version__
        )
        _misses.submit(page, key_text, entry)

    def _announce(self, key: tuple[Any, ...], config: Any, source: str, benchmarked: int, total: int) -> None:
        if not _settings.print_autotuning() or key in self._announced:
            return
        self._announced.add(key)
        name = self.base_fn.__name__
        if source == "book":
            print(
                f"tunebook: {name} key {key}: best config {config} remembered in the book; "
                f"0 of {total} configs benchmarked"
            )
        else:
            print(
                f"Triton autotuning for function {name},\nwith key as {key},\n"
                f"finished after {self.bench_time:.2f}s,\nbest config selected: {config};\n"
                f"tunebook: {benchmarked} of {total} configs benchmarked, the rest remembered in the book"
            )


class WrongResult(Exception):
    """A candidate config computed a different answer than the reference config."""


def record_crash(
    page: Page, key_text: str, key: Sequence[Any], cid: str, record: dict[str, Any], reason: str
) -> None:
    """Persist that config ``cid`` took its worker down for this key (never retried)."""
    result = Result(record, None, reason[:2000], now_iso())
    page.record(key_text, Entry(key=tuple(_json_key(key)), results={cid: result}, updated_at=now_iso()))


def _json_key(key: Sequence[Any]) -> list[Any]:
    return [_fingerprint.json_key_value(v) for v in key]


def _constant_key(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return ()


def _nearest_entries(key: Sequence[Any], entries: Iterable[Entry]) -> list[Entry]:
    """Other remembered keys comparable with ``key`` (same dtypes and non-numeric values),
    nearest first: log-distance over the numeric values, ties in book order."""
    own = _json_key(key)
    ranked = [
        (d, n, e)
        for n, e in enumerate(entries)
        if list(e.key) != own and (d := _key_distance(key, e.key)) < math.inf
    ]
    return [e for _, _, e in sorted(ranked, key=lambda t: t[:2])]


def _key_distance(a: Sequence[Any], b: Sequence[Any]) -> float:
    if len(a) != len(b):
        return math.inf
    total = 0.0
    for x, y in zip(a, b):
        x = _fingerprint.json_key_value(x)
        numeric = isinstance(x, int | float) and isinstance(y, int | float)
        if numeric and not isinstance(x, bool) and not isinstance(y, bool):
            total += abs(math.log2(abs(x) + 1) - math.log2(abs(y) + 1))
        elif x != y:
            return math.inf
    return total


def autotune(
    configs: Sequence[Any],
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
    *,
    books: Sequence[str | Path] = (),
    name: str | None = None,
    strategy: str = "auto",
    max_configs: int | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    compile_workers: int | None = None,
    adaptive: bool = True,
    fallback: Callable[[tuple[Any, ...], list[Any]], Any] | None = None,
    inputs: Callable[[dict[str, Any]], Any] | None = None,
    isolate: bool = False,
    isolate_timeout: float = 300.0,
    check: bool | dict[str, Any] = False,
) -> Callable[[Any], Autotuner]:
    """Decorator for auto-tuning a ``triton.jit`` function, remembering results in a book.

    Takes everything ``triton.autotune`` takes, in the same order, and behaves the same,
    except that every measured (config, timing) is persisted and a later process with the
    same kernel, platform and key benchmarks nothing.

    Keyword-only additions:

    * ``books`` — read-only book directories shipped with the application, consulted after
      ``TUNEBOOK_DIR`` and before ``TUNEBOOK_PATH``.
    * ``name`` — the kernel's name in the book (default: the function's qualified name).
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

    ``configs`` may also be a :class:`tunebook.Space`, a declarative config space, and a
    ``key`` name may be a :func:`tunebook.bucket` to bucket its values.

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
            books=books,
            name=name,
            strategy=strategy,
            max_configs=max_configs,
            max_seconds=max_seconds,
            seed=seed,
            compile_workers=compile_workers,
            adaptive=adaptive,
            fallback=fallback,
            inputs=inputs,
            isolate=isolate,
            isolate_timeout=isolate_timeout,
            check=check,
        )
        # Where a worker process can import this kernel from (isolate=True, tunebook tune).
        tuner._defined_in = sys._getframe(1).f_globals.get("__name__")
        return tuner

    return decorator
