"""The hit path's state, in one object, and the one rule for which config a call gets.

**The rule.** A call is served the *decision* for its call key: Triton's key (the ``key``
argument values, bucketed where declared, and the argument dtypes), and — only where a
bucketed key's candidates depend on the call's own values (a Space's ``arg_constraints``,
``early_config_prune``, ``perf_model``) — the ids of the candidates this call allows. The
slow path computes the call key from scratch and makes or reads the decision; the hit
tables memoize it per exact argument layout, so both paths always serve the same config.

**The tables.** ``by_position`` serves calls with positional arguments only (the common
case) and configs without a ``pre_hook``, keyed by the key values and dtypes read by index
(built inline by :attr:`HitTable.getitem`, the generated ``kernel[grid]``); it maps a key
straight to the hit's launcher. ``by_binding`` serves any call, keyed by a generated
function that binds arguments by name (see ``_launch.py``). A :class:`Hit` holds what a
hit needs: the generated launcher (which bumps the hit counter and sets ``best_config``
itself), the config, the counter the call bumps (hits or fallbacks) and the config's
launch kwargs.
Tables are only ever added to while serving (dict reads need no lock); :meth:`HitTable.clear`
empties them in place when the decisions they memoize are overruled (a caller writing
``Autotuner.cache``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from . import _launch

KeyFunction = Callable[..., tuple[Any, ...]]


class Hit(NamedTuple):
    launcher: _launch.Launcher
    config: Any
    counter: list[int]  # the autotuner's hit or fallback counter: the hit bumps counter[0]
    config_kwargs: dict[str, Any]


def _constant_key(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    return ()


class HitTable:
    """Every table a hit reads (see the module docstring). Used by one autotuner."""

    __slots__ = (
        "_arg_names",
        "_key_names",
        "_launchers",
        "_owner",
        "_position_tried",
        "_run",
        "_tensor_slots",
        "binding_key",
        "by_binding",
        "by_position",
        "decisions",
        "getitem",
        "position_key",
    )

    def __init__(
        self, arg_names: Sequence[str], key_names: Sequence[str], run: Callable[..., Any], owner: Any
    ) -> None:
        """``run`` is the JIT's launch; ``owner`` the autotuner (its ``run`` is the way to the
        slow path, and a hit sets its ``best_config``)."""
        self._arg_names = list(arg_names)
        self._key_names = list(key_names)
        self._run = run
        self._owner = owner
        self.by_position: dict[tuple[Any, ...], _launch.Launcher] = {}
        self.by_binding: dict[tuple[Any, ...], Hit] = {}
        # Generated on the first remembered call; None (not callable) until then, which the
        # hit path's TypeError handler turns into a slow-path call.
        self.position_key: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
        self.binding_key: KeyFunction | None = None
        self._position_tried = False
        self._tensor_slots: frozenset[str] = frozenset()
        self._launchers: dict[tuple[int, int], _launch.Launcher] = {}
        # Call key -> config: the decisions the tables memoize (the slow path's own table).
        self.decisions: dict[Any, Any] = {}
        # ``kernel[grid]``: this general form until the first remembered positional call
        # generates one with the key inlined (``_launch.positional_getitem``).
        self.getitem: Callable[[Any], Callable[..., Any]] = self._general_getitem

    def _general_getitem(self, grid: Any) -> Callable[..., Any]:
        by_position, slow = self.by_position, self._owner.run

        def launch(*args: Any, **kwargs: Any) -> Any:
            if not kwargs:
                try:
                    found = by_position[self.position_key(args)]  # type: ignore[misc]
                except (KeyError, AttributeError, IndexError, TypeError):
                    pass
                else:
                    return found(args, grid)
            return slow(*args, grid=grid, warmup=False, **kwargs)

        return launch

    def launcher(self, config: Any, counter: list[int]) -> _launch.Launcher:
        """The generated launcher of ``config`` for calls that bump ``counter`` (one per pair)."""
        launcher = self._launchers.get((id(config), id(counter)))
        if launcher is None:
            launcher = self._launchers[id(config), id(counter)] = _launch.config_launcher(
                self._run,
                config.all_kwargs(),
                self._owner.option_defaults(),
                served=(counter, self._owner, config),
            )
        return launcher

    def hit(self, config: Any, counter: list[int]) -> Hit:
        return Hit(self.launcher(config, counter), config, counter, config.all_kwargs())

    def serve_always(self, hit: Hit) -> None:
        """A kernel with one config: every call is this hit, whatever its arguments."""
        self.position_key = self.binding_key = _constant_key
        self._position_tried = True
        self.by_binding[()] = hit
        if hit.config.pre_hook is None:
            self.by_position[()] = hit.launcher

    def remember(self, args: Sequence[Any], kwargs: Mapping[str, Any], hit: Hit) -> None:
        """Serve later calls laid out like this one (same values, dtypes, classes) with ``hit``."""
        slots = _launch.tensor_slots(self._arg_names, args, kwargs)
        if self.binding_key is None:
            self.binding_key = _launch.binding_key(self._arg_names, self._key_names, args, kwargs)
            self._tensor_slots = slots
        # The key functions read dtypes where the first call had tensors. A call with tensors
        # elsewhere would key the same as one without them: it is never entered, and stays on
        # the slow path, which builds Triton's key from scratch.
        if slots != self._tensor_slots:
            return
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            self.by_binding[self.binding_key(*args, **kwargs)] = hit
        if kwargs:
            return
        if not self._position_tried:
            self._position_tried = True
            self.position_key = _launch.positional_key(self._arg_names, self._key_names, args)
            getitem = _launch.positional_getitem(
                self._arg_names, self._key_names, args, self.by_position, self._owner.run
            )
            if getitem is not None:
                self.getitem = getitem
        # A config pre_hook needs the bound arguments: such hits are served by run().
        if self.position_key is not None and hit.config.pre_hook is None:
            with contextlib.suppress(AttributeError, IndexError, TypeError):
                self.by_position[self.position_key(tuple(args))] = hit.launcher

    def clear(self) -> None:
        """Forget every memoized hit (in place: the hit path holds the dicts); decisions stay."""
        self.by_position.clear()
        self.by_binding.clear()
