"""The ``TUNEBOOK_PATCH=1`` start-up hook: :func:`tunebook.patch` in every Python process of an
environment that asks for it, with no code changed.

``tunebook install-hook`` writes ``tunebook-patch.pth`` into the active environment's
site-packages; ``tunebook uninstall-hook`` removes it. Python runs the ``import`` lines of
``.pth`` files at start-up, before any user code. Ours does nothing at all unless
``TUNEBOOK_PATCH`` is set (to anything but empty, ``0``, ``false``, ``no`` or ``off``). Then
it loads this file by its path (importing the ``tunebook`` package would import Triton in
every process that starts, half a second each), and applies the patch right after
``triton`` is first imported, before the importing module's next line: ``from triton
import autotune`` already gets tunebook's.

A broken tunebook never breaks the interpreter's start, nor ``import triton``: every error
of the hook is caught, reported once on stderr, and Triton runs unpatched.

This module uses the standard library only and imports nothing of tunebook at import
time: the ``.pth`` line runs it as a file, outside the package.

>>> enabled({"TUNEBOOK_PATCH": "1"}), enabled({"TUNEBOOK_PATCH": "0"}), enabled({})
(True, False, False)
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import sysconfig
import threading
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

PTH_NAME = "tunebook-patch.pth"
VARIABLE = "TUNEBOOK_PATCH"
_OFF = ("", "0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")  # as every other switch of tunebook reads them (_settings)
_reported = False


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``TUNEBOOK_PATCH`` asks for the patch: one of 1, true, yes, on. A value that
    is neither on nor off (``ture``, ``none``, ``disable``) patches nothing; :func:`on_startup`
    says so."""
    return environ.get(VARIABLE, "").strip().lower() in _ON


# ------------------------------------------------------------------ the .pth file

# Run by Python's ``site`` at start-up (a .pth line that starts with ``import`` is executed).
# The variable is tested before anything is imported; the rest finds this file without
# importing the tunebook package, runs it, and never lets an error escape.
_BOOTSTRAP = """\
try:
    import sys
    if '_tunebook_startup_hook' not in sys.modules:  # once: a site directory may be listed twice
        sys.modules['_tunebook_startup_hook'] = None
        import importlib.util as u, os.path as p
        s = u.find_spec('tunebook')
        if s is None or not s.origin:
            raise ImportError('tunebook is not installed in this environment')
        h = u.spec_from_file_location('_tunebook_startup_hook', p.join(p.dirname(s.origin), '_hook.py'))
        m = u.module_from_spec(h)
        sys.modules[h.name] = m
        h.loader.exec_module(m)
        m.on_startup()
except Exception as e:
    import sys
    print('tunebook: ' + {variable!r} + ' is set, but its start-up hook failed (' + type(e).__name__ + ': '
          + str(e) + '); Triton runs unpatched. Unset ' + {variable!r} + ', or remove the hook: '
          + 'tunebook uninstall-hook (or delete ' + {path!r} + ')', file=sys.stderr)
"""


def pth_text(path: Path) -> str:
    """The content of the ``.pth`` file at ``path``: one line (``site`` executes it)."""
    code = _BOOTSTRAP.format(variable=VARIABLE, path=str(path))
    return (
        f"import os; exec({code!r}) if os.environ.get({VARIABLE!r}, '').strip().lower() not in {_OFF!r} "
        "else None\n"
    )


def site_packages() -> Path:
    """The active environment's site-packages (where ``pip install`` puts packages)."""
    return Path(sysconfig.get_paths()["purelib"])


def install(directory: str | Path | None = None) -> Path:
    """Write the hook into ``directory`` (default: :func:`site_packages`); return its path.

    Written atomically; an existing hook is replaced. Raises OSError when the directory
    cannot be written."""
    target = Path(directory) if directory is not None else site_packages()
    path = target / PTH_NAME
    temporary = target / f".{PTH_NAME}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(pth_text(path))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def uninstall(directories: Sequence[str | Path] | None = None) -> list[Path]:
    """Remove the hook from ``directories`` (default: every site directory of this
    interpreter); return the files removed."""
    removed = []
    for directory in directories if directories is not None else site_dirs():
        path = Path(directory) / PTH_NAME
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def site_dirs() -> list[Path]:
    """This interpreter's site directories: where a ``.pth`` file runs at start-up."""
    import site

    dirs = [site_packages(), Path(sysconfig.get_paths()["platlib"])]
    dirs += [Path(d) for d in getattr(site, "getsitepackages", list)()]
    if site.ENABLE_USER_SITE:
        dirs.append(Path(site.getusersitepackages()))
    unique: list[Path] = []
    for directory in dirs:
        if directory not in unique:
            unique.append(directory)
    return unique


# ------------------------------------------------------------------ at start-up


def on_startup() -> None:
    """Apply the patch now if Triton is already imported, else right after its import."""
    if not enabled():  # the .pth line lets every value but the off ones through
        _say(
            f"{VARIABLE}={os.environ.get(VARIABLE, '')!r} is neither on ({', '.join(_ON)}) nor off "
            f"({', '.join(v for v in _OFF if v)} or empty); Triton runs unpatched. Set it to 1 to patch."
        )
        return
    if "triton" in sys.modules:
        _apply()
    elif not any(getattr(f, "tunebook_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTritonImport())


class _AfterTritonImport:
    """A meta-path finder: ``triton`` is found and loaded as usual, then patched.

    It asks the other finders for ``triton``'s spec; one of them may ask ``importlib`` again
    (which asks this finder again): a search already under way answers None, and any error
    of its own is Python's "not found", so an import never fails because of it."""

    tunebook_hook = True  # one of these in sys.meta_path is enough

    def __init__(self) -> None:
        self._searching = threading.local()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != "triton" or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = self._others_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, self)
            return spec
        except Exception as exc:
            _report(exc)
            return None
        finally:
            self._searching.active = False

    def _others_spec(self, name: str, path: Any, target: Any) -> ModuleSpec | None:
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    """Triton's own loader, then the patch. The module keeps Triton's loader as its own."""

    def __init__(self, loader: Any, finder: _AfterTritonImport) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _apply()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


_deferred = False  # triton was imported by tunebook's own import: patched when that ends


def _apply() -> None:
    global _deferred
    try:
        package = sys.modules.get("tunebook")
        if package is not None and getattr(package.__spec__, "_initializing", False):
            # `import tunebook` before `import triton`: tunebook imports triton half-way
            # through its own import, when tunebook.patch does not exist yet. Its last line
            # calls tunebook_imported(), before any line of the importing program runs.
            _deferred = True
            return
        import tunebook

        tunebook.patch()
    except Exception as exc:
        _report(exc)


def tunebook_imported(package: ModuleType) -> None:
    """Called by the tunebook package on its last line: the patch deferred till then."""
    global _deferred
    if _deferred:
        _deferred = False
        try:
            package.patch()
        except Exception as exc:
            _report(exc)


def _report(exc: BaseException) -> None:
    """Say once per process why the patch was not applied; never raise."""
    _say(
        f"{VARIABLE} is set, but tunebook.patch() failed at `import triton` "
        f"({type(exc).__name__}: {exc}); Triton runs unpatched. Unset {VARIABLE}, or remove the "
        "hook: tunebook uninstall-hook"
    )


def _say(message: str) -> None:
    """One line on stderr, once per process; never raises."""
    global _reported
    if _reported:
        return
    _reported = True
    try:
        print(f"tunebook: {message}", file=sys.stderr)
    except Exception:  # pragma: no cover - no stderr to write to
        pass
