"""Generated code for the hit path.

A hit must cost about what a plain ``@triton.jit`` launch costs. Two things dominate the
overhead of a generic Python wrapper, and both are removed by generating small functions
specialised to one kernel's signature:

* **Building the key.** ``positional_key`` reads the key arguments and tensor dtypes by
  index from the args tuple: no argument binding, no dict. ``binding_key`` is the general
  form for calls that pass keywords.
* **Passing the config.** ``run(*args, **config_kwargs)`` makes CPython merge dicts on every
  call; ``config_launcher`` passes each meta-parameter as an explicit keyword instead,
  which is 0.3-0.4 us cheaper per launch on a typical host.

Every generated function is exact or raises (AttributeError / IndexError / TypeError), in
which case the caller takes the slow path, which computes Triton's key from scratch.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _fingerprint

Launcher = Callable[[tuple[Any, ...], Any], Any]


def _identifiers(names: Sequence[str]) -> bool:
    return all(n.isidentifier() and not keyword.iskeyword(n) for n in names)


def _compile(src: str, name: str, namespace: dict[str, Any]) -> Any:
    exec(compile(src, f"<tunebook {name}>", "exec"), namespace)
    return namespace[name]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def tensor_slots(arg_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> frozenset[str]:
    """The argument names that hold a tensor (anything with a dtype) in this call."""
    bound = {**dict(zip(arg_names, args)), **kwargs}
    return frozenset(n for n, v in bound.items() if hasattr(v, "dtype"))


def positional_key(
    arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any]
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """``f(args) -> tuple`` for calls that pass exactly ``len(args)`` positional arguments.

    The tuple holds the key values, the dtype of every argument that was a tensor when the
    function was generated, and the class of every other argument: a call with another
    argument count raises IndexError, a call with a non-tensor in a tensor slot raises
    AttributeError, and a call with a tensor (or None) where a scalar was yields another
    class, hence another key. Returns None when a key argument is not positional.
    """
    count = len(args)
    position = {name: i for i, name in enumerate(arg_names[:count])}
    if any(k not in position for k in key_names if k in arg_names):
        return None
    keyed = {position[k] for k in key_names if k in position}
    elems = [f"a[{position[k]}]" for k in key_names if k in position]
    for i, value in enumerate(args):
        if hasattr(value, "dtype"):
            elems.append(f"a[{i}].dtype")
        elif i not in keyed:
            elems.append(f"a[{i}].__class__")
    src = (
        f"def positional_key(a):\n"
        f"    if len(a) != {count}:\n"
        f"        raise IndexError('another argument layout')\n"
        f"    return ({', '.join(elems)},)\n"
    )
    return _compile(src, "positional_key", {})


def binding_key(
    arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Callable[..., tuple[Any, ...]]:
    """``f(*args, **kwargs) -> tuple``: like ``positional_key``, for any way of passing them.

    Python binds positional and keyword arguments itself: key values, the dtypes of the
    arguments that were tensors at generation, the class of every other argument.
    """
    if not _identifiers(arg_names):  # pragma: no cover - Triton kernels have identifier argument names
        return lambda *a, **k: _fingerprint.canonical_key(arg_names, key_names, a, k)
    tensors = tensor_slots(arg_names, args, kwargs)
    params = ", ".join(f"{n}=_MISSING" for n in arg_names)
    elems = list(key_names)
    elems += [f"{n}.dtype" if n in tensors else f"{n}.__class__" for n in arg_names if n not in key_names]
    src = f"def binding_key({params}, **_extra):\n    return ({''.join(e + ', ' for e in elems)})\n"
    return _compile(src, "binding_key", {"_MISSING": MISSING})


def config_launcher(
    run: Callable[..., Any], config_kwargs: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> Launcher:
    """``f(args, grid)`` calling ``run(*args, grid=grid, warmup=False, K=V, ...)``.

    Launch options equal to the backend's own ``defaults`` are left out: the JIT derives the
    same options, so the same kernel, with less work per call.
    """
    defaults = defaults or {}
    kwargs = {k: v for k, v in config_kwargs.items() if defaults.get(k, MISSING) != v}
    names = list(kwargs)
    if not _identifiers(names) or {"grid", "warmup", "run", "args"} & set(names):
        return lambda args, grid: run(*args, grid=grid, warmup=False, **kwargs)
    values = [f"_v{i}" for i in range(len(names))]
    keywords = "".join(f", {n}={v}" for n, v in zip(names, values))
    src = (
        f"def factory(run, {', '.join(values)}):\n"
        f"    def launch(args, grid):\n"
        f"        return run(*args, grid=grid, warmup=False{keywords})\n"
        f"    return launch\n"
    )
    return _compile(src, "factory", {})(run, *kwargs.values())
