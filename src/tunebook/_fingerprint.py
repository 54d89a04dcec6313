"""Identity: which kernel, on which platform, for which key.

A remembered timing is only as good as the match between who measured it and who asks.

* **Kernel** — a hash of the kernel's source and, recursively, of every ``@triton.jit``
  function and constant global it refers to (names that resolve to globals in its scope:
  a parameter or local never brings in a global of the same name). Line numbers are not
  part of it (Triton's own cache key includes them), so moving a kernel down its file
  keeps its results; editing the kernel or a helper it calls starts afresh.
* **Platform** — GPU model name (an H100 PCIe and an H100 SXM differ), arch, runtime,
  Triton version and the timer used. The interpreter is a platform of its own.
* **Key** — the values of the ``key`` arguments plus the dtypes of all tensor arguments,
  exactly as ``triton.autotune`` builds it.

>>> platform_slug({"backend": "cuda", "device": "NVIDIA H200", "arch": "90"})
'NVIDIA-H200-90'
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import symtable
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _compat
from ._book import KernelIdentity, book_file_name
from ._jsonio import slug


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _closure_vars(fn: Callable[..., Any]) -> dict[str, Any]:
    if not getattr(fn, "__closure__", None):
        return {}
    names = fn.__code__.co_freevars
    out = {}
    for name, cell in zip(names, fn.__closure__ or ()):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # empty cell
            continue
    return out


def _referenced(tree: ast.AST) -> set[tuple[str, ...]]:
    """Dotted names a function body refers to: ``helper`` or ``mod.helper``."""
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add((node.id,))
        elif isinstance(node, ast.Attribute):
            parts: list[str] = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                parts.append(cur.id)
                found.add(tuple(reversed(parts)))
    return found


def _outer_names(src: str) -> set[str] | None:
    """Names the function in ``src`` takes from outside itself: its globals (and closure
    variables, which look global in its source alone), those of the scopes nested in it,
    and what its signature refers to (annotations, defaults). None if it cannot be told.

    A parameter or local that shares a name with a module global is not one of them: a
    module's ``n = 2`` beside a kernel parameter ``n`` must not change the kernel's id.
    """
    try:
        module = symtable.symtable(src, "<kernel>", "exec")
    except (SyntaxError, ValueError):
        return None
    functions = [t for t in module.get_children() if t.get_type() == "function"]
    if not functions:
        return None
    names = {s.get_name() for s in module.get_symbols() if s.is_referenced()}

    def walk(table: symtable.SymbolTable) -> None:
        names.update(s.get_name() for s in table.get_symbols() if s.is_global())
        for child in table.get_children():
            walk(child)

    walk(functions[0])
    return names


def _resolve(path: tuple[str, ...], scope: dict[str, Any]) -> Any:
    if path[0] not in scope:
        return None
    obj = scope[path[0]]
    for attr in path[1:]:
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)


def kernel_hash(kernel: Any) -> str:
    """Hash of the kernel's source and its jitted dependencies, independent of line numbers."""
    parts: list[str] = []
    seen: set[int] = set()

    def feed(fn: Callable[..., Any]) -> None:
        if id(fn) in seen:
            return
        seen.add(id(fn))
        src = _TRAILING_WS.sub("", _compat.kernel_source(fn))
        parts.append(src)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            return
        scope = {**getattr(fn, "__globals__", {}), **_closure_vars(fn)}
        outer = _outer_names(src)
        deps: list[tuple[str, Callable[..., Any]]] = []
        consts: list[str] = []
        for path in sorted(_referenced(tree)):
            if outer is not None and path[0] not in outer:
                continue  # a parameter or local, whatever a global of that name holds
            obj = _resolve(path, scope)
            inner = _compat.jitted_python_function(obj)
            if inner is not None:
                deps.append((".".join(path), inner))
            elif len(path) == 1 and _is_constant(obj):
                # A global constant baked into the kernel at compile time changes its code.
                consts.append(f"{path[0]}={_constant_repr(obj)}")
        parts.append(";".join(consts))
        for _, dep in deps:
            feed(dep)

    feed(_compat.base_function(kernel))
    return _digest("\n\x00".join(parts))


def _is_constant(obj: Any) -> bool:
    if isinstance(obj, bool | int | float | str):
        return True
    return type(obj).__name__ == "constexpr"


def _constant_repr(obj: Any) -> str:
    value = getattr(obj, "value", obj) if type(obj).__name__ == "constexpr" else obj
    return repr(value)


def kernel_name(kernel: Any) -> str:
    fn = _compat.base_function(kernel)
    return getattr(fn, "__qualname__", getattr(fn, "__name__", "kernel"))


@dataclass(frozen=True)
class Identity:
    """Who asks the book: a kernel on a platform, and the name of the page they share."""

    kernel: KernelIdentity
    platform: dict[str, Any]  # the fingerprint, without its id
    platform_id: str
    slug: str  # the platform's readable name in file names

    @property
    def file_name(self) -> str:
        return book_file_name(self.kernel, self.slug, self.platform_id)


def identify(kernel: KernelIdentity, timer: str) -> Identity:
    """The identity of ``kernel`` on this machine's platform, timed by ``timer``."""
    platform = platform_fingerprint(timer)
    return Identity(kernel, platform, platform_id(platform), platform_slug(platform))


def platform_fingerprint(timer: str) -> dict[str, Any]:
    """Everything that decides whether a timing measured elsewhere applies here."""
    return {**_compat.device_identity(), "triton": _compat.triton_version(), "timer": timer}


def platform_id(fingerprint: dict[str, Any]) -> str:
    return _digest(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")))[:16]


def platform_slug(fingerprint: dict[str, Any]) -> str:
    """A short human-readable name for file names: the device name, then the arch unless the
    name already holds its text (an A100's "80" is in "80GB"). It is part of every page's
    file name, which is how a page is found, so it stays as it is: another form would orphan
    every book written so far, the shipped ones included. The platform id keeps apart what
    the name does not.

    >>> platform_slug({"backend": "cuda", "device": "NVIDIA H100 80GB HBM3", "arch": "90"})
    'NVIDIA-H100-80GB-HBM3-90'
    >>> platform_slug({"backend": "cuda", "device": "NVIDIA A100-SXM4-80GB", "arch": "80"})
    'NVIDIA-A100-SXM4-80GB'
    """
    if fingerprint.get("backend") == "interpreter":
        return f"interpreter-{slug(str(fingerprint.get('arch', 'cpu')))}"
    device = slug(str(fingerprint.get("device", "unknown")), 40)
    arch = slug(str(fingerprint.get("arch", "")), 16, "")
    return f"{device}-{arch}" if arch and arch not in device else device


# ---------------------------------------------------------------------------- keys


def canonical_key(
    arg_names: Sequence[str],
    key_names: Sequence[str],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    buckets: Mapping[str, Callable[[Any], Any]] | None = None,
) -> tuple[Any, ...]:
    """The key as ``triton.autotune`` builds it: key-argument values (bucketed where
    declared), then tensor dtypes."""
    all_args = {**dict(zip(arg_names, args)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in arg_names}
    key: list[Any] = [
        buckets[k](named[k]) if buckets and k in buckets else named[k] for k in key_names if k in named
    ]
    key.extend(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
    return tuple(key)
