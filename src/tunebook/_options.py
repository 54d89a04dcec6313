"""tunebook's own options of ``autotune``, declared once and validated once.

The public :func:`tunebook.autotune` keeps its explicit, documented signature (users and
IDEs read it); it only builds an :class:`Options`. Everything after that passes this one
record around. A mistake is reported when the kernel is decorated, so that a server fails
at start-up rather than at its first request.

>>> Options(strategy="random", max_configs=50).budget.max_configs
50
>>> Options(strategy="nosuch")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
tunebook._errors.ConfigurationError: tunebook.autotune: unknown strategy 'nosuch'; choose one of auto, ...
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._check import _tolerances
from ._errors import ConfigurationError
from ._optional import check as check_installed
from ._search import Budget, strategy_names
from ._search._bayes import BAYES_HINT
from ._tables import Tables

CHECK_FIELDS = ("rtol", "atol", "ignore", "max_bytes")


class _NoGroup:
    """``group=`` not given (its default), told apart from ``group=None`` written out."""

    def __repr__(self) -> str:
        return "None"


NO_GROUP: Any = _NoGroup()
WORLD = "world"  # group="world": torch.distributed's default group, looked up at the first miss


# What torch.distributed.new_group returns on a rank outside the group
# (GroupMember.NON_GROUP_MEMBER): such a rank tunes alone.
NON_GROUP_MEMBER = -100


def is_outsider(group: Any) -> bool:
    """Whether ``group`` is torch's answer to ``new_group`` on a rank outside the group."""
    return type(group) is int and group == NON_GROUP_MEMBER


def _is_process_group(group: Any) -> bool:
    if is_outsider(group):
        return True
    return callable(getattr(group, "size", None)) and callable(getattr(group, "rank", None))


