"""Optional dependencies: imported on first use, failing with the exact install line.

Every extra goes through :func:`require`, so the message is the same everywhere::

    >>> require("json", feature="reading books", extra="cli").__name__
    'json'
    >>> try:
    ...     require("no_such_module_here", feature="the fleet book", extra="redis")
    ... except ImportError as exc:
    ...     print(exc)
    the fleet book needs no_such_module_here, which is not installed. Install it with:
        pip install 'tunebook[redis]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ._errors import MissingDependency


def install_line(extra: str) -> str:
    return f"pip install 'tunebook[{extra}]'"


def _missing(missing: str, feature: str, extra: str, hint: str) -> MissingDependency:
    message = (
        f"{feature} needs {missing}, which is not installed. Install it with:\n    {install_line(extra)}"
    )
    return MissingDependency(message + (f"\n{hint}" if hint else ""))


def require(module: str, *, feature: str, extra: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``feature`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(exc.name or module, feature, extra, hint) from exc


def check(module: str, *, feature: str, extra: str, hint: str = "") -> None:
    """Raise :class:`MissingDependency` now if ``module`` is not installed, without importing it
    (options are checked at decoration time; the import waits for the first use)."""
    if not available(module):
        raise _missing(module, feature, extra, hint)


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
