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
* **Frames.** ``positional_getitem`` is ``kernel[grid]`` itself, with the key built inline,
  and the launcher does the hit's bookkeeping (hit counter, ``best_config``): a positional
  hit runs two Python frames of ours before Triton's ``run``, where a plain ``kernel[grid]``
  runs one.
* **Triton's run.** On a GPU the launcher calls ``_compat.direct_run``'s launcher instead
  of ``JITFunction.run``: Triton's binder, a dict lookup of the compiled kernel, and its C
  launcher, without the per-call work whose result a fixed config cannot change
  (``_compat/direct.py`` says what and when it falls back to ``run``).

Every generated function is exact or raises (AttributeError / IndexError / TypeError), in
which case the caller takes the slow path, which computes Triton's key from scratch.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _compat, _fingerprint
from ._reads import SCALARS, value_of

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


def _by_value(expr: str) -> str:
    # A scalar by value, anything else (a descriptor object made per call) by class alone:
    # keyed by identity, each call would be a new key and the tables would grow per call.
    return f"({expr} if {expr}.__class__ in _SCALARS else _value_of({expr}))"


def _positional_elements(
    arg_names: Sequence[str], key_names: Sequence[str], args: Sequence[Any], by_value: frozenset[str]
) -> list[str] | None:
    """The expressions over ``a`` (the args tuple) that make the positional key, or None."""
    position = {name: i for i, name in enumerate(arg_names[: len(args)])}
    if any(k not in position for k in key_names if k in arg_names):
        return None
    keyed = {position[k] for k in key_names if k in position}
    elems = [f"a[{position[k]}]" for k in key_names if k in position]
    for i, value in enumerate(args):
        if hasattr(value, "dtype"):
            elems.append(f"a[{i}].dtype")
        elif i not in keyed:
            elems.append(f"a[{i}].__class__")
            if arg_names[i] in by_value:
                elems.append(_by_value(f"a[{i}]"))
    return elems


def positional_key(
    arg_names: Sequence[str],
    key_names: Sequence[str],
    args: Sequence[Any],
    by_value: frozenset[str] = frozenset(),
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]] | None:
    """``f(args) -> tuple`` for calls that pass exactly ``len(args)`` positional arguments.

    The tuple holds the key values, the dtype of every argument that was a tensor when the
    function was generated, and the class of every other argument (and the value, for the
    names in ``by_value`` that hold a scalar: those a kernel's candidate rules read,
    ``_reads.py``): a call with another argument count raises IndexError, a call with a
    non-tensor in a tensor slot raises AttributeError, and a call with a tensor (or None)
    where a scalar was yields another class, hence another key. Returns None when a key
    argument is not positional.
    """
    elems = _positional_elements(arg_names, key_names, args, by_value)
    if elems is None:
        return None
    src = (
        f"def positional_key(a):\n"
        f"    if len(a) != {len(args)}:\n"
        f"        raise IndexError('another argument layout')\n"
        f"    return ({', '.join(elems)},)\n"
    )
    return _compile(src, "positional_key", {"_SCALARS": SCALARS, "_value_of": value_of})


def positional_getitem(
    arg_names: Sequence[str],
    key_names: Sequence[str],
    args: Sequence[Any],
    table: Mapping[tuple[Any, ...], Launcher],
    slow: Callable[..., Any],
    by_value: frozenset[str] = frozenset(),
) -> Callable[[Any], Callable[..., Any]] | None:
    """``kernel[grid]`` for the common hit: ``f(grid) -> launch(*args, **kwargs)``.

    ``launch`` builds the key of ``positional_key`` inline (the same expressions, so the two
    always agree), looks it up in ``table`` and calls the launcher found; any other call
    (keywords, another argument count, an unknown key, a non-tensor in a tensor slot) goes
    to ``slow(*args, grid=grid, warmup=False, **kwargs)``. Inlining saves the key function's
    frame on every hit. Returns None when a key argument is not positional.
    """
    elems = _positional_elements(arg_names, key_names, args, by_value)
    if elems is None:
        return None
    src = (
        "def outer(table, slow, _SCALARS, _value_of):\n"
        "    def factory(grid):\n"
        "        def launch(*a, **kw):\n"
        f"            if not kw and len(a) == {len(args)}:\n"
        "                try:\n"
        f"                    found = table[({', '.join(elems)},)]\n"
        "                except (KeyError, AttributeError, TypeError):\n"
        "                    pass\n"
        "                else:\n"
        "                    return found(a, grid)\n"
        "            return slow(*a, grid=grid, warmup=False, **kw)\n"
        "        return launch\n"
        "    return factory\n"
    )
    # closure cells: read faster than globals
    return _compile(src, "outer", {})(table, slow, SCALARS, value_of)


