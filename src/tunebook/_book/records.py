"""The book's records and its JSON schema (version 1; docs/book-format.md is the reference).

One document per (kernel, platform)::

    {"format": "tunebook-book", "version": 1,
     "kernel":   {"name": "...", "hash": "<sha256 of source+deps>", "key": ["M", "N"]},
     "platform": {"backend": "cuda", "device": "NVIDIA H200", "arch": "90", ...},
     "entries":  {"[4096,4096,\\"torch.float16\\"]": {
         "key": [4096, 4096, "torch.float16"],
         "results": {"<config id>": {"config": {...}, "ms": [0.41, 0.40, 0.42], "error": null,
                                     "at": "2026-11-21T05:00:00Z"}},
         "winner": "<config id>", "tuning_seconds": 6.1, "tuned_at": "...", "updated_at": "...",
         "tunebook": "0.1.0"}}}

Records are immutable; merging builds new ones. Parsing validates every field and raises
:class:`BookFormatError`, which the file layer turns into one warning and a skipped file.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from .._errors import BookFormatError
from .._jsonio import as_scalar, is_number, is_scalar

FORMAT = "tunebook-book"
VERSION = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------- configs


def config_record(kwargs: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """A Config as stored: its meta-parameters under "kwargs", its compiler options beside."""
    record: dict[str, Any] = {"kwargs": {k: as_scalar(kwargs[k]) for k in sorted(kwargs)}}
    for name in sorted(options):
        record[name] = as_scalar(options[name])
    return record


def config_id(record: Mapping[str, Any]) -> str:
    """A stable, readable id: ``BLOCK_M=64,BLOCK_N=32|num_stages=3,num_warps=4``.

    >>> config_id({"kwargs": {"BLOCK": 64, "EVEN": True}, "num_warps": 4})
    'BLOCK=64,EVEN=true|num_warps=4'
    >>> config_id({"kwargs": {"SHIFT": 0.0}}), config_id({"kwargs": {"SHIFT": -0.0}})
    ('SHIFT=0.0|', 'SHIFT=-0.0|')
    """
    kwargs = record.get("kwargs", {})
    meta = ",".join(_field(k, kwargs[k]) for k in sorted(kwargs))
    opts = ",".join(_field(k, record[k]) for k in sorted(record) if k != "kwargs")
    return f"{meta}|{opts}"


def _field(name: str, value: Any) -> str:
    # A Space of thousands of points names each of them on a key's first call: one
    # json.dumps per distinct (name, value) instead of one per field of every config.
    if type(value) is float:  # 0.0 and -0.0 hash and compare equal but are two configs
        return f"{name}={json.dumps(value)}"
    try:
        return _field_text(name, type(value).__name__, value)
    except TypeError:  # unhashable: not a JSON scalar, but ids are made before validation too
        return f"{name}={json.dumps(value)}"


@functools.lru_cache(maxsize=4096)
def _field_text(name: str, kind: str, value: Any) -> str:
    # ``kind`` keeps True apart from 1 and 1.0, which hash and compare equal.
    return f"{name}={json.dumps(value)}"


# --------------------------------------------------------------------- records


# Within this fraction of the fastest median, a config chosen earlier for a key (stored as
# Entry.chosen) keeps its place: re-measuring near-equal configs must not flip the winner.
TIE_TOLERANCE = 0.02
# The longest timing a book holds: 1e9 ms is 11.6 days, no kernel's. A larger value is a hand
# edit, and read as one it made every ratio against it overflow (speed-ups of "infx", JSON
# output that refused to encode, a report's plot that raised).
MOST_MS = 1e9


@dataclass(frozen=True)
class Result:
    """One measured config for one key: a timing in ms [median, p20, p80], or a failure.

    ``quick`` marks a short screening measurement (adaptive benchmarking measures every
    candidate briefly, then only the contenders in full); a full one supersedes it.
    """

    config: dict[str, Any]
    ms: tuple[float, float, float] | None
    error: str | None = None
    at: str = ""
    quick: bool = False

    @property
    def ok(self) -> bool:
        return self.ms is not None and math.isfinite(self.ms[0])

    @property
    def median(self) -> float:
        return self.ms[0] if self.ok and self.ms is not None else math.inf

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "config": self.config,
            "ms": list(self.ms) if self.ms else None,
            "error": self.error,
            "at": self.at,
        }
        if self.quick:
            data["quick"] = True
        return data

    @staticmethod
    def from_json(data: Any, where: str) -> Result:
        if not isinstance(data, dict):
            raise BookFormatError(f"{where}: expected an object, found {type(data).__name__}")
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("kwargs"), dict):
            raise BookFormatError(f"{where}: 'config' must be an object with a 'kwargs' object")
        values = [*config["kwargs"].values(), *(v for k, v in config.items() if k != "kwargs")]
        if not all(is_scalar(v) for v in values):
            raise BookFormatError(f"{where}: config values must be strings, finite numbers, booleans or null")
        ms = data.get("ms")
        error = data.get("error")
        if ms is not None:
            if (
                not isinstance(ms, list)
                or len(ms) != 3
                or not all(is_number(v) for v in ms)
                or not all(0 <= v <= MOST_MS for v in ms)
            ):
                raise BookFormatError(
                    f"{where}: 'ms' must be [median, p20, p80] of non-negative numbers of at most "
                    f"{MOST_MS:.0e} ms"
                )
            ms = (float(ms[0]), float(ms[1]), float(ms[2]))
        if error is not None and not isinstance(error, str):
            raise BookFormatError(f"{where}: 'error' must be a string or null")
        if ms is None and error is None:
            raise BookFormatError(f"{where}: a result needs a timing ('ms') or a failure reason ('error')")
        at = data.get("at", "")
        quick = data.get("quick", False)
        if not isinstance(quick, bool):
            raise BookFormatError(f"{where}: 'quick' must be true or false")
        return Result(config=config, ms=ms, error=error, at=at if isinstance(at, str) else "", quick=quick)


@dataclass(frozen=True)
class Entry:
    """Everything measured for one key of one kernel on one platform."""

    key: tuple[Any, ...]
    results: dict[str, Result] = field(default_factory=dict)
    tuning_seconds: float = 0.0
    tuned_at: str = ""
    updated_at: str = ""
    tunebook: str = ""
    chosen: str = ""
    # A recorded miss: how often serve mode met this key without results, and a replayable
    # description of the call (see tunebook._calls) so that it can be tuned offline.
    misses: int = 0
    call: dict[str, Any] | None = None
    # The id of the first candidate config when the key was tuned: the kernel's default, the
    # config an untuned kernel would run (what `tunebook show` measures speed-ups against).
    first: str = ""
    # News of a search that started over a decided entry (a larger budget, a config added to
    # the list): the ``chosen`` it started over, which it reopens while that choice still
    # stands (``merged_over``). Not stored in a key's file: it describes a write (pending
    # news keep it, ``pagedir.entry_text(news=True)``).
    reopens: str = field(default="", compare=False)

    def best(self, allowed: Iterable[str] | None = None) -> str | None:
        """The winner among ``allowed`` (default: all results).

        The fastest successful config (the earlier in ``allowed`` on equal times), unless
        the config recorded as ``chosen`` is allowed and within TIE_TOLERANCE of it: then
        the chosen one, so that the same book gives the same winner run after run. Where
        some results are full measurements, quick screenings do not compete with them: a
        screening reads lower than a full measurement of the same config.
        """
        ids = list(allowed) if allowed is not None else sorted(self.results)
        full = any((r := self.results.get(cid)) is not None and r.ok and not r.quick for cid in ids)
        best_id, best_ms = None, math.inf
        for cid in ids:
            result = self.results.get(cid)
            if result is not None and not (full and result.quick) and result.median < best_ms:
                best_id, best_ms = cid, result.median
        chosen = self.results.get(self.chosen) if self.chosen else None
        if (
            best_id is not None
            and chosen is not None
            and chosen.ok
            and self.chosen in ids
            and chosen.median <= best_ms * (1 + TIE_TOLERANCE)
        ):
            return self.chosen
        return best_id

    def to_json(self) -> dict[str, Any]:
        return {
            "key": list(self.key),
            "results": {cid: self.results[cid].to_json() for cid in sorted(self.results)},
            "winner": self.best(),
            "tuning_seconds": round(self.tuning_seconds, 6),
            "tuned_at": self.tuned_at,
            "updated_at": self.updated_at,
            "tunebook": self.tunebook,
            **({"chosen": self.chosen} if self.chosen else {}),
            **({"misses": self.misses} if self.misses else {}),
            **({"first": self.first} if self.first else {}),
            **({"call": self.call} if self.call is not None else {}),
        }

    @staticmethod
    def from_json(data: Any, where: str) -> Entry:
        if not isinstance(data, dict):
            raise BookFormatError(f"{where}: expected an object, found {type(data).__name__}")
        key = data.get("key")
        results = data.get("results")
        if not isinstance(key, list):
            raise BookFormatError(f"{where}: 'key' must be a list")
        if not isinstance(results, dict):
            raise BookFormatError(f"{where}: 'results' must be an object")
        parsed = {}
        for cid, raw in results.items():
            result = Result.from_json(raw, f"{where}.results[{cid!r}]")
            if config_id(result.config) != cid:
                raise BookFormatError(f"{where}: result id {cid!r} does not match its config")
            parsed[cid] = result
        seconds = data.get("tuning_seconds", 0.0)
        if not is_number(seconds) or seconds < 0:
            raise BookFormatError(f"{where}: 'tuning_seconds' must be a finite non-negative number")
        if not all(is_scalar(v) for v in key):
            raise BookFormatError(f"{where}: 'key' values must be strings, finite numbers, booleans or null")
        misses = data.get("misses", 0)
        if not isinstance(misses, int) or isinstance(misses, bool) or not 0 <= misses < 1 << 62:
            raise BookFormatError(f"{where}: 'misses' must be a non-negative integer")
        call = data.get("call")
        if call is not None:
            from .._calls import validate  # deferred: _calls is only needed for recorded misses

            reason = validate(call, f"{where}.call")
            if reason:
                raise BookFormatError(reason)

        def text(name: str) -> str:
            value = data.get(name, "")
            return value if isinstance(value, str) else ""

        return Entry(
            reopens=text("reopens"),
            key=tuple(key),
            results=parsed,
            tuning_seconds=float(seconds),
            tuned_at=text("tuned_at"),
            updated_at=text("updated_at"),
            tunebook=text("tunebook"),
            chosen=text("chosen"),
            misses=misses,
            call=call,
            first=text("first"),
        )

    def merged_over(self, base: Entry | None) -> Entry:
        """This entry's news added to ``base``, which stands where both measured a config.

        "Base stands" is what makes every process of a host serve the same winner: the
        first measurement persisted for (key, config) is the one everybody reads, and once
        a search of the key has ended (``chosen``), no later write changes a result, unless
        the news ``reopens`` it: a search resumed over the decided entry (a larger budget,
        a config added to the list) confirms its contenders and makes its own choice, as
        long as the choice it started over still stands. (Once another resumed search has
        decided, this one's writes are ordinary: two processes resuming one key end on the
        first one's choice.)
        """
        if base is None:
            return self
        results = dict(self.results)
        # A full measurement replaces a quick one until a search of the key has ended with a
        # choice (``chosen`` stored): from then on the results it decided on stand as they
        # are, or a process confirming its own contenders later would overturn the winner
        # that the processes which already decided now serve. A resumed search is a new
        # search: without this, a config it found faster stayed a screening, which never
        # competes with full measurements, and the old winner stood (on an H200, a decode key
        # kept a config 15% slower than the one its resumed search had screened and confirmed).
        reopening = bool(self.reopens) and base.chosen == self.reopens
        open_search = not base.chosen or reopening
        # So does a result that ran over a failure: a failure that says nothing about its
        # config (a timer's NaN, an error of the call; _failures.py) is measured again while no
        # config of the key has run, and the search that does so decides on what it measured.
        # And a later wrong result judged otherwise: a key whose check= verdicts were judged
        # under other settings or against another reference is judged again (_tuner.judged_again),
        # and the old verdicts would have it judged again in every process.
        for cid, result in base.results.items():
            mine = results.get(cid)
            replaced = mine is not None and (
                (result.quick and not mine.quick) or (not result.ok and mine.ok) or _judged_anew(result, mine)
            )
            if not (open_search and replaced):
                results[cid] = result
        added = any(cid not in base.results or results[cid] is not base.results[cid] for cid in self.results)
        return replace(
            base,
            results=results,
            chosen=self.chosen if reopening and self.chosen else base.chosen or self.chosen,
            misses=base.misses + self.misses,
            call=base.call if base.call is not None else self.call,
            first=base.first or self.first,
            tuning_seconds=base.tuning_seconds + (self.tuning_seconds if added else 0.0),
            tuned_at=min(filter(None, (base.tuned_at, self.tuned_at)), default=""),
            updated_at=max(base.updated_at, self.updated_at),
            reopens=self.reopens or base.reopens,  # news merged over earlier news stay news
        )


def _judged_anew(base: Result, news: Result) -> bool:
    """Whether ``news`` is a wrong result under ``check=``, no older than ``base``, judged
    otherwise than ``base`` was (another reference or settings; ``base`` ran or failed otherwise)."""
    from .._failures import is_wrong_result, judged_under  # deferred: _failures reads these records

    return is_wrong_result(news) and news.at >= base.at and judged_under(news) != judged_under(base)


NEWER = "written by a newer tunebook"  # how check_format's refusal of a newer file begins


def check_format(data: Any, fmt: str, oldest: int, newest: int) -> None:
    """Raise BookFormatError unless ``data`` is an object of format ``fmt`` with a version
    this tunebook reads (``oldest`` to ``newest``); a newer one says to upgrade."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise BookFormatError(f'not a tunebook book (no "format": "{fmt}" field)')
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BookFormatError("the 'version' field is missing or not an integer")
    if version > newest:
        raise BookFormatError(
            f"{NEWER} (book format {version}; this tunebook reads up to {newest}); upgrade tunebook to use it"
        )
    if version < oldest:
        raise BookFormatError(f"unknown book format version {version}")


@dataclass(frozen=True)
class Document:
    """A kernel's entries on one platform (a page of the book), or some of them.

    ``index``: every key text the store holds, when it was asked for (``fetch(name, keys=())``).
    """

    kernel: dict[str, Any]
    platform: dict[str, Any]
    entries: dict[str, Entry] = field(default_factory=dict)
    index: frozenset[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kernel": self.kernel,
            "platform": self.platform,
            "entries": {k: self.entries[k].to_json() for k in sorted(self.entries)},
        }

    def dumps(self) -> str:
        """Deterministic, diff-friendly JSON: one line per result, sorted everywhere."""

        def one(value: Any) -> str:
            return json.dumps(value, sort_keys=True, allow_nan=False)

        data = self.to_json()
        lines = ["{", f' "format": {one(FORMAT)},', f' "version": {VERSION},']
        lines.append(f' "kernel": {one(data["kernel"])},')
        lines.append(f' "platform": {one(data["platform"])},')
        entries = data["entries"]
        if not entries:
            lines.append(' "entries": {}')
        else:
            lines.append(' "entries": {')
            for i, (key_text, entry) in enumerate(entries.items()):
                head = {k: v for k, v in entry.items() if k != "results"}
                lines.append(f'  {one(key_text)}: {one(head)[:-1]}, "results": {{')
                results = list(entry["results"].items())
                for j, (cid, result) in enumerate(results):
                    sep = "," if j < len(results) - 1 else ""
                    lines.append(f"   {one(cid)}: {one(result)}{sep}")
                lines.append("  }}" + ("," if i < len(entries) - 1 else ""))
            lines.append(" }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def from_json(data: Any) -> Document:
        check_format(data, FORMAT, 1, VERSION)
        kernel, platform, entries = data.get("kernel"), data.get("platform"), data.get("entries")
        check_identity(kernel, platform)
        if not isinstance(entries, dict):
            raise BookFormatError("'entries' must be an object")
        parsed = {k: Entry.from_json(v, f"entries[{k!r}]") for k, v in entries.items()}
        return Document(kernel=kernel, platform=platform, entries=parsed)

    def merged_over(self, base: Document | None) -> Document:
        if base is None:
            return self
        entries = dict(base.entries)
        for k, entry in self.entries.items():
            entries[k] = entry.merged_over(base.entries.get(k))
        return replace(base, entries=entries)


def check_identity(kernel: Any, platform: Any) -> None:
    """Raise BookFormatError unless a page's ``kernel`` and ``platform`` are what a page holds:
    objects (the kernel's with its ``hash``) that JSON can write back (no NaN or infinity, which
    Python's parser accepts and a strict writer refuses: such a page would read and never write)."""
    if not isinstance(kernel, dict) or not isinstance(kernel.get("hash"), str):
        raise BookFormatError("'kernel' must be an object with a 'hash' string")
    if not isinstance(platform, dict):
        raise BookFormatError("'platform' must be an object")
    for name, value in (("kernel", kernel), ("platform", platform)):
        try:
            json.dumps(value, allow_nan=False)
        except (ValueError, TypeError) as exc:
            raise BookFormatError(f"'{name}' holds a value JSON cannot write ({exc})") from None