@dataclass(frozen=True)
class Options:
    """One field per tunebook option of ``autotune`` (docs: :func:`tunebook.autotune`)."""

    # read-only book directories, after TUNEBOOK_DIR, before TUNEBOOK_PATH; or a function
    # giving them, called when the kernel's book is first opened (book_dirs())
    books: tuple[Path, ...] | Callable[[], Sequence[str | Path]] = ()
    name: str | None = None  # the kernel's name in the book (default: its qualified name)
    strategy: str = "auto"  # which configs a new key measures
    max_configs: int | None = None  # budget per key, in configs
    max_seconds: float | None = None  # budget per key, in seconds
    seed: int = 0  # for the random and model-based strategies
    compile_workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # precompile threads
    adaptive: bool = True  # screen briefly, measure only the contenders in full
    fallback: Callable[[tuple[Any, ...], list[Any]], Any] | None = None  # serve mode's pick
    prefer_nearest: bool = False  # serve mode: remembered keys before fallback=
    tables: Tables | None = None  # imported tables the kernel reads (_tables.py)
    inputs: Callable[[dict[str, Any]], Any] | None = None  # rebuilds a call for offline tuning
    isolate: bool = False  # measure new keys in a worker process
    isolate_timeout: float = 300.0  # seconds without progress before a candidate counts as hung
    check: Mapping[str, Any] | None = None  # result checking: None (off) or its settings
    group: Any = NO_GROUP  # a torch.distributed ProcessGroup whose ranks tune each key together, or "world"
    group_given_as_none: bool = False  # group=None written out: dist.group.WORLD before init, perhaps

    def book_dirs(self) -> tuple[Path, ...]:
        """The read-only book directories (``books=``, called now if it is a function)."""
        if callable(self.books):
            return tuple(Path(p) for p in self.books())
        return self.books

    def __post_init__(self) -> None:
        if not callable(self.books):
            if isinstance(self.books, str | os.PathLike) or not all(
                isinstance(p, str | os.PathLike) for p in self.books
            ):
                raise ConfigurationError(
                    "tunebook.autotune: books= takes a list of book directories (str or Path), or a "
                    f"function returning one; found {self.books!r}"
                )
            object.__setattr__(self, "books", tuple(Path(p) for p in self.books))
        self._check_types()
        if self.strategy != "auto" and self.strategy not in strategy_names():
            raise ConfigurationError(
                f"tunebook.autotune: unknown strategy {self.strategy!r}; choose one of "
                f"{', '.join(['auto', *strategy_names()])}"
            )
        if self.strategy == "bayes":  # the install line now, rather than at a first call
            check_installed("optuna", feature="the 'bayes' search strategy", extra="optuna", hint=BAYES_HINT)
        if self.max_configs is not None and not (is_int(self.max_configs) and self.max_configs > 0):
            raise ConfigurationError(
                "tunebook.autotune: max_configs= must be a positive integer or None; "
                f"found {self.max_configs!r}"
            )
        if self.max_seconds is not None and not (_is_number(self.max_seconds) and self.max_seconds > 0):
            raise ConfigurationError(
                "tunebook.autotune: max_seconds= must be a positive number or None; "
                f"found {self.max_seconds!r}"
            )
        if isinstance(self.compile_workers, bool) or not (
            isinstance(self.compile_workers, int) and self.compile_workers >= 1
        ):
            raise ConfigurationError(
                f"tunebook.autotune: compile_workers= must be an integer >= 1; found {self.compile_workers!r}"
            )
        self._check_group()
        if self.isolate and self.group is not None:
            raise ConfigurationError(
                "tunebook.autotune: group= and isolate=True cannot be combined: a group's ranks measure "
                "their shares of a key in their own processes; drop isolate=True (or group=)"
            )
        if not (_is_number(self.isolate_timeout) and self.isolate_timeout > 0):
            raise ConfigurationError(
                "tunebook.autotune: isolate_timeout= must be positive seconds; "
                f"found {self.isolate_timeout!r}"
            )
        for label, fn in (("fallback", self.fallback), ("inputs", self.inputs)):
            if fn is not None and not callable(fn):
                raise ConfigurationError(
                    f"tunebook.autotune: {label}= must be a callable or None; found {type(fn).__name__}"
                )
        if self.tables is not None and not isinstance(self.tables, Tables):
            raise ConfigurationError(
                "tunebook.autotune: tables= takes a tunebook.Tables or None; found "
                f"{type(self.tables).__name__}"
            )
        if self.check is not None:
            unknown = set(self.check) - set(CHECK_FIELDS)
            if unknown:
                raise ConfigurationError(
                    f"tunebook.autotune: check= takes {', '.join(CHECK_FIELDS[:-1])} and {CHECK_FIELDS[-1]}; "
                    f"found {', '.join(sorted(unknown))}"
                )
            object.__setattr__(self, "check", _check_settings(self.check))

    def _check_group(self) -> None:
        if self.group is NO_GROUP:
            object.__setattr__(self, "group", None)
        elif self.group is None:
            object.__setattr__(self, "group_given_as_none", True)
        elif not (self.group == WORLD if isinstance(self.group, str) else _is_process_group(self.group)):
            raise ConfigurationError(
                "tunebook.autotune: group= takes a torch.distributed ProcessGroup, or 'world' for the "
                "default group as it is at the first miss (write that where the kernel is decorated "
                f"before init_process_group); found {self.group!r}"
            )

    def _check_types(self) -> None:
        """The options whose wrong type would pass unnoticed (``adaptive='no'`` is true) or fail
        far from here (``name=5`` at the first tuning)."""
        if self.name is not None and not (isinstance(self.name, str) and self.name.strip()):
            raise ConfigurationError(
                f"tunebook.autotune: name= must be a non-empty string or None; found {self.name!r}"
            )
        for label in ("adaptive", "prefer_nearest", "isolate"):
            if not isinstance(getattr(self, label), bool):
                raise ConfigurationError(
                    f"tunebook.autotune: {label}= must be True or False; found {getattr(self, label)!r}"
                )
        if not is_int(self.seed):
            raise ConfigurationError(f"tunebook.autotune: seed= must be an integer; found {self.seed!r}")

    @staticmethod
    def normalize_check(check: bool | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """``check=`` as users write it (True, False or a dict) as this record holds it."""
        if check is None or check is False:
            return None
        if check is True:
            return {}
        if not isinstance(check, Mapping):
            raise ConfigurationError(
                f"tunebook.autotune: check= takes True, False or a dict of {', '.join(CHECK_FIELDS)}; "
                f"found {check!r}"
            )
        return dict(check)  # {}: the default tolerances, as check=True

    @property
    def budget(self) -> Budget:
        return Budget(max_configs=self.max_configs, max_seconds=self.max_seconds)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_settings(check: Mapping[str, Any]) -> dict[str, Any]:
    """``check=``'s values, whose mistakes failed at the first tuning (never, in serve mode);
    returned as the check takes them (``max_bytes=8e9`` as an int, ``ignore`` as a list)."""
    for label in ("rtol", "atol"):
        try:  # the table the check builds at tuning, built now for its errors
            _tolerances({}, check.get(label), label)
        except ValueError as exc:
            raise ConfigurationError(f"tunebook.autotune: {str(exc).removeprefix('tunebook: ')}") from None
    settings = dict(check)
    ignore = check.get("ignore", ())
    # A collection, not any iterable: a generator read here would be empty at the tuning.
    if (
        not isinstance(ignore, Collection)
        or isinstance(ignore, str | bytes)
        or not all(isinstance(n, str) for n in ignore)
    ):
        raise ConfigurationError(
            f"tunebook.autotune: check={{'ignore': ...}} takes a list of argument names; found {ignore!r}"
        )
    if "ignore" in check:
        settings["ignore"] = list(ignore)
    max_bytes = check.get("max_bytes")
    if isinstance(max_bytes, float) and max_bytes.is_integer():  # 8e9, as sizes are often written
        max_bytes = settings["max_bytes"] = int(max_bytes)
    if max_bytes is not None and not (is_int(max_bytes) and max_bytes > 0):
        raise ConfigurationError(
            f"tunebook.autotune: check={{'max_bytes': ...}} takes a positive integer; found {max_bytes!r}"
        )
    return settings


def refuse_ignored_meta_parameters(base_fn: Callable[..., Any], ignored: Collection[str]) -> None:
    """check's ``ignore`` naming a meta-parameter (``tl.constexpr``) of the kernel's Python
    function is refused: only tensor arguments are compared, so it would ignore nothing. A
    scalar argument cannot be told from a tensor before a call: it is left to do nothing."""
    params = inspect.signature(base_fn).parameters
    named = [n for n in ignored if n in params and _is_constexpr(params[n].annotation)]
    if named:
        raise ConfigurationError(
            f"tunebook.autotune: check's ignore names {', '.join(map(repr, named))}, "
            f"{'a meta-parameter' if len(named) == 1 else 'meta-parameters'} (tl.constexpr) of kernel "
            f"{base_fn.__name__}: only tensor arguments are compared, so ignoring "
            f"{'it' if len(named) == 1 else 'them'} does nothing. Name the tensor arguments not to compare."
        )


def _is_constexpr(annotation: Any) -> bool:
    """Triton's own test (``KernelParam.is_constexpr``), which the interpreter's functions lack:
    the annotation, as written or as a type's name, mentions constexpr."""
    if annotation is inspect.Parameter.empty:
        return False
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return "constexpr" in text


def from_arguments(arguments: Mapping[str, Any]) -> Options:
    """An Options from ``autotune``'s arguments as users write them (``locals()`` of the call):
    each field is taken by name, ``check=True``/``False`` and ``compile_workers=None`` normalized."""
    values = {f.name: arguments[f.name] for f in fields(Options) if f.name in arguments}
    values["check"] = Options.normalize_check(values.get("check"))
    if values.get("compile_workers") is None:
        values.pop("compile_workers", None)
    return Options(**values)
