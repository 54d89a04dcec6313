"""Which of a call's arguments a kernel's candidate rules read, so that hits key on them.

A call's candidates may depend on its own values: a Space's ``arg_constraints``,
``early_config_prune`` and ``perf_model`` see every argument, not only the key's. The hit
path keys a call on the key's values and the dtypes and classes of the other arguments;
a rule that read a value outside the key (``BLOCK <= args["LIMIT"]``) was then served, on
a hit, the config decided for another value: one its own constraint excluded (a wrong
result or an illegal memory access on a GPU), where the slow path served an allowed one.
So the arguments a rule is handed are watched, and the names it reads outside the key
join the hit key by value (scalars; anything else by class, as before) and make the
kernel's decisions call-dependent (``_hits.py``'s rule).

A tensor's dtype is always in the key; a rule that reads a tensor's shape sees what the
key does not hold: pass that size as an argument of the key.

>>> reads = ArgumentReads(["n"])
>>> watched = reads.watch({"n": 4, "LIMIT": 32, "x": None})
>>> watched["n"], watched.get("LIMIT"), sorted(reads.names)
(4, 32, ['LIMIT'])
>>> sorted(unwatched(watched)), sorted(reads.names)  # a message lists them: no read
(['LIMIT', 'n', 'x'], ['LIMIT'])
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any

# Values a hit keys on at once (exact classes: the generated key tests these first).
SCALARS = frozenset({int, float, bool, str, bytes, type(None)})


def value_of(value: Any) -> Any:
    """What a hit keys a read argument on beyond its class: a value that stands for itself
    (one of ``SCALARS``, a NumPy or other number, an enum, a Triton or torch dtype given as a
    constexpr) keys by value; any other object (a descriptor made per call) by its class
    alone (None here), or each call would be a key of its own. Generated keys test
    ``SCALARS`` inline and call this for the rest.

    >>> import enum
    >>> class Mode(enum.IntEnum):
    ...     FAST = 1
    >>> value_of(Mode.FAST), value_of(object())
    (<Mode.FAST: 1>, None)
    """
    if value.__class__ in SCALARS:
        return value
    if isinstance(value, numbers.Number | enum.Enum | str | bytes) or type(value).__name__ == "dtype":
        try:
            hash(value)
        except TypeError:
            return None
        return value
    return None


class ArgumentReads:
    """The argument names outside the key that a kernel's rules have read (they only grow)."""

    def __init__(self, key_names: Sequence[str]) -> None:
        self._key = frozenset(key_names)
        self.names: frozenset[str] = frozenset()

    def watch(self, named: Mapping[str, Any]) -> dict[str, Any]:
        """``named`` as a dict that records what is read from it."""
        return _Watched(self, named)

    def add(self, names: Iterable[str]) -> None:
        new = frozenset(names) - self._key
        if not new <= self.names:
            self.names = self.names | new

    def read(self, name: str) -> None:
        # A listing reads a few names thousands of times: the known ones cost a set lookup.
        if name not in self.names and name not in self._key:
            self.add((name,))


def unwatched(named: Mapping[str, Any]) -> Mapping[str, Any]:
    """``named`` without the watch, for a message that lists the arguments: listing them is
    no read by the rules."""
    return dict(dict.items(named)) if isinstance(named, _Watched) else named


class _Watched(dict[str, Any]):
    # A dict, as the rules were handed before; every read is recorded. Iterating, or
    # unpacking with ** (which goes through keys() for a dict whose __iter__ is its own),
    # reads every name.
    def __init__(self, reads: ArgumentReads, named: Mapping[str, Any]) -> None:
        super().__init__(named)
        self._reads = reads

    def __getitem__(self, name: str) -> Any:
        self._reads.read(name)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        self._reads.read(name)
        return super().get(name, default)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self._reads.read(name)
        return super().__contains__(name)

    def _all(self) -> None:
        self._reads.add(super().keys())

    def __iter__(self) -> Iterator[str]:
        self._all()
        return super().__iter__()

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self._all()
        return super().keys()

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        self._all()
        return super().items()

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        self._all()
        return super().values()

    def copy(self) -> dict[str, Any]:
        self._all()
        return dict(super().items())
