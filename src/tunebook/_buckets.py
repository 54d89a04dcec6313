"""Key bucketing: map the thousands of values a server sees onto the few that were tuned.

Declared with the key::

    @tunebook.autotune(configs, key=[tunebook.bucket("M", "pow2"), "N", "K"])      # next power of 2
    @tunebook.autotune(configs, key=[tunebook.bucket("M", [16, 64, 256, 1024]), "N"])  # bucket edges

A value maps to the smallest edge >= it (values above the last edge map to the last
edge), or to the next power of two. Any callable ``int -> int`` works too. The bucketing
is part of the kernel's identity in the book, so changing it starts a fresh page.

>>> bucket("M", "pow2").apply(1000), bucket("M", [16, 64]).apply(17), bucket("M", [16, 64]).apply(500)
(1024, 64, 64)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for values <= 1)."""
    value = int(value)
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


class Bucket(str):
    """A key argument name that carries how its values are bucketed."""

    apply: Callable[[Any], Any]
    spec: str

    def __new__(cls, name: str, how: str | Sequence[int] | Callable[[Any], Any] = "pow2") -> Bucket:
        obj = super().__new__(cls, name)
        if isinstance(how, str):
            if how != "pow2":
                raise ValueError(f"tunebook.bucket({name!r}, {how!r}): the only named bucketing is 'pow2'")
            obj.apply, obj.spec = next_power_of_2, "pow2"
        elif callable(how):
            obj.apply = how
            obj.spec = f"fn:{getattr(how, '__module__', '?')}.{getattr(how, '__qualname__', repr(how))}"
        else:
            edges = sorted({int(e) for e in how})
            if not edges:
                raise ValueError(f"tunebook.bucket({name!r}, ...): give at least one bucket edge")

            def to_edge(value: Any, _edges: list[int] = edges) -> int:
                i = bisect.bisect_left(_edges, value)
                return _edges[min(i, len(_edges) - 1)]

            obj.apply, obj.spec = to_edge, "edges=" + ",".join(map(str, edges))
        return obj

    def __reduce__(self) -> Any:  # keep pickling (e.g. to worker processes) meaningful
        return (str, (str(self),))

    @property
    def identity(self) -> str:
        return f"{self}|{self.spec}"


def bucket(name: str, how: str | Sequence[int] | Callable[[Any], Any] = "pow2") -> Bucket:
    """Declare key argument ``name`` bucketed: ``"pow2"``, a list of edges, or a callable."""
    return Bucket(name, how)


def bucketers(keys: Sequence[str]) -> dict[str, Callable[[Any], Any]]:
    return {str(k): k.apply for k in keys if isinstance(k, Bucket)}


def identity(keys: Sequence[str]) -> tuple[str, ...]:
    """Key names as the book identifies them: a bucketed name carries its bucketing."""
    return tuple(k.identity if isinstance(k, Bucket) else str(k) for k in keys)
