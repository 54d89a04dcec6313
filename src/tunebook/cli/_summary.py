"""What an entry says, in numbers people compare: winner, reference, speed-up, failures.

**The reference config** (one rule, named the same in ``show``, ``--json``, the report and
docs/cli.md). By default (``first``) the speed-up is measured against the **first
config**: the one the kernel runs untuned (the first config it lists, or the first point of
its Space), which the autotuner records with each key it tunes (``Entry.first``). Where the
first config has no timing, the key falls back to the **median config** — sort the
successful configs by median time and take the middle one (the slower of the two middle
ones for an even count) — and says why in ``note``: the first config failed, was not
measured (a budgeted search skipped it), or is not recorded (a book from before tunebook
recorded it). ``--reference median`` and ``--reference slowest`` choose those rules for
every key.

**Recorded misses** (entries that serve mode met ``misses`` times and that have no results
yet) are shown as such, with the command that tunes them (:func:`miss_hint`).

**Imported entries** (platform timer ``imported:<format>``, see ``_vllm_format``) carry a
declared winner and no timing: their times and speed-ups are reported as absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .._book.records import Document, Entry
from .._tables import IMPORTED_PREFIX

Reference = Literal["first", "median", "slowest"]
REFERENCES: tuple[Reference, ...] = ("first", "median", "slowest")


def is_imported(doc: Document) -> bool:
    return str(doc.platform.get("timer", "")).startswith(IMPORTED_PREFIX)


@dataclass(frozen=True)
class KeySummary:
    """One key of one page, summarised."""

    key: list[Any]
    winner: str | None
    winner_config: dict[str, Any] | None
    winner_ms: float | None
    reference: str | None
    reference_ms: float | None
    reference_rule: str
    reference_note: str | None  # why the first config could not be the reference, if it could not
    configs: int
    failures: list[tuple[str, str]]
    imported: bool
    misses: int  # calls serve mode met without results

    @property
    def recorded_miss(self) -> bool:
        return self.misses > 0 and self.configs == 0

    @property
    def speedup(self) -> float | None:
        if self.winner_ms is None or self.reference_ms is None or self.winner_ms <= 0:
            return None
        ratio = self.reference_ms / self.winner_ms
        return ratio if math.isfinite(ratio) else None  # a winner of 1e-310 ms (a hand edit)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "winner": self.winner,
            "winner_config": self.winner_config,
            "winner_ms": self.winner_ms,
            "reference": {
                "rule": self.reference_rule,
                "config": self.reference,
                "ms": self.reference_ms,
                "note": self.reference_note,
            },
            "speedup": round(self.speedup, 6) if self.speedup is not None else None,
            "configs": self.configs,
            "failed": len(self.failures),
            "failures": [{"config": cid, "error": err} for cid, err in self.failures],
            "imported": self.imported,
            "misses": self.misses,
            "recorded_miss": self.recorded_miss,
        }


def summarise(entry: Entry, imported: bool, reference: Reference = "first") -> KeySummary:
    winner = entry.best()
    ok = sorted((r.median, cid) for cid, r in entry.results.items() if r.ok)
    failures = sorted((cid, r.error or "no timing") for cid, r in entry.results.items() if not r.ok)
    ref_id = ref_ms = note = None
    rule: str = reference
    first = entry.results.get(entry.first) if entry.first else None
    if reference == "first" and ok and not imported:
        if first is not None and first.ok:
            ref_ms, ref_id = first.median, entry.first
        else:
            rule, note = "median", _why_not_first(entry)
    if ok and not imported and ref_id is None:
        ref_ms, ref_id = ok[-1] if rule == "slowest" else ok[len(ok) // 2]
    best = entry.results.get(winner) if winner is not None else None
    return KeySummary(
        key=list(entry.key),
        winner=winner,
        winner_config=best.config if best is not None else None,
        winner_ms=best.median if best is not None and not imported else None,
        reference=ref_id,
        reference_ms=ref_ms,
        reference_rule=rule,
        reference_note=note,
        configs=len(entry.results),
        failures=failures,
        imported=imported,
        misses=entry.misses,
    )


def is_recorded_miss(entry: Entry) -> bool:
    """Serve mode met this key and nothing has been measured for it yet."""
    return entry.misses > 0 and not entry.results


def miss_hint(module: str = "MODULE") -> str:
    """What to do about recorded misses, said the same way by every command."""
    return f"recorded miss: run `tunebook tune --misses {module}`"


def winner_cell(summary: KeySummary) -> str:
    """The winner as a table cell; a recorded miss says so instead of ``-``."""
    if summary.recorded_miss:
        # One miss a serving process records a key (not one per call): the count is processes.
        n = summary.misses
        return f"recorded miss ({n} serving process{'es' if n != 1 else ''})"
    return short_config(summary.winner_config)


def misses_line(summaries: list[KeySummary], kernel: str) -> str | None:
    """The line under a table that has recorded misses: how many, and the command to tune them."""
    n = sum(s.recorded_miss for s in summaries)
    if not n:
        return None
    return f"{n} key(s) without results; {miss_hint()} (MODULE: the module that defines {kernel})"


def _why_not_first(entry: Entry) -> str:
    if not entry.first:
        return "the first config is not recorded"
    if entry.first in entry.results:
        return "the first config failed"
    return "the first config was not measured"


def reference_header(reference: Reference) -> str:
    """The reference column's name: ``first config``, ``median config`` or ``slowest config``."""
    return f"{reference} config"


