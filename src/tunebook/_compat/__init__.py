"""The one module that touches Triton's internals.

Triton moves its internals between minor versions (triton-dejavu stopped importing on 3.6
because two private names moved). Everything tunebook needs from Triton beyond the
documented ``triton.jit`` / ``triton.Config`` / ``triton.testing`` surface is reached from
here, so supporting a new Triton release means editing this file alone. Supported: 3.4+.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import platform
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import triton
import triton.runtime.autotuner as _triton_autotuner
from triton.runtime import _allocation
from triton.runtime.jit import JITFunction, KernelInterface

from .. import _settings
from .direct import direct_run

__all__ = [
    "AUTOTUNE_HOMES",
    "CONFIG_OPTION_FIELDS",
    "TRITON_AUTOTUNE",
    "TRITON_TUNING_STEPS",
    "TRITON_VERSION",
    "Config",
    "KernelInterface",
    "TritonAutotuner",
    "async_compile_available",
    "autotuner_settings",
    "base_function",
    "config_options",
    "cudagraph_benchmarker",
    "current_device_ids",
    "current_target",
    "device_identity",
    "direct_run",
    "gpu_context_broken",
    "heuristic_names",
    "interpreting",
    "is_interpreter_collision",
    "is_jit_function",
    "is_unrunnable_config_error",
    "jitted_python_function",
    "kernel_source",
    "launch_option_defaults",
    "local_gpu_ids",
    "precompile",
    "timed_benchmarker",
    "triton_version",
    "unrunnable_config_errors",
]

Config = triton.Config
TRITON_VERSION: str = triton.__version__

# Config fields beyond the kernel's own meta-parameters, in the order this Triton
# release's Config.all_kwargs() emits them (3.4-3.9: num_warps, num_ctas,
# num_stages, maxnreg, ir_override). Read from a live Config so new fields are seen.
CONFIG_OPTION_FIELDS: tuple[str, ...] = tuple(
    name
    for name in inspect.signature(Config.__init__).parameters
    if name not in ("self", "kwargs", "pre_hook")
)


# Triton's Autotuner class and its decorator, as Triton defines them (tunebook.patch replaces
# the decorator under every name it has, and serves the class's instances; see _patch.py).
TritonAutotuner: type = _triton_autotuner.Autotuner
TRITON_AUTOTUNE: Callable[..., Any] = _triton_autotuner.autotune
# The modules that export ``autotune`` (3.4-3.9): ``triton.autotune``, ``triton.runtime.autotune``
# and ``triton.runtime.autotuner.autotune``.
AUTOTUNE_HOMES: tuple[str, ...] = ("triton", "triton.runtime", "triton.runtime.autotuner")
# The methods of Triton's Autotuner that time configs on its own tuning path (3.4-3.9). A
# subclass that overrides one of them tunes in a way tunebook's tuner would not reproduce.
TRITON_TUNING_STEPS: tuple[str, ...] = ("_bench", "check_disk_cache", "do_bench")


def autotuner_settings(tuner: Any) -> dict[str, Any]:
    """The timing and pruning arguments a Triton ``Autotuner`` was built with, read back from
    its attributes (as tunebook's ``Autotuner`` takes them).

    Triton turns ``warmup`` / ``rep`` / ``use_cuda_graph`` into a ``do_bench`` of its own
    (``_do_bench``); that one is left out, since tunebook builds the same timer from them.
    """
    warmup = getattr(tuner, "num_warmups", None)
    rep = getattr(tuner, "num_reps", None)
    graph = bool(getattr(tuner, "use_cuda_graph", False))
    own_timer = warmup is not None or rep is not None or graph
    return {
        "prune_configs_by": {
            "perf_model": getattr(tuner, "perf_model", None),
            "top_k": getattr(tuner, "configs_top_k", 1.0),
            "early_config_prune": getattr(tuner, "early_config_prune", None),
        },
        "warmup": warmup,
        "rep": rep,
        "use_cuda_graph": graph,
        "do_bench": None if own_timer else getattr(tuner, "_do_bench", None),
    }


def triton_version() -> str:
    return TRITON_VERSION


def ensure_allocator(allocator: Callable[[int, int, Any], Any]) -> None:
    """Install ``allocator`` as Triton's launch-time scratch allocator (kernels that build
    tensor descriptors on the device need one) unless one is set already: an application's
    own stays. Triton 3.4 keeps it in a module global, later releases in a ContextVar (so a
    new thread starts without one, and this runs before every such launch)."""
    holder = _allocation._allocator
    current = holder.get() if isinstance(holder, contextvars.ContextVar) else holder
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(allocator)


def interpreting() -> bool:
    """Whether triton.jit builds interpreter functions (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return _settings.interpreting()


@functools.cache
def grid_dependency_control() -> bool:
    """Whether ``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents`` compile: Triton 3.4
    ships them taking ``_builder`` where its code generator passes ``_semantic`` (a
    TypeError at compile time); 3.5 and later take ``_semantic``."""
    try:
        from triton.language.extra.cuda import gdc_wait
    except ImportError:
        return False
    target = getattr(gdc_wait, "__wrapped__", gdc_wait)
    return "_semantic" in inspect.signature(target).parameters


@functools.cache
def _jit_types() -> tuple[type, ...]:
    types: list[type] = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported Triton has it
        pass
    return tuple(types)


def is_jit_function(obj: Any) -> bool:
    """A ``@triton.jit`` function, compiled or interpreted."""
    return isinstance(obj, _jit_types())


def jitted_python_function(obj: Any) -> Callable[..., Any] | None:
    """The Python function behind a jit function, or None if ``obj`` is not one."""
    if is_jit_function(obj):
        fn = getattr(obj, "fn", None)
        if inspect.isfunction(fn):
            return fn
    return None


def base_function(fn: Any) -> Callable[..., Any]:
    """Peel Autotuner / Heuristics / JITFunction layers down to the Python function."""
    seen = 0
    while not inspect.isfunction(fn):
        fn = fn.fn
        seen += 1
        if seen > 64:  # a cycle would be a bug in some wrapper; fail loudly, not forever
            raise TypeError(f"cannot find the Python function inside {fn!r}")
    return fn


def heuristic_names(fn: Any) -> set[str]:
    """Argument names computed by ``triton.heuristics`` layers wrapped around the kernel ``fn``."""
    names: set[str] = set()
    seen = 0
    while not inspect.isfunction(fn) and seen < 64:
        values = getattr(fn, "values", None)
        if isinstance(values, dict):
            names.update(str(k) for k in values)
        fn = getattr(fn, "fn", None)
        seen += 1
    return names


def config_options(config: Any) -> dict[str, Any]:
    """The Config's compiler options (num_warps, num_stages, ...), Nones left out."""
    return {
        name: getattr(config, name)
        for name in CONFIG_OPTION_FIELDS
        if getattr(config, name, None) is not None
    }


def unrunnable_config_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this config cannot run here", which Triton's autotuner skips."""
    from triton.compiler.errors import CompilationError, CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources

    errors: list[type[BaseException]] = [OutOfResources, CompileTimeAssertionFailure, CompilationError]
    try:
        from triton.runtime.errors import PTXASError

        errors.append(PTXASError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def is_config_specific_error(exc: BaseException) -> bool:
    """Whether a launch failed for its config rather than for the kernel, before anything
    ran: the config needs more shared memory or registers than the GPU has, or fails a
    ``tl.static_assert`` on its meta-parameters (a ``CompilationError`` of any other kind
    fails every config). Under the interpreter a failed ``tl.static_assert`` is an
    ``InterpreterError`` caused by an ``AssertionError``; the interpreter has no resources
    to run out of."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources

    errors: list[type[BaseException]] = [OutOfResources, CompileTimeAssertionFailure]
    try:
        from triton.runtime.errors import PTXASError

        errors.append(PTXASError)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, tuple(errors)):
        return True
    if interpreting():
        from triton.runtime import errors as runtime_errors

        wrapper = getattr(runtime_errors, "InterpreterError", None)
        return wrapper is not None and isinstance(exc, wrapper) and isinstance(exc.__cause__, AssertionError)
    return False


def is_unrunnable_config_error(exc: BaseException) -> bool:
    """Whether a config failed with one of the backend's errors for a config that cannot run
    (``unrunnable_config_errors``), or with the interpreter's failed ``tl.static_assert``
    (``is_config_specific_error``), which is the config's as much as on a GPU."""
    return isinstance(exc, unrunnable_config_errors()) or is_config_specific_error(exc)


# What a launch on Triton's interpreter meets when another thread's launch ran at the same time:
# the interpreter patches triton.language and keeps the grid in one module-wide builder, so a
# launch that ends first puts the language back as it is outside a kernel (every tl call then
# raises the error of a call outside @triton.jit), or moves the grid under the other's feet.
# The same texts in Triton 3.4 to 3.9 (language/core.py, runtime/interpreter.py).
_INTERPRETER_COLLISIONS = (
    "`_semantic` argument must be provided outside of JIT functions",
    "x >= grid_dim[0]",
    "y >= grid_dim[1]",
    "z >= grid_dim[2]",
    "grid_idx is None",
)


def is_interpreter_collision(exc: BaseException) -> bool:
    """Whether ``exc`` is what the interpreter raises when two threads launch at once: a failure
    of the moment, not of the config (the same launch alone runs)."""
    from triton.runtime.errors import InterpreterError

    if not interpreting() or not isinstance(exc, InterpreterError):
        return False
    text = f"{exc} {exc.__cause__ or ''}"
    return any(signature in text for signature in _INTERPRETER_COLLISIONS)


def cudagraph_benchmarker(rep: int | None) -> Callable[..., Any]:
    from triton.testing import do_bench_cudagraph

    def bench(kernel_call: Callable[[], Any], quantiles: Any) -> Any:
        return do_bench_cudagraph(kernel_call, rep=rep if rep is not None else 100, quantiles=quantiles)

    return bench


def timed_benchmarker(warmup: int | None, rep: int | None) -> Callable[..., Any]:
    from triton.testing import do_bench

    def bench(kernel_call: Callable[[], Any], quantiles: Any) -> Any:
        return do_bench(
            kernel_call,
            warmup=warmup if warmup is not None else 25,
            rep=rep if rep is not None else 100,
            quantiles=quantiles,
        )

    return bench


def device_identity() -> dict[str, Any]:
    """Who is computing: enough to tell an H100 PCIe from an H100 SXM, or sm_80 from gfx942.

    Under the interpreter the "device" is this CPU; interpreter timings say nothing about
    any GPU, so they live under their own platform.
    """
    if interpreting():
        return {
            "backend": "interpreter",
            "device": platform.processor() or platform.machine() or "cpu",
            "arch": platform.machine(),
            "runtime": f"python {sys.version_info.major}.{sys.version_info.minor}",
        }
    target = current_target()
    backend = str(target.backend)
    arch = str(target.arch)
    ident: dict[str, Any] = {"backend": backend, "device": "unknown", "arch": arch, "runtime": "unknown"}
    try:  # torch names the device; Triton's driver does not
        import torch

        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        ident["device"] = props.name
        ident["sm_count"] = props.multi_processor_count
        if backend == "hip":
            ident["runtime"] = f"rocm {torch.version.hip}"
            ident["arch"] = getattr(props, "gcnArchName", arch)
        else:
            ident["runtime"] = f"cuda {torch.version.cuda}"
    except Exception:  # pragma: no cover - a GPU without torch: keep what the driver told
        pass
    return ident


def current_target() -> Any:
    """The active GPU's target (backend, arch, warp_size), from Triton's driver."""
    from triton.runtime.driver import driver

    return driver.active.get_current_target()


_OPTION_DEFAULTS: dict[str, Any] | None = None


def launch_option_defaults() -> dict[str, Any]:
    """The active backend's own defaults for num_warps / num_stages / num_ctas.

    A launch option equal to the backend's default can be left out of the launch: the JIT
    derives the same options (and so the same compiled kernel) with less work per call.
    """
    global _OPTION_DEFAULTS
    if _OPTION_DEFAULTS is None:
        defaults: dict[str, Any] = {"num_ctas": 1}  # every backend of 3.4-3.9
        if not interpreting():
            try:
                from triton.compiler.compiler import make_backend

                options = make_backend(current_target()).parse_options({})
                defaults = {
                    name: getattr(options, name)
                    for name in ("num_warps", "num_stages", "num_ctas")
                    if isinstance(getattr(options, name, None), int)
                }
            except Exception:  # a backend we cannot ask: keep the one default we know
                pass
        _OPTION_DEFAULTS = defaults
    return _OPTION_DEFAULTS


# Errors after which a CUDA context cannot launch anything again (they are "sticky").
_STICKY_GPU_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "an illegal address",
)


def is_sticky_gpu_error(text: str) -> bool:
    """Whether an error's text says the launch left the CUDA context unusable."""
    return any(p in text.lower() for p in _STICKY_GPU_ERRORS)


def gpu_context_broken(error: BaseException | None = None) -> str | None:
    """Why this process's GPU context can no longer run kernels, or None if it can."""
    if error is not None and is_sticky_gpu_error(str(error)):
        return str(error)
    if interpreting():
        return None
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.empty(1, device="cuda").add_(1)
            torch.cuda.synchronize()
    except Exception as exc:  # the probe itself fails: the context is gone
        return f"{type(exc).__name__}: {exc}"
    return None


def _visible_devices() -> list[str]:
    return [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def local_gpu_ids() -> list[str]:
    """Every GPU of this machine this process may use, as CUDA_VISIBLE_DEVICES names them
    (one worker each in ``tunebook tune``); none under the interpreter."""
    if interpreting():
        return []
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return []
    visible = _visible_devices()
    return [visible[i] if i < len(visible) else str(i) for i in range(count)]


def current_device_ids() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for a worker that must use the GPU this process is using."""
    if interpreting():
        return None
    try:
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            # Indices are relative to this process's own CUDA_VISIBLE_DEVICES, if it has one.
            visible = _visible_devices()
            return [visible[index] if index < len(visible) else str(index)]
    except Exception:  # pragma: no cover - no torch or no driver
        pass
    return None


def device_models() -> list[tuple[Any, ...]]:
    """What sets each GPU this process sees apart as a platform (its name, compute
    capability or gfx arch, SM count), by device index; [] under the interpreter or where
    torch cannot tell. ``_devices.py`` asks once per process."""
    if interpreting():
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        models: list[tuple[Any, ...]] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            arch = getattr(props, "gcnArchName", None) or f"{props.major}{props.minor}"
            models.append((props.name, arch, props.multi_processor_count))
        return models
    except Exception:  # pragma: no cover - no torch or no driver: one platform, as device_identity says
        return []


def current_device_index() -> int:
    """The index of this thread's current GPU: where Triton launches, and whose platform
    ``device_identity`` describes."""
    import torch

    return int(torch.cuda.current_device())


def kernel_source(fn: Callable[..., Any]) -> str:
    """The kernel's source from its ``def`` on, without decorators or indentation."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        # Defined in a REPL or exec: no file to read. The bytecode still identifies it.
        code = fn.__code__
        return f"<no source>{code.co_code.hex()}{code.co_consts!r}{code.co_names!r}"
    src = textwrap.dedent(src)
    start = src.find("def ")
    return src[start:] if start >= 0 else src


def async_compile_available() -> bool:
    """Whether this Triton can compile in a thread pool (AsyncCompileMode, Triton >= 3.5)."""
    try:
        from triton.runtime import _async_compile  # noqa: F401
    except ImportError:
        return False
    return True


def precompile(launches: list[Callable[[], Any]], workers: int) -> int:
    """Compile the kernels that ``launches`` would run, ``workers`` at a time; return how many.

    Each launch must call the kernel with ``warmup=True`` (compile, don't run). Triton's
    AsyncCompileMode runs the compiler in a thread pool (its passes and ptxas run without
    the GIL) and fills both the in-memory and the on-disk compile cache. Compile errors
    are ignored here: the config fails again when it is measured, and is recorded then.
    Without AsyncCompileMode (Triton 3.4) nothing is compiled ahead.
    """
    if not launches or workers < 2 or not async_compile_available():
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    submitted = 0
    with ThreadPoolExecutor(max_workers=workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for launch in launches:
            try:
                launch()
                submitted += 1
            except Exception:
                continue
    return submitted
