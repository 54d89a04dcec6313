"""Imported tables a kernel reads: serve-mode answers on their GPU, search hints elsewhere.

``tunebook import --format vllm --kernel NAME`` files another tool's tuned tables (vLLM's
fused-MoE configs) as pages of their own platform (``"backend": "imported"``, the device
they were tuned on, a kernel hash ``"imported:<format>"``): declared winners, no timings.
They are not this kernel's results, so the autotuner never reads them as such. A kernel
that wants them says so, and says how they map onto it, with :class:`Tables`:

* its key -> the imported key's fields (``key``; None: no table applies to this key),
  one field (``nearest``, vLLM's batch size M) matched by the nearest value, the others
  exactly (a field the mapping leaves out matches only entries without it: vLLM's
  ``dtype=fp8_w8a8`` tables never answer a 16-bit call);
* an imported config -> its own config (``config``; None: no config of this kernel).

Then, where the book has no result for a key:

* in ``serve`` mode, the entry of a table imported **from this GPU** is launched, if it is
  one of the configs the call allows: after the key's own partial results, before the
  nearest remembered key (a table tuned on this device for this very shape is closer
  than a neighbouring shape's winner);
* in ``tune`` mode, the entries of every table, this GPU's first, are hints: configs the
  search measures first.

The tables are read once per kernel and process, on its first miss, from the book's
directories (not Redis: listing a fleet's pages would be a SCAN); never on a hit. Several
pages for one GPU (two imports with different key columns) answer nearest entry first.

A mapping that raises or returns something else than a dict (or None) is reported once and
answers nothing: a table is advice, and a bad one must never stop a kernel call.

>>> same_device("NVIDIA H200", "NVIDIA_H200"), same_device("NVIDIA H200 NVL", "NVIDIA_H200")
(True, True)
>>> same_device("NVIDIA H100 80GB HBM3", "NVIDIA_H100")
False
>>> same_device("AMD Instinct MI300X VF", "AMD_Instinct_MI300X")  # a cloud VM's virtual function
True
>>> same_device("AMD Radeon RX 7900 XTX", "AMD_Radeon_RX7900XTX")  # vLLM's name for it
True
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from . import _warnings
from ._book import pagedir
from ._book.stores import DirectoryStore
from ._errors import ConfigurationError
from ._jsonio import as_scalar, slug

IMPORTED_BACKEND = "imported"
IMPORTED_PREFIX = "imported:"  # the kernel hash and timer of an imported page: imported:<format>


@dataclass(frozen=True)
class Tables:
    """Imported tables (``tunebook import ... --kernel NAME``) that a kernel reads.

    ``kernel``: the NAME the tables were imported under. ``key(key)``: this kernel's key
    (the tuple the book stores: key values, then argument dtypes) -> the imported key's
    fields by name, or None where no table applies. ``config(fields)``: an imported config
    (its fields, options included, as one dict) -> this kernel's config as one dict
    (meta-parameters and ``num_warps``/``num_stages``...), or None. ``nearest``: the key
    field matched by the nearest value (vLLM takes the entry of the nearest batch size).
    """

    kernel: str
    key: Callable[[tuple[Any, ...]], Mapping[str, Any] | None]
    config: Callable[[Mapping[str, Any]], Mapping[str, Any] | None]
    nearest: str | None = "M"

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, str) or not self.kernel.strip():
            raise ConfigurationError(
                "tunebook.Tables: kernel= must be the name the tables were imported under; "
                f"found {self.kernel!r}"
            )
        for label, fn in (("key", self.key), ("config", self.config)):
            if not callable(fn):
                raise ConfigurationError(
                    f"tunebook.Tables: {label}= must be a callable; found {type(fn).__name__}"
                )


@dataclass(frozen=True)
class TablePage:
    """One imported page: the device it was tuned on, and its entries as (key fields, config)."""

    device: str
    where: str
    entries: tuple[tuple[dict[str, Any], dict[str, Any]], ...]


@dataclass(frozen=True)
class Found:
    """The entry a table gives for a key: its device, its imported key, the config mapped
    onto the kernel (one dict), and how far its ``nearest`` field is from the key's."""

    device: str
    key: dict[str, Any]
    config: dict[str, Any]
    distance: float = 0.0

    def describe(self) -> str:
        fields = ",".join(f"{k}={v}" for k, v in self.key.items() if v is not None)
        return f"the imported table entry of {self.device} ({fields})"


def device_label(name: str) -> str:
    """A device name as tables name it: spaces as ``_``; any H200 variant is ``NVIDIA_H200``
    (vLLM's rule for its file names); a trailing ``VF`` (the virtual function a cloud VM
    sees) names the GPU it is part of, as vLLM's ROCm device-id map does."""
    parts = [part for part in re.split(r"[\s_]+", str(name)) if part]
    if "H200" in parts:
        return "NVIDIA_H200"
    if len(parts) > 1 and parts[-1].upper() == "VF":
        parts = parts[:-1]
    return "_".join(parts)