def reference_cell(summary: KeySummary) -> str:
    """The reference time, labelled with the rule where the first config could not be used."""
    time = fmt_time(summary.reference_ms)
    return f"{time} median" if summary.reference_note is not None else time


def reference_notes(summaries: list[KeySummary]) -> list[str]:
    """One line per reason a key fell back to the median config, for under a table."""
    counts: dict[str, int] = {}
    for s in summaries:
        if s.reference_note is not None:
            counts[s.reference_note] = counts.get(s.reference_note, 0) + 1
    return [
        f"median: {note} for {n} key(s); their reference is the median measured config"
        for note, n in sorted(counts.items())
    ]


def key_order(key: Any) -> tuple[Any, ...]:
    """Sort keys as people read them: 100 before 1000, numbers before text."""
    return tuple(
        (0, float(v), "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0.0, str(v))
        for v in key
    )


def sorted_entries(doc: Document) -> list[Entry]:
    return sorted(doc.entries.values(), key=lambda e: key_order(e.key))


def summarise_page(doc: Document, reference: Reference = "first") -> list[KeySummary]:
    """Every key of ``doc``, in natural key order."""
    imported = is_imported(doc)
    return [summarise(entry, imported, reference) for entry in sorted_entries(doc)]


def short_config(config: dict[str, Any] | None) -> str:
    """``BLOCK=64 w4 s3``: a config in a table cell."""
    if config is None:
        return "-"
    parts = [f"{k}={json.dumps(v)}" for k, v in sorted(config.get("kwargs", {}).items())]
    abbrev = {"num_warps": "w", "num_stages": "s", "num_ctas": "ctas", "maxnreg": "maxnreg"}
    for name in sorted(config):
        if name == "kwargs" or config[name] is None:
            continue
        if name == "num_ctas" and config[name] == 1:
            continue  # the default on every GPU: noise in a table
        parts.append(f"{abbrev.get(name, name + '=')}{config[name]}")
    return " ".join(parts)


def fmt_time(ms: float | None) -> str:
    """A time in milliseconds as people read it: ``412 µs``, ``3.00 ms``, ``10.1 s``."""
    if ms is None:
        return "-"
    value, unit = ms * 1e6, "ns"
    for larger in ("µs", "ms", "s"):
        if value < 999.5:  # would still round to 3 digits in this unit
            break
        value, unit = value / 1e3, larger
    text = f"{value:#.3g}".rstrip(".") if value < 999.5 else f"{value:.0f}"
    return f"{text} {unit}"


def fmt_key(key: list[Any]) -> str:
    text = json.dumps(key, separators=(",", ":"), ensure_ascii=False)  # a person reads it
    # A lone surrogate (a key from a file name that is not UTF-8) cannot be printed or written.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
