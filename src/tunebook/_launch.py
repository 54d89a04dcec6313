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


def positional_key(
    arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any]
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """``f(args) -> tuple`` for calls that pass exactly ``len(args)`` positional arguments.

    The tuple starts with the argument count, so a call laid out differently never matches.
    Returns None when a key argument is not among the positional ones.
    """
    count = len(args)
    position = {name: i for i, name in enumerate(arg_names[:count])}
    if any(k not in position for k in key_names if k in arg_names):
        return None
    elems = ["len(a)"] + [f"a[{position[k]}]" for k in key_names if k in position]
    elems += [f"a[{i}].dtype" for i, value in enumerate(args) if hasattr(value, "dtype")]
    src = f"def positional_key(a):\n    return ({', '.join(elems)},)\n"
    return _compile(src, "positional_key", {})


def binding_key(
    arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Callable[..., tuple[Any, ...]]:
    """``f(*args, **kwargs) -> tuple``: key values and the dtypes of this call's tensor arguments.

    Python binds positional and keyword arguments itself. A later call whose tensor
    argument is not a tensor raises AttributeError and takes the slow path.
    """
    if not _identifiers(arg_names):  # pragma: no cover - Triton kernels have identifier argument names
        return lambda *a, **k: _fingerprint.canonical_key(arg_names, key_names, a, k)
    bound = {**dict(zip(arg_names, args)), **kwargs}
    params = ", ".join(f"{n}=_MISSING" for n in arg_names)
    elems = list(key_names) + [f"{n}.dtype" for n in arg_names if hasattr(bound.get(n), "dtype")]
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