def same_device(a: str, b: str) -> bool:
    """Whether two device names are one GPU model, ignoring case, spaces and underscores
    (vLLM writes ``AMD_Radeon_RX7900XTX`` for what torch calls ``AMD Radeon RX 7900 XTX``)."""
    return _bare(device_label(a)) == _bare(device_label(b))


def _bare(label: str) -> str:
    return re.sub(r"[^0-9a-z]", "", label.lower())


def load(tables: Tables, directories: Sequence[Path], device: str | None = None) -> list[TablePage]:
    """The pages imported under ``tables.kernel`` in ``directories`` (earlier first); with
    ``device``, only that GPU's (serve mode reads one page, not a whole vendor's set).

    A page that is not an import, or whose kernel record is malformed, is skipped: a table
    is advice, and a bad one must never stop a kernel call.
    """
    found: list[TablePage] = []
    prefix = slug(tables.kernel, 60, "kernel") + "--"
    for directory in directories:
        try:
            names = sorted({pagedir.page_dir_name(p.name) for p in directory.glob(prefix + "*")})
        except OSError:
            continue
        store = DirectoryStore(directory, writable=False)
        for name in names:
            if "." in name:  # .corrupt-/.foreign- leftovers
                continue
            head = store.fetch(name + ".json", ())  # kernel and platform only
            if head is None or not _is_import(head.kernel, head.platform, tables.kernel):
                continue
            # vLLM's own spelling where the import kept it (messages name the file's device)
            page_device = str(head.platform.get("vllm_device_name") or head.platform.get("device", ""))
            if device is not None and not same_device(page_device, device):
                continue
            doc = store.fetch(name + ".json")
            if doc is not None:
                entries = _entries(doc.kernel["key"], doc.entries.values())
                found.append(TablePage(page_device, str(directory / name), entries))
    return found


def warn_if_unknown(tables: Tables, directories: Sequence[Path], label: str) -> None:
    """Say once, when the books hold no import under ``tables.kernel`` but one under a name
    close to it, which: a mistyped name (``vllm.mo``) otherwise served first configs with
    nothing said but "nothing comparable remembered". Reads only page heads (page.json),
    once per kernel; other names are no mistake (the pack's fused_moe declares vLLM's tables
    beside a user's own imports) and stay unsaid."""
    names: set[str] = set()
    for directory in directories:
        try:
            pages = [p for p in directory.iterdir() if "." not in p.name and p.is_dir()]
        except OSError:
            continue
        for page in pages:
            head = pagedir.read_page_file(page)[0]
            if head is not None and _is_import(
                head["kernel"], head["platform"], str(head["kernel"].get("name"))
            ):
                names.add(str(head["kernel"]["name"]))
    by_folded = {n.casefold(): n for n in sorted(names)}
    close = [by_folded[n] for n in difflib.get_close_matches(tables.kernel.casefold(), by_folded, 3, 0.8)]
    if tables.kernel in names or not close:
        return
    _warnings.warn_once(
        f"tables-unknown:{label}",
        "tunebook: %s: tables=Tables(%r) finds no table imported under that name in %s; did you "
        "mean %s? (the name given to `tunebook import --kernel`; said once)",
        label,
        tables.kernel,
        ", ".join(map(str, directories)),
        " or ".join(map(repr, close)),
    )


def _is_import(kernel: Mapping[str, Any], platform: Mapping[str, Any], name: str) -> bool:
    keys = kernel.get("key")
    return (
        kernel.get("name") == name
        and str(kernel.get("hash", "")).startswith(IMPORTED_PREFIX)
        and platform.get("backend") == IMPORTED_BACKEND
        and isinstance(keys, list)
        and all(isinstance(k, str) for k in keys)
    )


def _entries(names: list[str], entries: Any) -> tuple[tuple[dict[str, Any], dict[str, Any]], ...]:
    """(key fields by name, config fields) of each entry holding one declared winner."""
    out = []
    for entry in entries:
        ok = [r for r in entry.results.values() if r.ok]
        if len(ok) != 1 or len(entry.key) < len(names) or not isinstance(ok[0].config.get("kwargs"), dict):
            continue
        record = ok[0].config
        config = {**record["kwargs"], **{k: v for k, v in record.items() if k != "kwargs"}}
        out.append((dict(zip(names, map(as_scalar, entry.key))), config))
    return tuple(out)


