"""``tunebook.patch()``: every Triton autotuner in the process remembers, with no code changed.

Three doors, opened together by :func:`patch` and closed together by :func:`unpatch`:

1. **The decorator.** ``triton.autotune`` under every name it has (``triton.autotune``,
   ``triton.runtime.autotune``, ``triton.runtime.autotuner.autotune``, and every module
   global already bound to it by ``from triton import autotune``) becomes :func:`autotune`:
   kernels decorated from then on are tunebook autotuners (the fast hit path), named
   ``module.qualname`` in the book. Anything tunebook cannot build falls back to Triton's
   own decorator for that kernel, with a :class:`~tunebook.PatchWarning`.
2. **The class.** Triton's ``Autotuner.run`` is replaced (the route vLLM's
   ``VLLM_TRITON_FORCE_FIRST_CONFIG`` takes), so every other instance is served by an
   adopted tunebook autotuner (``_adopt.py``): kernels decorated before the patch, and
   instances of subclasses (fla-core's ``CachedAutotuner``), whose own ``run`` reaches it
   through ``super().run``.
3. **The subclasses.** Each subclass of Triton's ``Autotuner`` is read when the patch is
   applied and, for those defined later, when its ``class`` statement runs: one that
   overrides a timing step of Triton's tuning path (``_bench``, ``check_disk_cache``,
   ``do_bench``) keeps Triton's ``run`` unchanged, and one whose ``run`` never calls
   ``Autotuner.run`` is never reached. Both are named in one PatchWarning (one for those
   found when patching, then one per class defined later); neither is broken. As a last
   net, ``Autotuner._bench`` names any other kernel that benchmarks on Triton's path.

:func:`unpatch` puts back every name and class attribute it replaced (only where they
still hold tunebook's), and gives every adopted instance back to Triton with a plain dict
``cache``. Kernels that the patched decorator built stay tunebook autotuners.
"""

from __future__ import annotations

import dis
import inspect
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _adopt, _compat, _settings
from ._autotuner import Autotuner
from ._autotuner import autotune as _tunebook_autotune
from ._errors import PatchWarning
from ._forksafe import renew_lock
from ._warnings import warn_once

__all__ = ["active", "autotune", "patch", "unpatch"]

_ABSENT = object()
_lock = threading.RLock()
renew_lock(globals(), "_lock", threading.RLock)


@dataclass
class _State:
    """What :func:`patch` replaced, to be put back by :func:`unpatch`."""

    autotune: Callable[..., Any]  # the decorator the names held (Triton's)
    class_attributes: dict[str, Any] = field(default_factory=dict)  # name -> value before (or _ABSENT)


_state: _State | None = None
# Subclass -> why tunebook does not serve it ("" when it does), read once per class.
_verdicts: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def active() -> bool:
    """Whether :func:`patch` is in force."""
    return _state is not None


def patch() -> None:
    """Make every Triton autotuner in this process a tunebook autotuner (see the module
    docstring). Idempotent; thread-safe; undone by :func:`unpatch`.

    Example (runs on a CPU)::

        import tunebook
        tunebook.patch()       # before or after importing the libraries
        import some_library    # its @triton.autotune kernels now remember in the book
    """
    global _state
    # A TUNEBOOK_MODE (...) it cannot read is one error here, not a fallback to Triton and a
    # warning for every kernel decorated later.
    _settings.check()
    with _lock:
        if _state is not None:
            return
        triton_class = _compat.TritonAutotuner
        state = _State(autotune=_compat.TRITON_AUTOTUNE)
        replacements = {
            "run": _run,
            "_bench": _bench,
            "__init_subclass__": classmethod(_init_subclass),
        }
        for name, value in replacements.items():
            state.class_attributes[name] = triton_class.__dict__.get(name, _ABSENT)
            setattr(triton_class, name, value)
        _state = state
        _rebind(state.autotune, autotune)
        _report_unserved([cls for cls in _subclasses(triton_class) if _unserved_reason(cls)], when="patched")


def unpatch() -> None:
    """Restore Triton exactly: its decorator under every name the patch replaced, its
    ``Autotuner`` class's own methods, and every adopted instance (a plain dict ``cache``,
    holding what it holds now). Kernels built by the patched decorator stay tunebook's."""
    global _state
    with _lock:
        state = _state
        if state is None:
            return
        triton_class = _compat.TritonAutotuner
        for name, value in state.class_attributes.items():
            if value is _ABSENT:
                if name in triton_class.__dict__:
                    delattr(triton_class, name)
            else:
                setattr(triton_class, name, value)
        _rebind(autotune, state.autotune)
        _adopt.release_all()
        _state = None


