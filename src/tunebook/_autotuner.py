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
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _bench, _compat, _fingerprint, _launch, _settings, _stats
from ._book import Book, Entry, KernelIdentity, Page, Result, config_id, config_record, now_iso

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
    ) -> None:
        self.configs: list[Any] = (
            list(configs) if configs else [_compat.Config({}, num_warps=4, num_stages=3)]
        )
        self.keys = list(key)
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

        # Configs as the book names them; equal ids get a #n suffix so each stays distinct.
        self._config_ids: dict[int, str] = {}
        self._configs_by_id: dict[str, Any] = {}
        for cfg in self.configs:
            record = config_record(cfg.kwargs, _compat.config_options(cfg))
            cid = config_id(record)
            n = 1
            while cid in self._configs_by_id:
                n += 1
                cid = f"{config_id(record)}#{n}"
            self._config_ids[id(cfg)] = cid
            self._configs_by_id[cid] = cfg
        self._records = {id(c): config_record(c.kwargs, _compat.config_options(c)) for c in self.configs}

        self._lock = threading.RLock()
        self._page: Page | None = None
        self._timer: Callable[..., Any] | None = None
        self._timer_id: str | None = None
        # Hit-path tables: key tuple -> (launcher, config, the counter the call bumps: hits
        # or fallbacks, launch kwargs). _fast_pos serves calls with positional arguments
        # only (the common case, keyed by index); _fast serves any call (keyed by binding).
        self._fast: dict[tuple[Any, ...], _FastEntry] = {}
        self._fast_pos: dict[tuple[Any, ...], _FastEntry] = {}
        self._bind_key: Callable[..., tuple[Any, ...]] | None = None
        self._pos_key: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
        self._pos_key_tried = False
        self._launchers: dict[int, _launch.Launcher] = {}
        self._hit_counter = [0]
        self._fallback_counter = [0]
        self._fallback_keys: set[tuple[Any, ...]] = set()
        self._announced: set[tuple[Any, ...]] = set()
        _stats.register(self)
        if len(self.configs) == 1:
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
                        return launcher(self.fn.run, args, grid, False)
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
        if kwargs:
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config_kwargs)
        return launcher(self.fn.run, args, grid, warmup)

    def _slow_run(self, args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any, warmup: bool) -> Any:
        with self._lock:
            self.nargs = dict(zip(self.arg_names, args))
            try:
                key = _fingerprint.canonical_key(self.arg_names, self.keys, args, kwargs)
                if len(self.configs) == 1:
                    config = self.configs[0]
                else:
                    config = self.cache.get(key)
                    if config is None:
                        config = self._decide(key, args, kwargs, grid)
                    else:
                        self._counter_for(key)[0] += 1
                    self._remember_fast(args, kwargs, key, config)
                self.best_config = config
                config_kwargs = config.all_kwargs()
                conflicts = kwargs.keys() & config.kwargs.keys()
                if conflicts:
                    raise ValueError(
                        f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}. Make sure that you "
                        "don't re-define auto-tuned symbols."
                    )
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config_kwargs})
            finally:
                self.nargs = None
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config_kwargs)

    def _counter_for(self, key: tuple[Any, ...]) -> list[int]:
        return self._fallback_counter if key in self._fallback_keys else self._hit_counter

    def _launcher(self, config: Any) -> _launch.Launcher:
        launcher = self._launchers.get(id(config))
        if launcher is None:
            launcher = self._launchers[id(config)] = _launch.config_launcher(config.all_kwargs())
        return launcher

    def _remember_fast(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: tuple[Any, ...], config: Any
    ) -> None:
        entry = (self._launcher(config), config, self._counter_for(key), config.all_kwargs())
        if self._bind_key is None:
            self._bind_key = _launch.binding_key(self.arg_names, self.keys, args, kwargs)
        # A call whose argument kinds differ from those the key functions were generated
        # for (a tensor where there was None, ...) raises here and stays on the slow path.
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
            return [self.fn.warmup(*args, **kwargs, **cfg.all_kwargs()) for cfg in self.prune_configs(kwargs)]
        finally:
            self.nargs = None

    # ------------------------------------------------------------------------ pruning

    def prune_configs(self, kwargs: dict[str, Any]) -> list[Any]:
        """Triton's pruning: ``early_config_prune``, then the top-k of ``perf_model``."""
        pruned = self.configs
        nargs = self.nargs or {}
        if self.early_config_prune:
            pruned = self.early_config_prune(self.configs, nargs, **kwargs)
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
        return KernelIdentity(name, _fingerprint.kernel_hash(self.fn), tuple(self.keys))

    def _ensure_timer(self) -> tuple[Callable[..., Any], str]:
        if self._timer is None or self._timer_id is None:
            factory, timer_id = _bench.choose_timer(
                self._user_do_bench, self.num_warmups, self.num_reps, self.use_cuda_graph
            )
            self._timer, self._timer_id = factory(), timer_id
        return self._timer, self._timer_id

    @property
    def do_bench(self) -> Callable[..., Any]:
        return self._ensure_timer()[0]

    def page(self) -> Page:
        """This kernel's page of the book for this platform (loaded on first use)."""
        if self._page is None:
            _, timer_id = self._ensure_timer()
            platform = _fingerprint.platform_fingerprint(timer_id)
            pid = _fingerprint.platform_id(platform)
            book = Book.from_env(self._books)
            self._page = book.open(
                self._kernel_identity(), {**platform, "id": pid}, _fingerprint.platform_slug(platform), pid
            )
        return self._page

    def _decide(self, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any], grid: Any) -> Any:
        pruned = self.prune_configs(kwargs)
        if len(pruned) == 1:
            self.cache[key] = pruned[0]
            return pruned[0]
        mode = _settings.mode()
        ids = [self._config_ids[id(c)] for c in pruned]
        key_text = _fingerprint.canonical_key_text(key)

        if mode == "off":
            entry = self._measure(pruned, ids, args, kwargs, grid, key, known=None)
            return self._settle(key, pruned, ids, entry, source="tuned")

        page = self.page()
        entry = page.get(key_text)
        missing = [i for i, cid in enumerate(ids) if entry is None or cid not in entry.results]
        if missing and mode == "tune":
            page.refresh()  # another process may have tuned this key meanwhile
            entry = page.get(key_text)
            missing = [i for i, cid in enumerate(ids) if entry is None or cid not in entry.results]
        if not missing and entry is not None:
            _stats.add("book_hits")
            self._hit_counter[0] += 1
            return self._settle(key, pruned, ids, entry, source="book")

        _stats.add("misses")
        if mode == "serve":
            return self._fallback(key, key_text, pruned, ids, entry, page)

        todo = [pruned[i] for i in missing]
        todo_ids = [ids[i] for i in missing]
        measured = self._measure(todo, todo_ids, args, kwargs, grid, key, known=entry)
        stored = page.record(key_text, measured)
        return self._settle(key, pruned, ids, stored, source="tuned", benchmarked=len(todo))

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
            full_nargs = {**(self.nargs or {}), **config.all_kwargs()}
            self.pre_hook(full_nargs, reset_only=True)
        self._announce(key, config, source, benchmarked, len(pruned))
        return config

    def _measure(
        self,
        configs: list[Any],
        ids: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grid: Any,
        key: tuple[Any, ...],
        known: Entry | None,
    ) -> Entry:
        """Benchmark ``configs`` and return ``known`` plus the new results."""
        timer, _ = self._ensure_timer()
        results = dict(known.results) if known is not None else {}
        fresh: dict[str, Result] = {}
        unexpected: list[BaseException] = []
        start = time.perf_counter()
        for cfg, cid in zip(configs, ids):
            try:
                ms = _bench.as_triple(self._bench(timer, args, kwargs, grid, cfg))
                fresh[cid] = Result(self._records[id(cfg)], ms, None, now_iso())
            except Exception as exc:  # a config that cannot run is data, not a crash
                reason = f"{type(exc).__name__}: {exc}".strip()[:2000]
                if not _compat.is_unrunnable_config_error(exc):
                    unexpected.append(exc)
                log.info("tunebook: %s config %s failed: %s", self.base_fn.__name__, cid, reason)
                fresh[cid] = Result(self._records[id(cfg)], None, reason, now_iso())
        elapsed = time.perf_counter() - start
        self.bench_time = elapsed
        _stats.add("benchmarked", len(configs))
        _stats.add("tuning_seconds", elapsed)
        _stats.add("failures", sum(1 for r in fresh.values() if not r.ok))
        if unexpected and not any(r.ok for r in (*results.values(), *fresh.values())):
            # Every config failed and not for resource reasons: a bug in the call, not in a
            # config. Surface it and remember nothing, so fixing the call is enough.
            raise unexpected[0]
        results.update(fresh)
        stamp = now_iso()
        return Entry(
            key=tuple(_fingerprint.json_key_value(v) for v in key),
            results=results,
            tuning_seconds=elapsed,
            tuned_at=known.tuned_at if known is not None and known.tuned_at else stamp,
            updated_at=stamp,
            tunebook=__version__,
        )

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

        return timer(kernel_call, quantiles=_bench.QUANTILES)

    def _fallback(
        self,
        key: tuple[Any, ...],
        key_text: str,
        pruned: list[Any],
        ids: list[str],
        entry: Entry | None,
        page: Page,
    ) -> Any:
        """``serve`` mode: a config with zero benchmarking, from the nearest remembered key."""
        self._fallback_keys.add(key)
        self._fallback_counter[0] += 1
        chosen = entry.best(ids) if entry is not None else None
        how = "its own partial results"
        if chosen is None:
            neighbour = _nearest_entry(key, page.entries.values(), ids)
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


def _constant_key(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return ()


def _nearest_entry(key: tuple[Any, ...], entries: Any, ids: list[str]) -> Entry | None:
    """The remembered entry closest to ``key``: log-distance over numbers, exact elsewhere."""
    best, best_d = None, math.inf
    for entry in entries:
        d = _key_distance(key, entry.key)
        if d < best_d and entry.best(ids) is not None:
            best, best_d = entry, d
    return best


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
) -> Callable[[Any], Autotuner]:
    """Decorator for auto-tuning a ``triton.jit`` function, remembering results in a book.

    Takes everything ``triton.autotune`` takes, in the same order, and behaves the same,
    except that every measured (config, timing) is persisted and a later process with the
    same kernel, platform and key benchmarks nothing.

    Keyword-only additions:

    * ``books`` — read-only book directories shipped with the application, consulted after
      ``TUNEBOOK_DIR`` and before ``TUNEBOOK_PATH``.
    * ``name`` — the kernel's name in the book (default: the function's qualified name).

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
        return Autotuner(
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
        )

    return decorator
