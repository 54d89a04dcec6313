"""Finding a program's tunebook kernels: import a module, collect its Autotuner objects."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

import click

from .._autotuner import Autotuner
from ._common import err


def import_module(spec: str) -> ModuleType:
    """Import ``pkg.mod`` (from the current directory too) or a ``path/to/file.py``.

    An error raised by the module itself is one line naming the exception and where it was
    raised, with the command that shows the whole traceback.
    """
    # Importing a module of kernels imports torch and triton: seconds. Say so on a terminal.
    # The module's own prints go to stderr: stdout is the command's (--json is parsed).
    with err().status(f"importing {spec} ...", spinner="dots"), contextlib.redirect_stdout(sys.stderr):
        try:
            return _import(spec)
        except click.ClickException:
            raise
        except SystemExit as exc:  # the module's sys.exit() would decide the command's status
            raise click.ClickException(
                f"importing {spec} called sys.exit({exc.code!r}): a module of kernels must import "
                "without exiting (keep a script's work under `if __name__ == '__main__':`)"
            ) from None
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            run = f"python {spec}" if spec.endswith(".py") else f"python -c 'import {spec}'"
            # Triton's words when it finds no GPU driver (a module that launches a kernel as it
            # is imported, on a machine without a GPU): say what they mean and the way out.
            no_gpu = (
                " Triton found no GPU; on a machine without one, set TRITON_INTERPRET=1 to run "
                "kernels in its CPU interpreter."
                if "active drivers" in str(exc)
                else ""
            )
            raise click.ClickException(
                f"importing {spec} raised {type(exc).__name__}: {exc} (at {Path(frame.filename).name}:"
                f"{frame.lineno}).{no_gpu} Run `{run}` to see the whole traceback."
            ) from None


def _import(spec: str) -> ModuleType:
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise click.ClickException(f"no Python file at {path}; pass MODULE or path/to/file.py")
        name = path.stem
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise click.ClickException(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))  # its sibling imports resolve as when run directly
        module_spec.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `tunebook explain mymod:kern` from the project dir
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (spec == exc.name or spec.startswith(exc.name + ".")):
            raise  # the module was found; something it imports was not
        raise click.ClickException(
            f"cannot import module {spec!r}: {exc}. Run from the directory that holds it, or set PYTHONPATH."
        ) from None


def autotuners(module: ModuleType) -> dict[str, Autotuner]:
    """The module's global tunebook Autotuner objects, by attribute name."""
    return {name: obj for name, obj in sorted(vars(module).items()) if isinstance(obj, Autotuner)}


def module_autotuners(spec: str, why: str) -> dict[str, Autotuner]:
    """:func:`autotuners` of the module ``spec`` names; a module with none is an error (a
    parent package, a typo of a sibling) that says ``why`` the command wanted one."""
    found = autotuners(import_module(spec))
    if not found:
        raise click.ClickException(
            f"module {spec} defines no @tunebook.autotune kernel at module level; {why}"
        )
    return found


def resolve_kernel(target: str) -> tuple[str, Autotuner]:
    """``MODULE:KERNEL`` -> (attribute name, the Autotuner), with errors that list what exists."""
    module_spec, sep, attr = target.rpartition(":")
    if not sep or not module_spec or not attr:
        raise click.BadParameter(f"expected MODULE:KERNEL (e.g. mypkg.ops:matmul_kernel), found {target!r}")
    module = import_module(module_spec)
    found = autotuners(module)
    obj = getattr(module, attr, None)
    if isinstance(obj, Autotuner):
        return attr, obj
    listing = ", ".join(found) or "none"
    if obj is None:
        raise click.ClickException(
            f"module {module_spec} has no attribute {attr!r}; its tunebook kernels: {listing}"
        )
    raise click.ClickException(
        f"{module_spec}:{attr} is of type {type(obj).__name__}, not a @tunebook.autotune kernel; "
        f"its tunebook kernels: {listing}"
    )