# ---------------------------------------------------------------------- the decorator


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
    cache_results: bool = False,
    **triton_only: Any,
) -> Callable[[Any], Any]:
    """``triton.autotune`` while :func:`patch` is in force: Triton's signature, tunebook's
    autotuner, named ``module.qualname`` in the book.

    An option this Triton has and tunebook does not know (``triton_only``), or a kernel
    tunebook cannot build, gets Triton's own autotuner, with a PatchWarning naming why.
    After :func:`unpatch`, a reference kept to this function decorates as Triton does.
    """
    arguments = (
        configs,
        key,
        prune_configs_by,
        reset_to_zero,
        restore_value,
        pre_hook,
        post_hook,
        warmup,
        rep,
        use_cuda_graph,
        do_bench,
        cache_results,
    )

    def decorator(fn: Any) -> Any:
        state = _state
        if state is None:
            return _compat.TRITON_AUTOTUNE(*arguments, **triton_only)(fn)
        name = _adopt.readable_name(fn)
        try:
            if triton_only:
                raise TypeError(f"options tunebook does not know: {', '.join(sorted(triton_only))}")
            tuner = _tunebook_autotune(*arguments, name=name)(fn)
        except Exception as exc:
            warn_once(  # per reason too: two kernels of one function may fail for two
                f"patch-decorate:{name}:{type(exc).__name__}:{exc}",
                "tunebook.patch(): kernel %s keeps Triton's autotuner (%s: %s); "
                "its results are not remembered",
                name,
                type(exc).__name__,
                exc,
                category=PatchWarning,
            )
            kernel = state.autotune(*arguments, **triton_only)(fn)
            _adopt.leave_to_triton(kernel)  # as the warning says: Triton's, not adopted either
            return kernel
        tuner.defined_in = getattr(_compat.base_function(fn), "__module__", None)
        return tuner

    return decorator


def _rebind(old: Any, new: Any) -> None:
    """Every module global holding ``old`` holds ``new`` (Triton's homes of ``autotune`` are
    module globals too). Globals holding anything else, another library's patch included,
    are left alone, and so are tunebook's own modules, which hold both on purpose."""
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType) or name == "tunebook" or name.startswith("tunebook."):
            continue
        try:
            names = [name for name, value in list(vars(module).items()) if value is old]
        except Exception:  # a module object that will not show its namespace
            continue
        for name in names:
            try:
                setattr(module, name, new)
            except Exception:  # pragma: no cover - a read-only module namespace
                continue


# ---------------------------------------------------------------------- the class


