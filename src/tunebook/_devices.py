"""Which platform a call belongs to, in a process that drives GPUs of more than one model.

A kernel's page of the book, its decisions and hit tables, its set-aside configs, its
imported tables and its Space's platform filter all belong to one platform. Almost every
process sees GPUs of one model (or the interpreter): an autotuner keeps one of each, and a
hit reads them without asking which device is current. A process that drives, say, an H100
as ``cuda:0`` and an A100 as ``cuda:1`` (each call under ``torch.cuda.device(i)``, where
Triton launches it) must look up, measure and file each call under the platform of the
device it runs on, or it files the A100's timings in the H100's page and serves the H100's
decisions on the A100.

Whether a process is such is decided once (:func:`mixed`, from the devices it sees, which
CUDA fixes when it starts), at an autotuner's first page open or first miss. Only then does
the autotuner swap each of those objects for a :class:`PerPlatform`, which stands for the
current device's own, made on first use; so the hit path of a host of one model is the
code it was, with no device check (``Autotuner._by_device``).

>>> tables = PerPlatform(dict, {"made": "first"}, model=lambda: "H100")
>>> tables.get("made"), len(tables.each())
('first', 1)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from . import _compat

T = TypeVar("T")

_models: list[tuple[Any, ...]] | None = None  # by device index, read once per process


def models() -> list[tuple[Any, ...]]:
    """What sets each visible GPU apart as a platform, by device index (``_compat.device_models``)."""
    global _models
    if _models is None:
        _models = _compat.device_models()
    return _models


def mixed() -> bool:
    """Whether this process sees GPUs of more than one platform (never under the interpreter)."""
    return len(set(models())) > 1


def current_model() -> Hashable:
    """The platform of this thread's current device, as :func:`models` names it."""
    return models()[_compat.current_device_index()]


def here_model() -> Hashable | None:
    """The current device's platform where this process sees GPUs of several models (as
    :func:`current_model`), else None (one platform: nothing to tell apart)."""
    return current_model() if mixed() else None


class PerPlatform(Generic[T]):
    """One ``T`` per platform of the devices calls run on, made on first use by ``make``;
    it stands for the current device's: an attribute read on it is that one's.

    ``first`` is the one the current device's platform gets (the autotuner's own, made
    before it knew the host was mixed). Safe across threads: two threads that make one
    platform's at once keep one of them.
    """

    __slots__ = ("_made", "_make", "_model")

    def __init__(
        self, make: Callable[[], T], first: T, model: Callable[[], Hashable] = current_model
    ) -> None:
        self._make = make
        self._model = model
        self._made: dict[Hashable, T] = {model(): first}

    def here(self) -> T:
        """The current device's platform's ``T``."""
        model = self._model()
        found = self._made.get(model)
        if found is None:
            found = self._made.setdefault(model, self._make())
        return found

    def each(self) -> list[T]:
        """Every platform's ``T`` made so far."""
        return list(self._made.values())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.here(), name)


def each(obj: Any) -> list[Any]:
    """``obj``'s every platform's object where it is a :class:`PerPlatform`, else ``[obj]``."""
    return obj.each() if isinstance(obj, PerPlatform) else [obj]


def route(tuner: Any) -> None:
    """Where this process sees GPUs of several models: swap ``tuner``'s (an
    :class:`~tunebook.Autotuner`'s) home (page, imported tables, timers), set-asides, Space
    listing and hit tables (decisions included) for :class:`PerPlatform`s, its own becoming
    the current device's platform's. Its counters and Triton's ``cache`` stay one: a config a
    caller writes there holds on every device, as in Triton. Called once, under its lock."""
    if not mixed():
        return
    from ._hits import HitTable
    from ._listing import SpaceListing
    from ._set_aside import SetAside

    home, label = tuner._home, tuner.label
    tuner._home = PerPlatform(home.sibling, home)
    tuner.set_aside = PerPlatform(lambda: SetAside(label), tuner.set_aside)
    if tuner._listing is not None:
        space, index = tuner._listing.space, tuner.config_index
        tuner._listing = PerPlatform(
            lambda: SpaceListing(space, index, lambda: tuner.page().platform), tuner._listing
        )
    if not tuner._single:  # one config serves every call on every device, from any table
        hits = tuner._hits
        tuner._hits = PerPlatform(lambda: HitTable(tuner.arg_names, tuner.keys, tuner.fn.run, tuner), hits)