def lookup(tables: Tables, pages: Sequence[TablePage], key: tuple[Any, ...]) -> list[Found]:
    """Per page, the entry that answers ``key`` (nearest ``tables.nearest``, the other fields
    equal), its config mapped onto the kernel, nearest first over all pages (ties: page
    order); pages with no such entry are left out. A field ``key=`` maps to None counts as
    absent."""
    wanted = _mapped(tables, "key", key, f"key {list(key)}")
    if wanted is None:
        return []
    wanted = {name: value for name, value in wanted.items() if value is not None}
    if tables.nearest is not None and not _number(wanted.get(tables.nearest)):
        _warnings.warn_once(
            f"tables-nearest:{tables.kernel}",
            "tunebook: tunebook.Tables(%r): key= gives %s=%r for key %s, not a number; the tables are "
            "matched by the nearest %s, so none answers (said once; fields given: %s)",
            tables.kernel,
            tables.nearest,
            wanted.get(tables.nearest),
            list(key),
            tables.nearest,
            sorted(wanted),
        )
        return []
    found: list[Found] = []
    for page in pages:
        best: tuple[float, float, dict[str, Any], dict[str, Any]] | None = None
        for fields, config in page.entries:
            if not _matches(fields, wanted, tables.nearest):
                continue
            distance, value = 0.0, 0.0  # without a nearest field: the first match
            if tables.nearest is not None:
                have = fields.get(tables.nearest)
                if not _number(have):
                    continue
                value = float(have)
                distance = abs(value - float(wanted[tables.nearest]))
            # vLLM takes the nearest batch size, the smaller of two equally near
            if best is None or (distance, value) < (best[0], best[1]):
                best = (distance, value, fields, config)
        if best is None:
            continue
        mapped = _mapped(tables, "config", best[3], f"the entry {best[2]} of {page.device}")
        if mapped is not None:
            found.append(Found(page.device, best[2], dict(mapped), best[0]))
    return sorted(found, key=lambda f: f.distance)  # stable: page order breaks ties


def _mapped(tables: Tables, which: str, value: Any, about: str) -> Mapping[str, Any] | None:
    """``tables.key(value)`` or ``tables.config(value)``; a mapping that raises or returns
    something else than a dict or None is reported once (per table, mapping and kind of
    failure) and gives None."""
    fn = tables.key if which == "key" else tables.config
    try:
        got = fn(value)
    except Exception as exc:  # a user's mapping: any failure means "no table here"
        problem, kind = f"raised {type(exc).__name__}: {exc}", type(exc).__name__
    else:
        if got is None or isinstance(got, Mapping):
            return got
        problem, kind = f"returned an object of type {type(got).__name__}, not a dict or None", "type"
    _warnings.warn_once(
        f"tables-map:{tables.kernel}:{which}:{kind}",
        "tunebook: tunebook.Tables(%r): %s= %s for %s; no table answers there (said once; fix the "
        "mapping passed to tunebook.Tables)",
        tables.kernel,
        which,
        problem,
        about,
    )
    return None


def _matches(fields: Mapping[str, Any], wanted: Mapping[str, Any], nearest: str | None) -> bool:
    """Whether an imported key equals ``wanted`` on every field but ``nearest``; a field
    ``wanted`` leaves out must be absent (None) in the entry."""
    for name, value in fields.items():
        if name == nearest:
            continue
        if value != wanted.get(name):
            return False
    if nearest is not None and nearest not in fields:
        return False
    return all(name in fields for name in wanted if name != nearest)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def candidate_id(found: Found, ids: Sequence[str], candidates: Sequence[Any]) -> str | None:
    """The id of the candidate that launches exactly ``found.config``, if the call allows one.
    An option the entry leaves out is the one a ``triton.Config`` without it launches (vLLM
    passes its entries to the launch as they are)."""
    from ._compat import Config, config_options

    defaults = config_options(Config({}))
    wanted = {**defaults, **found.config}
    for cid, config in zip(ids, candidates):
        kwargs = dict(config.kwargs)
        if set(kwargs) - set(wanted):
            continue
        options = {**defaults, **config_options(config)}
        if all(kwargs[k] == v if k in kwargs else options.get(k) == v for k, v in wanted.items()):
            return cid
    return None


class WhyNot:
    """``why_not(found, candidates)``, worked out only if a warning prints it (``%s``): a
    warning said once is skipped on every later miss, and the scan reads every candidate."""

    def __init__(self, found: Found, candidates: Sequence[Any]) -> None:
        self.found, self.candidates = found, candidates

    def __str__(self) -> str:
        return why_not(self.found, self.candidates)


def why_not(found: Found, candidates: Sequence[Any]) -> str:
    """Why no candidate launches ``found.config``, for the warning that passes it over: the
    fields whose value no candidate has, or that the values exist but never together."""
    from ._compat import Config, config_options

    defaults = config_options(Config({}))
    seen: dict[str, set[str]] = {}
    for config in candidates:
        for k, v in {**defaults, **config_options(config), **dict(config.kwargs)}.items():
            seen.setdefault(k, set()).add(repr(v))
    wanted = {**defaults, **found.config}  # an option left out is Triton's default (candidate_id)
    missing = [f"{k}={v!r}" for k, v in wanted.items() if repr(v) not in seen.get(k, set())]
    if missing:
        return "no config the call allows has " + ", ".join(missing)
    return "each value occurs in some allowed config, but no allowed config has them all"
