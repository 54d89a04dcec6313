"""Timing tables: every config of one kernel at one shape on one platform, measured.

Tables let strategies be replayed offline (Kernel Tuner calls it simulation mode): the
"measurement" is a look-up. ``benchmarks/measure_tables.py`` writes them on a GPU;
``tests/data/tables/`` holds the ones the strategy tests loop over. Format (JSON, version 1)::

    {"format": "tunebook-timing-table", "version": 1,
     "kernel": "matmul",
     "shape": {"M": 4096, "N": 4096, "K": 4096, "dtype": "float16"},
     "platform": {"backend": "cuda", "device": "NVIDIA H100 80GB HBM3", "arch": "90",
                  "triton": "3.6.0", "timer": "do_bench median"},
     "space": {"BLOCK_M": [32, 64, 128], "...": "..."},             (optional, informative)
     "results": [{"config": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, "ms": 0.412},
                 {"config": {...}, "ms": null, "error": "OutOfResources: shared memory ..."}]}

``config`` is a flat candidate dict (meta-parameters and Config options side by side, as
``Space.candidates()`` yields them); ``ms`` is the median in milliseconds, or null for a
config that failed, with the reason in ``error``; ``spread`` (optional) is [p20, p80] in ms.
Other keys are ignored.

>>> rows = (TableRow({"B": 16}, 2.0), TableRow({"B": 32}, None, "OOR"))
>>> t = Table("k", {"N": 8}, {"backend": "cuda"}, rows)
>>> t.best(), t.measure()([0, 1])
((0, 2.0), {0: 2.0, 1: inf})
>>> Table.from_json(t.to_json()) == t
True
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._book.files import atomic_write_text

__all__ = ["FORMAT", "VERSION", "Table", "TableRow"]

FORMAT = "tunebook-timing-table"
VERSION = 1


@dataclass(frozen=True)
class TableRow:
    """One config and its median time in ms (None: it failed, ``error`` says why);
    ``spread`` is the (p20, p80) of the timing when the measurer kept it."""

    config: dict[str, Any]
    ms: float | None
    error: str | None = None
    spread: tuple[float, float] | None = None


@dataclass(frozen=True)
class Table:
    kernel: str
    shape: dict[str, Any]
    platform: dict[str, Any]
    rows: tuple[TableRow, ...]
    space: dict[str, list[Any]] | None = field(default=None, compare=False)

    def candidates(self) -> list[dict[str, Any]]:
        return [dict(r.config) for r in self.rows]

    def timings(self) -> dict[int, float]:
        return {i: r.ms if r.ms is not None else math.inf for i, r in enumerate(self.rows)}

    def best(self) -> tuple[int, float]:
        """(index, ms) of the fastest config; (-1, inf) if every one failed."""
        finite = [(ms, i) for i, ms in self.timings().items() if math.isfinite(ms)]
        ms, i = min(finite) if finite else (math.inf, -1)
        return i, ms

    def measure(self) -> Callable[[list[int]], dict[int, float]]:
        """A ``measure`` for :func:`~tunebook._search.search` that replays this table."""
        timings = self.timings()
        return lambda batch: {i: timings[i] for i in batch}

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "kernel": self.kernel,
            "shape": self.shape,
            "platform": self.platform,
        }
        if self.space is not None:
            doc["space"] = self.space
        doc["results"] = [
            {
                "config": r.config,
                "ms": r.ms,
                **({"error": r.error} if r.error is not None else {}),
                **({"spread": list(r.spread)} if r.spread is not None else {}),
            }
            for r in self.rows
        ]
        return doc

    @staticmethod
    def from_json(doc: Mapping[str, Any], where: str = "table") -> Table:
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(
                f"{where}: not a {FORMAT} version {VERSION} document (format={doc.get('format')!r}, "
                f"version={doc.get('version')!r})"
            )
        rows = []
        for k, raw in enumerate(doc.get("results", [])):
            ms = raw.get("ms")
            if not isinstance(raw.get("config"), dict) or not (
                ms is None or (isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0)
            ):
                raise ValueError(f"{where}: results[{k}] needs a 'config' object and 'ms' >= 0 or null")
            spread = raw.get("spread")
            if not (isinstance(spread, list) and len(spread) == 2):
                spread = None
            spread = (float(spread[0]), float(spread[1])) if spread else None
            rows.append(TableRow(raw["config"], None if ms is None else float(ms), raw.get("error"), spread))
        return Table(
            kernel=str(doc.get("kernel", "")),
            shape=dict(doc.get("shape", {})),
            platform=dict(doc.get("platform", {})),
            rows=tuple(rows),
            space=doc.get("space"),
        )

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Table:
        with open(path, encoding="utf-8") as f:
            return Table.from_json(json.load(f), where=str(path))

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: one result per line, so diffs of re-measured tables stay readable."""
        doc = self.to_json()
        results = doc.pop("results")
        head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items())
        lines = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in results)
        text = f'{{\n{head},\n "results": [\n{lines}\n ]\n}}\n'
        atomic_write_text(Path(path), text)
