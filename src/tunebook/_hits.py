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
function that binds arguments by name (see ``_launch.py``). Both are generated for the
layout of the first call they remember (which slots hold tensors); ``by_layout`` serves
calls laid out otherwise (an optional pointer given as None), keyed by a plain function
(slower, and still without the autotuner's lock, which a call waiting for another key's
tuning would otherwise wait on). The scalar arguments a kernel's candidate rules read
(``_reads.py``) are keyed by value in all three. A :class:`Hit` holds what a
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

# Entries a table takes at most: keyed by raw values (a token count, a scalar a rule reads),
# a table could otherwise grow with every new value a server sees; past this, new values
# take the slow path, which serves them right, only slower.
MAX_REMEMBERED = 1 << 16


def _enter(table: dict[Any, Any], key: Callable[[], Any], value: Any) -> None:
    """``table[key()] = value`` while the table has room, unless the key cannot be made (a
    call its generated key functions cannot read: it stays on the slow path)."""
    if len(table) < MAX_REMEMBERED:
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            table[key()] = value


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
        "_by_value",
        "_key_names",
        "_launchers",
        "_owner",
        "_position_tried",
        "_run",
        "_tensor_slots",
        "binding_key",
        "by_binding",
        "by_layout",
        "by_position",
        "decisions",
        "getitem",
        "layout_key",
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
        self.by_layout: dict[tuple[Any, ...], Hit] = {}
        self._by_value: frozenset[str] = frozenset()  # argument names keyed by value (_reads.py)
        self.layout_key = _launch.layout_key(self._arg_names, self._key_names, self._by_value)
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

    def other_layout(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Hit | None:
        """The hit of a call laid out otherwise than the generated keys read (None: none)."""
        if not self.by_layout:
            return None
        try:
            return self.by_layout.get(self.layout_key(args, kwargs))
        except TypeError:  # an unhashable key value
            return None

    def remember(self, args: Sequence[Any], kwargs: Mapping[str, Any], hit: Hit) -> None:
        """Serve later calls laid out like this one (same values, dtypes, classes, and values
        of what the kernel's candidate rules have read so far: ``_reads.py``) with ``hit``."""
        by_value = self._owner.reads.names
        if by_value != self._by_value:
            self._key_by(by_value)
        slots = _launch.tensor_slots(self._arg_names, args, kwargs)
        if self.binding_key is None:
            self.binding_key = _launch.binding_key(self._arg_names, self._key_names, args, kwargs, by_value)
            self._tensor_slots = slots
        # The key functions read dtypes where the first call had tensors. A call with tensors
        # elsewhere would key the same as one without them: it goes to by_layout.
        if slots != self._tensor_slots:
            _enter(self.by_layout, lambda: self.layout_key(args, kwargs), hit)
            return
        _enter(self.by_binding, lambda: self.binding_key(*args, **kwargs), hit)  # type: ignore[misc]
        if kwargs:
            return
        if not self._position_tried:
            self._position_tried = True
            self.position_key = _launch.positional_key(self._arg_names, self._key_names, args, by_value)
            getitem = _launch.positional_getitem(
                self._arg_names, self._key_names, args, self.by_position, self._owner.run, by_value
            )
            if getitem is not None:
                self.getitem = getitem
        # A config pre_hook needs the bound arguments: such hits are served by run().
        if self.position_key is not None and hit.config.pre_hook is None:
            position_key = self.position_key
            _enter(self.by_position, lambda: position_key(tuple(args)), hit.launcher)

    def clear(self) -> None:
        """Forget every memoized hit (in place: the hit path holds the dicts); decisions stay."""
        self.by_position.clear()
        self.by_binding.clear()
        self.by_layout.clear()

    def _key_by(self, by_value: frozenset[str]) -> None:
        """Key calls on the values of ``by_value`` too, from the next remembered call on: the
        tables keyed without them are emptied, and the key functions made again."""
        self.clear()
        self._by_value = by_value
        self.layout_key = _launch.layout_key(self._arg_names, self._key_names, by_value)
        self.binding_key = self.position_key = None
        self._position_tried = False
        self.getitem = self._general_getitem