def binding_key(
    arg_names: Sequence[str],
    key_names: Sequence[str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    by_value: frozenset[str] = frozenset(),
) -> Callable[..., tuple[Any, ...]]:
    """``f(*args, **kwargs) -> tuple``: like ``positional_key``, for any way of passing them.

    Python binds positional and keyword arguments itself: key values, the dtypes of the
    arguments that were tensors at generation, the class of every other argument (and the
    scalar values of those in ``by_value``).
    """
    if not _identifiers(arg_names):  # pragma: no cover - Triton kernels have identifier argument names
        return lambda *a, **k: _fingerprint.canonical_key(arg_names, key_names, a, k)
    tensors = tensor_slots(arg_names, args, kwargs)
    params = ", ".join(f"{n}=_MISSING" for n in arg_names)
    elems = list(key_names)
    for n in arg_names:
        if n in key_names:
            continue
        elems.append(f"{n}.dtype" if n in tensors else f"{n}.__class__")
        if n not in tensors and n in by_value:
            elems.append(_by_value(n))
    src = f"def binding_key({params}, **_extra):\n    return ({''.join(e + ', ' for e in elems)})\n"
    return _compile(src, "binding_key", {"_MISSING": MISSING, "_SCALARS": SCALARS, "_value_of": value_of})


def layout_key(
    arg_names: Sequence[str], key_names: Sequence[str], by_value: frozenset[str]
) -> Callable[[Sequence[Any], Mapping[str, Any]], tuple[Any, ...]]:
    """``f(args, kwargs) -> tuple``: the key of :func:`binding_key` for a call of any
    argument layout (a tensor, or None, in any slot), computed without generated code: for
    the calls laid out otherwise than the first one (an optional pointer given as None)."""
    keyed = frozenset(key_names)

    def key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        bound = {**dict(zip(arg_names, args)), **kwargs}
        out: list[Any] = []
        for name in arg_names:
            value = bound.get(name, MISSING)
            if name in keyed:
                out.append(value)
            elif hasattr(value, "dtype"):
                out += (True, value.dtype)
            else:
                out += (False, value.__class__)
                if name in by_value:
                    out.append(value_of(value))
        return tuple(out)

    return key


def lean_options(kwargs: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the launch options equal to ``defaults`` (the backend's, from
    ``Autotuner.option_defaults``), in their order: what every launch of one config passes
    to Triton.

    Triton keys its compiled kernels by the options a launch passes, as given (``str`` of
    the dict: ``num_ctas=1`` passed and left out are two keys, and so is another order). A
    launch that passes them otherwise than the hits do compiles the config a second time, or
    loads it from Triton's disk cache: on an H200 the first hit of each served ``linear``
    key took 1.8-3.6 ms so (BENCHMARKS.md section 1, twenty-fourth session).

    >>> defaults = {"num_warps": 4, "num_ctas": 1}
    >>> lean_options({"BLOCK": 64, "num_warps": 4, "num_ctas": 1, "num_stages": 3}, defaults)
    {'BLOCK': 64, 'num_stages': 3}
    """
    return {k: v for k, v in kwargs.items() if defaults.get(k, MISSING) != v}


def config_launcher(
    run: Callable[..., Any],
    config_kwargs: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    *,
    served: tuple[list[int], Any, Any] | None = None,
) -> Launcher:
    """``f(args, grid)`` calling ``run(*args, grid=grid, warmup=False, K=V, ...)``.

    Launch options equal to the backend's own ``defaults`` are left out: the JIT derives the
    same options, so the same kernel, with less work per call. With ``served=(counter,
    owner, config)`` the launcher also does a hit's bookkeeping first (``counter[0] += 1``,
    ``owner.best_config = config``), in the same frame.
    """
    kwargs = lean_options(config_kwargs, defaults or {})
    names = list(kwargs)
    reserved = {"grid", "warmup", "run", "args", "counter", "owner", "config", "direct"}
    if not _identifiers(names) or reserved & set(names):
        return _plain_launcher(run, kwargs, served)
    # On a GPU, the compiled kernel's own launcher where Triton's run() can be mirrored.
    direct = _compat.direct_run(getattr(run, "__self__", None), run, kwargs)
    if direct is not None and served is None:
        return direct
    values = [f"_v{i}" for i in range(len(names))]
    keywords = "".join(f", {n}={v}" for n, v in zip(names, values))
    bookkeeping = "        counter[0] += 1\n        owner.best_config = config\n" if served else ""
    call = "direct(args, grid)" if direct is not None else f"run(*args, grid=grid, warmup=False{keywords})"
    src = (
        f"def factory(run, direct, counter, owner, config, {', '.join(values)}):\n"
        f"    def launch(args, grid):\n"
        f"{bookkeeping}"
        f"        return {call}\n"
        f"    return launch\n"
    )
    counter, owner, config = served or (None, None, None)
    return _compile(src, "factory", {})(run, direct, counter, owner, config, *kwargs.values())


def _plain_launcher(
    run: Callable[..., Any], kwargs: dict[str, Any], served: tuple[list[int], Any, Any] | None
) -> Launcher:  # pragma: no cover - Triton meta-parameters are identifiers
    def launch(args: tuple[Any, ...], grid: Any) -> Any:
        if served is not None:
            served[0][0] += 1
            served[1].best_config = served[2]
        return run(*args, grid=grid, warmup=False, **kwargs)

    return launch
