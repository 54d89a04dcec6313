"""The JSON rules every book, key and call description follows, written once.

* **Scalars.** A value a book may hold as a config value, key element or call argument:
  ``None``, a bool, a string, a finite float, or an integer of at most 64 bits (larger
  integers are refused: a 5,000-digit number is not a config, and every consumer, from
  ``float()`` to vLLM's JSON, would choke on it).
* **Strict reading.** JSON as the standard defines it: no ``NaN`` or ``Infinity``, no
  float that overflows to infinity, no integer beyond 64 bits.
* **Key text.** A key as a book names it: the compact JSON of its elements, each stored as
  itself if it is a scalar, else as its ``str()`` (``torch.float16`` -> ``"torch.float16"``).
* **Slugs.** The readable parts of file names: runs of anything but letters, digits and
  ``_`` become one ``-``.

>>> key_text([4096, 128, "torch.float16"])
'[4096,128,"torch.float16"]'
>>> is_scalar(1 << 70), is_scalar(2.5), is_scalar(float("nan"))
(False, True, False)
>>> slug("NVIDIA H200 / sm90")
'NVIDIA-H200-sm90'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from ._errors import BookFormatError

INT_LIMIT = 1 << 63


def is_scalar(value: Any) -> bool:
    """A JSON scalar a book may hold (see the module docstring)."""
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return -INT_LIMIT <= value < INT_LIMIT
    return isinstance(value, float) and math.isfinite(value)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool), as timings and counters must be."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return is_scalar(value)


def as_scalar(value: Any) -> Any:
    """``value`` as stored: a scalar as it is, anything else as its ``str()``."""
    return value if is_scalar(value) else str(value)


def stored_key(key: Sequence[Any]) -> tuple[Any, ...]:
    """A key's elements as a book stores them."""
    return tuple(as_scalar(v) for v in key)


def key_text(key: Sequence[Any]) -> str:
    """The name of a key in a book (see the module docstring)."""
    return json.dumps(list(stored_key(key)), separators=(",", ":"))


def parse_key_texts(texts: Sequence[str]) -> list[Any]:
    """Each key text parsed (a list), or None where it is not a key: one parse for them all
    when every one is JSON (a page of 40,000 keys costs one pass), else one parse each.

    >>> parse_key_texts(['[4096,"fp16"]', "junk", "[" * 5000])
    [[4096, 'fp16'], None, None]
    """
    ok = [t.startswith("[") and t.endswith("]") for t in texts]
    try:
        parsed = json.loads("[" + ",".join(t for t, good in zip(texts, ok) if good) + "]")
    except (ValueError, RecursionError):  # a name that is not JSON, or nested past the parser
        parsed = [_parse_one(t) for t, good in zip(texts, ok) if good]
    found = iter(parsed)
    return [next(found) if good else None for good in ok]


def _parse_one(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _reject_constant(name: str) -> Any:
    raise BookFormatError(f"{name} is not a number a book may hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BookFormatError(f"{text} is out of range for a number in a book")
    return value


def _bounded_int(text: str) -> int:
    # Checked on the text first: converting thousands of digits is itself slow.
    if len(text.lstrip("-")) > 19 or not -INT_LIMIT <= int(text) < INT_LIMIT:
        raise BookFormatError(f"the integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond 64 bits")
    return int(text)


def strict_loads(text: str | bytes, *, unique_keys: bool = False) -> Any:
    """Parse JSON strictly (see the module docstring); raises ValueError (BookFormatError).

    ``unique_keys``: an object naming a key twice is refused too (``json`` keeps the last
    silently). Off for books, which tunebook writes (a hook on every object costs ~25% of
    parsing); on for files people keep by hand, where a repeated key is a lost entry."""
    hook = _unique_pairs if unique_keys else None
    return json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        parse_int=_bounded_int,
        object_pairs_hook=hook,
    )


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise BookFormatError(f"the key {json.dumps(name)} appears twice in one object")
        out[name] = value
    return out


def dumps(value: Any) -> str:
    """Deterministic, strict JSON of ``value`` (sorted keys, no NaN)."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


_SLUG = re.compile(r"[^A-Za-z0-9_]+")


def slug(text: str, limit: int = 60, empty: str = "x") -> str:
    """A readable, file-name-safe form of ``text`` (see the module docstring)."""
    return (_SLUG.sub("-", text).strip("-") or empty)[:limit]
