"""A remembered config's launch without ``JITFunction.run``: the hit path's last 10%.

A hit runs Triton's own launch, ``JITFunction.run``, after tunebook's lookup. That function
does, on every call, work whose result cannot change between two calls of one config:
it writes the debug and instrumentation knobs into the options, renders the options dict
as text for the kernel-cache key (``compute_cache_key`` builds ``str(options)`` each
time), walks the pre-run hooks, and builds launch metadata for the profiler hooks,
which on Triton 3.5-3.9 it does even with no hook installed (the hook chains are never
``None``, so ``CompiledKernel.launch_metadata`` allocates a ``LazyDict`` and the C launcher
calls two empty Python hook chains). For a vector add on an H200 that is a tenth of
the host time of a launch.

``direct_run`` builds, per (kernel, config), a launcher that does only what can change:

* the **binder** (Triton's own generated function) for this call's specialization: the
  argument types and the 16-byte alignment and divisibility of pointers and integers;
* a dict lookup of the compiled kernel by (device, the knobs ``run`` reads, the
  specialization): the options are the config's, fixed for the launcher;
* the **grid**, the **current stream**, and Triton's C launcher (``CompiledKernel.run``)
  with no launch metadata and no hooks.

It falls back to ``JITFunction.run`` itself (which compiles, checks, launches and raises as
Triton does) whenever something would make the two differ: the first call of a
specialization, a launch hook installed (a profiler such as Proton), a pre-run hook, an
``add_stages_inspection_hook`` (3.7+), a compile in flight (3.5's async compile), a
global the kernel reads that changed, or Triton's caches replaced. The kernel it
launches is always the one ``JITFunction.run`` compiled and cached for the same
specialization and options.

It mirrors ``JITFunction.run`` of Triton 3.4-3.9 (read for each release: the options it
adds, the launcher's argument order); on other releases, on the interpreter, on a
``triton.heuristics`` wrapper, where a tool has replaced or wrapped ``JITFunction.run`` (a
tracer, a sanitizer: when the launcher is built) or with ``TUNEBOOK_DIRECT_LAUNCH=0`` the hit
calls ``JITFunction.run`` as before.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping
from typing import Any

import triton
from triton.runtime.jit import JITFunction

from .. import _settings

DirectLaunch = Callable[[tuple[Any, ...], Any], Any]

# The releases whose JITFunction.run this module mirrors.
SUPPORTED = ((3, 4), (3, 9))

# The knobs JITFunction.run writes into the launch options on every call, as
# (knobs group, name): a kernel compiled under other values is another kernel, so their
# values are part of the launcher's own cache key. Those a release lacks are skipped.
_RUN_KNOBS = (
    ("runtime", "debug"),
    ("compilation", "instrumentation_mode"),  # 3.6+
    ("compilation", "fpsan_homomorphic_casts"),  # 3.9+
)


def _release() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def available(fn: Any) -> str | None:
    """None when ``fn``'s hits can launch directly, else why not (for ``explain``-style text)."""
    if not _settings.direct_launch():
        return "TUNEBOOK_DIRECT_LAUNCH=0"
    if type(fn) is not JITFunction:
        kind = type(fn).__name__
        return f"the kernel is of type {kind}, not Triton's JITFunction (the interpreter, a wrapper)"
    run = JITFunction.run
    wrapped = hasattr(run, "__wrapped__") or "run" in vars(fn)
    if wrapped or (run.__module__, run.__qualname__) != ("triton.runtime.jit", "JITFunction.run"):
        # A tool that wraps Triton's launch (a tracer, a sanitizer) is not bypassed.
        return "JITFunction.run is replaced or wrapped in this process"
    if not SUPPORTED[0] <= _release() <= SUPPORTED[1]:
        return f"Triton {triton.__version__} is newer than the releases it mirrors (3.4-3.9)"
    return None


def _knob_expressions() -> list[str]:
    from triton import knobs

    return [f"{group}.{name}" for group, name in _RUN_KNOBS if hasattr(getattr(knobs, group), name)]