def _run(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Triton's ``Autotuner.run`` while patched: the instance's adopted tunebook autotuner
    launches; an instance tunebook does not serve runs Triton's own ``run``."""
    served = self.__dict__.get(_adopt.ATTRIBUTE)
    if served is None:
        served = None if _unserved_reason(type(self)) else _adopt.adopt(self, _adoption_failed)
    if not served:
        return _original("run")(self, *args, **kwargs)
    if self.__dict__.get("cache") is not served.cache:
        served.follow_cache()
    return served.run(*args, **kwargs)


def _bench(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Triton's ``Autotuner._bench`` while patched: as Triton's, and a kernel that reaches it
    (its results are not remembered) is named once, unless its class was named already."""
    cls = type(self)
    if not _unserved_reason(cls) and self.__dict__.get(_adopt.ATTRIBUTE) is not False:
        warn_once(
            f"patch-bench:{_class_name(cls)}",
            "tunebook.patch(): kernel %s (%s) benchmarks configs through Triton's Autotuner._bench, "
            "outside tunebook; its results are not remembered",
            _adopt.readable_name(self.fn),
            _class_name(cls),
            category=PatchWarning,
        )
    return _original("_bench")(self, *args, **kwargs)


def _init_subclass(cls: type, **kwargs: Any) -> None:
    """Triton's ``Autotuner.__init_subclass__`` while patched: a subclass defined now is read."""
    state = _state
    own: Any = state.class_attributes.get("__init_subclass__", _ABSENT) if state is not None else _ABSENT
    if own is _ABSENT:
        triton_class: Any = _compat.TritonAutotuner
        super(triton_class, cls).__init_subclass__(**kwargs)
    else:  # pragma: no cover - Triton 3.4-3.9 define none
        own.__get__(None, cls)(**kwargs)
    if _unserved_reason(cls):
        _report_unserved([cls], when="defined")


def _original(name: str) -> Any:
    state = _state
    value = state.class_attributes.get(name, _ABSENT) if state is not None else _ABSENT
    if value is _ABSENT:  # called through a reference kept past unpatch(): Triton's own now
        value = _compat.TritonAutotuner.__dict__[name]
    return value


def _adoption_failed(host: Any, exc: BaseException) -> None:
    name = _adopt.readable_name(host.fn)
    warn_once(
        f"patch-adopt:{name}",
        "tunebook.patch(): kernel %s (%s) keeps Triton's autotuner: tunebook could not be built from it "
        "(%s: %s); its results are not remembered",
        name,
        _class_name(type(host)),
        type(exc).__name__,
        exc,
        category=PatchWarning,
    )


# ---------------------------------------------------------------------- reading subclasses


def _subclasses(root: type) -> Iterator[type]:
    seen: set[type] = set()
    stack: list[type] = list(root.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.add(cls)
            stack.extend(cls.__subclasses__())
            yield cls


def _unserved_reason(cls: type) -> str:
    """Why tunebook does not serve instances of ``cls`` ("" when it does)."""
    reason = _verdicts.get(cls)
    if reason is None:
        reason = _verdicts[cls] = _read_class(cls)
    return reason


def _read_class(cls: type) -> str:
    if issubclass(cls, Autotuner) or cls is _compat.TritonAutotuner:
        return ""  # tunebook's own, or Triton's: served
    reasons = [f"overrides {name}" for name in _compat.TRITON_TUNING_STEPS if _override(cls, name)]
    run = _override(cls, "run")
    if run is not None and not _calls_base_run(cls, run):
        reasons.append("overrides run() without calling Autotuner.run()")
    return "; ".join(reasons)


def _override(cls: type, name: str) -> Any:
    """The attribute ``name`` as a class between ``cls`` and Triton's Autotuner defines it."""
    for klass in cls.__mro__:
        if klass is _compat.TritonAutotuner:
            return None
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def _calls_base_run(cls: type, method: Any) -> bool:
    """Whether ``method`` (a ``run`` override) calls a base class's ``run``: ``super().run``
    or ``Base.run`` by name or by its module path. Read from its code; when the code cannot be read, assume it
    does (``_bench`` names the kernel if it benchmarks anyway)."""
    function = inspect.unwrap(getattr(method, "__func__", method))
    code = getattr(function, "__code__", None)
    if code is None:
        return True
    names = set(_code_names(code))
    if "run" not in names:
        return False
    if "super" in names:
        return True
    scope = getattr(function, "__globals__", {})

    def is_base(value: Any) -> bool:
        return isinstance(value, type) and value is not cls and issubclass(cls, value)

    return any(is_base(scope.get(name)) for name in names) or any(
        is_base(value) for value in _dotted_run_owners(code, scope)
    )


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in _nested(code):
        yield from _code_names(const)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    return (const for const in code.co_consts if isinstance(const, types.CodeType))


def _dotted_run_owners(code: types.CodeType, scope: dict[str, Any]) -> Iterator[Any]:
    """What each ``<global>.<attr>....run`` in ``code`` reads ``run`` from, the dotted
    path followed through modules and classes only (``triton.runtime.autotuner.Autotuner.run``,
    ``autotuner_module.Autotuner.run``): a base class named by its module path."""
    missing = object()
    value: Any = missing
    for instruction in dis.get_instructions(code):
        if instruction.opname == "LOAD_GLOBAL":
            value = scope.get(str(instruction.argval), missing)
        elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and value is not missing:
            if instruction.argval == "run":
                yield value
            if isinstance(value, types.ModuleType | type):
                value = getattr(value, str(instruction.argval), missing)
            else:
                value = missing
        else:
            value = missing
    for inner in _nested(code):
        yield from _dotted_run_owners(inner, scope)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _report_unserved(classes: list[type], when: str) -> None:
    if not classes:
        return
    listed = "; ".join(f"{_class_name(cls)} ({_unserved_reason(cls)})" for cls in classes)
    warn_once(
        f"patch-classes:{when}:{listed}",
        "tunebook.patch(): %d subclass%s of Triton's Autotuner keep%s Triton's own tuning; the results of "
        "%s kernels are not remembered: %s",
        len(classes),
        "es" if len(classes) > 1 else "",
        "" if len(classes) > 1 else "s",
        "their" if len(classes) > 1 else "its",
        listed,
        category=PatchWarning,
    )