def direct_run(fn: Any, run: Callable[..., Any], config_kwargs: Mapping[str, Any]) -> DirectLaunch | None:
    """``f(args, grid)`` launching ``fn`` with ``config_kwargs``, or None where unavailable.

    ``run`` is ``fn.run`` (the fallback); ``config_kwargs`` the launch keywords the hit
    would pass it (meta-parameters and launch options).
    """
    names = list(config_kwargs)
    reserved = {"args", "grid", "device", "fn", "run", "first", "state"}
    if available(fn) is not None or not all(
        n.isidentifier() and not keyword.iskeyword(n) and n not in reserved for n in names
    ):
        return None
    from triton import knobs
    from triton.runtime.driver import driver

    try:
        get_device, get_stream = driver.active.get_current_device, driver.active.get_current_stream
    except Exception:  # no GPU driver in this process: the hit keeps Triton's launch
        return None
    runtime, compilation = knobs.runtime, knobs.compilation
    chain = hasattr(runtime.launch_enter_hook, "calls")  # 3.5+: HookChain; 3.4: None or a callable
    busy = [
        "fn.pre_run_hooks",
        *(
            [f"runtime.{h}.calls" for h in ("launch_enter_hook", "launch_exit_hook")]
            if chain
            else [f"runtime.{h} is not None" for h in ("launch_enter_hook", "launch_exit_hook")]
        ),
    ]
    if hasattr(runtime, "add_stages_inspection_hook"):
        busy.append("runtime.add_stages_inspection_hook is not None")
    values = [f"_v{i}" for i in range(len(names))]
    keywords = ", ".join(f"{n}={v}" for n, v in zip(names, values))
    knob_values = "".join(e + ", " for e in _knob_expressions())
    # state: [fn.device_caches when the launcher last looked, {device: binder},
    # {(device, knobs..., *specialization): (launch, function, packed metadata, kernel)}]
    params = ", ".join(values) or "_unused=None"
    src = f"""
def factory(fn, run, runtime, compilation, get_device, get_stream, state, {params}):
    def first(args, grid, device):
        # Triton's own launch compiles, checks and launches; then remember what it launched.
        kernel = run(*args, grid=grid, warmup=False, {keywords})
        if kernel is None or hasattr(kernel, "result"):  # a skipped or an asynchronous compile
            return kernel
        if state[0] is not fn.device_caches:
            state[0] = fn.device_caches
            state[1].clear()
            state[2].clear()
        binder = state[1][device] = fn.device_caches[device][-1]
        bound, spec, _ = binder(*args, {keywords})
        launch = kernel.run
        try:
            state[2][(device, {knob_values}*spec)] = (launch, kernel.function, kernel.packed_metadata, kernel)
        except TypeError:  # an unhashable specialization: Triton's own launch every time
            pass
        return kernel

    binders, kernels = state[1], state[2]

    def launch(args, grid):
        if {" or ".join(busy)}:  # hooks to honour: Triton's own launch
            return run(*args, grid=grid, warmup=False, {keywords})
        device = get_device()
        if state[0] is not fn.device_caches:  # Triton's caches replaced (a source update)
            return first(args, grid, device)
        binder = binders.get(device)
        if binder is None:
            return first(args, grid, device)
        bound, spec, _ = binder(*args, {keywords})
        try:
            found = kernels[(device, {knob_values}*spec)]
        except (KeyError, TypeError):
            return first(args, grid, device)
        for (name, _), (val, scope) in fn.used_global_vals.items():
            if scope.get(name, first) != val:
                return first(args, grid, device)  # Triton raises the error that names the global
        if callable(grid):
            grid = grid(bound)
        n = len(grid)
        found[0](grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device),
                 found[1], found[2], None, None, None, *bound.values())
        return found[3]

    return launch
"""
    namespace: dict[str, Any] = {}
    exec(compile(src, "<tunebook direct launch>", "exec"), namespace)
    state: list[Any] = [fn.device_caches, {}, {}]
    return namespace["factory"](
        fn,
        run,
        runtime,
        compilation,
        get_device,
        get_stream,
        state,
        *config_kwargs.values(),
    )
