"""``tunebook export/import --format vllm``: vLLM's tuned fused-MoE config files.

vLLM reads ``E={E},N={N},device_name={device}[,dtype={dtype}][,block_shape=[n,k]].json``
holding ``{"<M>": {"BLOCK_SIZE_M": .., "BLOCK_SIZE_N": .., "BLOCK_SIZE_K": ..,
"GROUP_SIZE_M": .., "num_warps": .., "num_stages": ..}, ...}`` and picks the entry of the
nearest batch size M. ``device`` is torch's device name with spaces as ``_`` (any H200
variant is ``NVIDIA_H200``).

**The mapping rule.** A book knows its kernel's key argument names (``kernel.key``); the
stored key is those values followed by the argument dtypes. Every vLLM field is bound to
a book name, by ``--map VLLM=BOOK`` or else by inference (case-insensitive):

* key fields, looked up among the key names: ``M`` <- M, num_tokens, batch_size;
  ``E`` <- E, num_experts; ``N`` <- N; ``dtype`` <- dtype (optional); ``block_shape`` <-
  block_shape (optional);
* config fields, looked up among the config's kwargs and options: ``BLOCK_SIZE_M`` <-
  BLOCK_SIZE_M, BLOCK_M; likewise N and K; ``GROUP_SIZE_M`` <- GROUP_SIZE_M, GROUP_M;
  ``num_warps``, ``num_stages`` <- the config's options.

``--const VLLM=VALUE`` supplies a field the kernel does not have (``--const E=8`` for a
dense kernel, ``--const GROUP_SIZE_M=1``). A field neither bound nor given is an error
naming it and the two fixes. Key positions bound to no field (another size, the dtypes)
must not make two entries collide on one (file, M): that is an error naming the position
that differs and the ``--where`` filter that picks one.

**Imports** carry a declared winner and no timing, which schema version 1 cannot say
directly. Until it can (see docs/cli.md, "Imported results"), an import is written as its
own platform (``"backend": "imported"``, ``"timer": "imported:vllm"``; timers are part of
the platform, so imported and measured results never share a file and are never merged
or compared as timings) with one result per key whose ``ms`` is ``[0, 0, 0]``: with one
result per key, the value ranks nothing, and ``show``/``report`` print "imported" instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .._autotuner import __version__
from .._book.files import atomic_write_text
from .._book.layers import KernelIdentity, book_file_name
from .._book.records import Document, Entry, Result, config_id, config_record
from .._fingerprint import canonical_key_text, platform_id, platform_slug
from ._common import load_or_fail, out, parse_assignments, resolve_book, warn_skipped, write_document
from ._load import Page, load

KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "M": ("M", "num_tokens", "batch_size"),
    "E": ("E", "num_experts"),
    "N": ("N",),
    "dtype": ("dtype",),
    "block_shape": ("block_shape",),
}
OPTIONAL_KEY_FIELDS = ("dtype", "block_shape")
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "BLOCK_SIZE_M": ("BLOCK_SIZE_M", "BLOCK_M"),
    "BLOCK_SIZE_N": ("BLOCK_SIZE_N", "BLOCK_N"),
    "BLOCK_SIZE_K": ("BLOCK_SIZE_K", "BLOCK_K"),
    "GROUP_SIZE_M": ("GROUP_SIZE_M", "GROUP_M"),
    "num_warps": ("num_warps",),
    "num_stages": ("num_stages",),
}
COMPILER_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
IMPORT_TIMER = "imported:vllm"
IMPORT_HASH = "imported:vllm"

_NAME = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+?)"
    r"(?:,dtype=(?P<dtype>[^,]+?))?(?:,block_shape=\[(?P<block>[\d, ]*)\])?(?P<rest>,[^/]*)?\.json$"
)


def _scalar(text: str) -> Any:
    """``"8"`` -> 8, ``"true"`` -> True, anything else stays a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def vllm_device_name(device: str) -> str:
    """As vLLM names the device in file names."""
    name = device.replace(" ", "_")
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def vllm_file_name(E: Any, N: Any, device: str, dtype: Any = None, block_shape: Any = None) -> str:
    dtype_part = f",dtype={dtype}" if dtype else ""
    shape = _block_shape_list(block_shape)
    shape_part = f",block_shape=[{','.join(map(str, shape))}]" if shape and all(shape) else ""
    return f"E={E},N={N},device_name={vllm_device_name(device)}{dtype_part}{shape_part}.json"


def _block_shape_list(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(v) for v in re.findall(r"\d+", str(value))]


def _lookup(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {n.lower(): n for n in names}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


# ----------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Binding:
    """Where each vLLM field comes from: a key position, a config name, or a constant."""

    key_positions: dict[str, int]
    config_names: dict[str, str]
    constants: dict[str, Any]


def bind(key_names: list[str], config_names: set[str], mapping: dict[str, str],
         constants: dict[str, Any], kernel: str) -> Binding:
    """Bind every vLLM field or raise an error that lists what is missing and how to supply it."""
    positions: dict[str, int] = {}
    missing: list[str] = []
    for field, candidates in KEY_FIELDS.items():
        if field in constants:
            continue
        name = mapping.get(field) or _lookup(key_names, candidates)
        if name is not None and name in key_names:
            positions[field] = key_names.index(name)
        elif field in mapping:
            raise click.UsageError(f"--map {field}={mapping[field]}: {kernel} has no key argument "
                                   f"{mapping[field]!r}; its key names are {key_names}")
        elif field not in OPTIONAL_KEY_FIELDS:
            missing.append(f"{field} (a key argument; the key names are {key_names})")
    names: dict[str, str] = {}
    for field, candidates in CONFIG_FIELDS.items():
        if field in constants:
            continue
        name = mapping.get(field) or _lookup(sorted(config_names), candidates)
        if name is not None and name in config_names:
            names[field] = name
        elif field in mapping:
            raise click.UsageError(f"--map {field}={mapping[field]}: {kernel}'s configs have no "
                                   f"{mapping[field]!r}; they have {sorted(config_names)}")
        else:
            missing.append(f"{field} (a config parameter; the configs have {sorted(config_names)})")
    if missing:
        raise click.ClickException(
            f"kernel {kernel} does not fit vLLM's fused-MoE config format; nothing found for: "
            + "; ".join(missing)
            + ". Name the book's field with --map VLLM=BOOK (e.g. --map M=num_tokens), or give a "
            "constant with --const VLLM=VALUE (e.g. --const GROUP_SIZE_M=1)."
        )
    return Binding(positions, names, constants)


def _config_value(config: dict[str, Any], name: str) -> Any:
    return config["kwargs"][name] if name in config.get("kwargs", {}) else config.get(name)


def _matches(key: list[Any], key_names: list[str], where: dict[str, str]) -> bool:
    for name, wanted in where.items():
        index = int(name[1:]) if name.startswith("#") else key_names.index(name) if name in key_names else None
        if index is None or index >= len(key):
            raise click.UsageError(f"--where {name}=...: no such key name or position; key names {key_names} "
                                   f"(positions after them, #{len(key_names)} on, are argument dtypes)")
        if str(key[index]) != wanted:
            return False
    return True


def export_pages(pages: list[Page], binding: Binding, where: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{file name: {M: config}} for vLLM, or an error naming the collision."""
    files: dict[str, dict[int | str, dict[str, Any]]] = {}
    origin: dict[tuple[str, Any], tuple[Page, list[Any]]] = {}
    for page in pages:
        key_names = [str(k) for k in page.doc.kernel.get("key", [])]
        device = str(page.doc.platform.get("vllm_device_name") or page.doc.platform.get("device", "unknown"))
        for key_text in sorted(page.doc.entries):
            entry = page.doc.entries[key_text]
            key = list(entry.key)
            winner = entry.best()
            if winner is None or not _matches(key, key_names, where):
                continue
            field = {f: key[i] for f, i in binding.key_positions.items()}
            field.update({f: binding.constants[f] for f in KEY_FIELDS if f in binding.constants})
            name = vllm_file_name(field["E"], field["N"], device, field.get("dtype"), field.get("block_shape"))
            m = field["M"]
            if (name, m) in origin:
                other_page, other_key = origin[(name, m)]
                differ = [f"#{i}" + (f" ({key_names[i]})" if i < len(key_names) else " (argument dtype)")
                          for i in range(min(len(key), len(other_key))) if key[i] != other_key[i]]
                raise click.ClickException(
                    f"two book entries map to M={m} in {name}: key {other_key} ({other_page.path.name}) and "
                    f"key {key} ({page.path.name}); they differ at {', '.join(differ) or 'their platform'}. "
                    "Pick one with --where NAME=VALUE (or --where '#POSITION=VALUE'), or --platform."
                )
            origin[(name, m)] = (page, key)
            config = entry.results[winner].config
            out_config = {f: _config_value(config, n) for f, n in binding.config_names.items()}
            out_config.update({f: v for f, v in binding.constants.items() if f not in KEY_FIELDS})
            files.setdefault(name, {})[m] = {f: out_config[f] for f in (*CONFIG_FIELDS, *sorted(out_config))
                                             if f in out_config}
    return {name: {str(m): table[m] for m in sorted(table, key=_m_order)} for name, table in files.items()}


def _m_order(m: Any) -> tuple[int, float, str]:
    return (0, float(m), "") if isinstance(m, int | float) and not isinstance(m, bool) else (1, 0.0, str(m))


@click.command("export")
@click.argument("book", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vllm"]), required=True, help="Target format.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory to write the config files to (e.g. VLLM_TUNED_CONFIG_FOLDER).")
@click.option("--kernel", required=True, metavar="NAME", help="The kernel's name in the book.")
@click.option("--map", "mapping", multiple=True, metavar="VLLM=BOOK",
              help="Bind a vLLM field to a key name or config parameter of the kernel (repeatable).")
@click.option("--const", "constants", multiple=True, metavar="VLLM=VALUE",
              help="A constant for a vLLM field the kernel lacks (repeatable).")
@click.option("--where", "where", multiple=True, metavar="NAME=VALUE",
              help="Only keys whose key argument NAME (or position #i) has this value (repeatable).")
@click.option("--platform", "platform", default=None, metavar="X",
              help="Only platforms whose id starts with X or whose device contains X.")
def export_command(book: Path | None, fmt: str, output: Path, kernel: str, mapping: tuple[str, ...],
                   constants: tuple[str, ...], where: tuple[str, ...], platform: str | None) -> None:
    """Write the winners of kernel NAME in BOOK as vLLM tuned-config files into OUTPUT.

    One file per (E, N, device[, dtype][, block_shape]), keyed by batch size M. See
    docs/cli.md for how key names and config parameters are bound to vLLM's fields.
    """
    loaded = load_or_fail(book)
    warn_skipped(loaded)
    pages = [p for p in loaded.pages if p.kernel_name == kernel]
    if platform:
        pages = [p for p in pages if p.platform_id.startswith(platform)
                 or platform.lower() in str(p.doc.platform.get("device", "")).lower()]
    if not pages:
        names = sorted({p.kernel_name for p in loaded.pages})
        raise click.ClickException(f"no book file for kernel {kernel!r}{' on ' + platform if platform else ''} "
                                   f"in {loaded.source}; kernels there: {', '.join(names) or 'none'}")
    consts = {k: _scalar(v) for k, v in parse_assignments(constants, "--const").items()}
    maps = parse_assignments(mapping, "--map")
    unknown = sorted(set(maps) - set(KEY_FIELDS) - set(CONFIG_FIELDS))
    if unknown:
        raise click.UsageError(f"--map names unknown vLLM fields {unknown}; vLLM fields are "
                               f"{[*KEY_FIELDS, *CONFIG_FIELDS]}")
    key_sets = {tuple(str(k) for k in p.doc.kernel.get("key", [])) for p in pages}
    if len(key_sets) != 1:
        raise click.ClickException(f"book files of {kernel} have different key names {sorted(key_sets)}; "
                                   "remove the old kernel versions with `tunebook prune` or select with --platform")
    config_names: set[str] = set()
    for page in pages:
        for entry in page.doc.entries.values():
            for result in entry.results.values():
                config_names |= set(result.config.get("kwargs", {})) | (set(result.config) - {"kwargs"})
    binding = bind(list(next(iter(key_sets))), config_names, maps, consts, kernel)
    files = export_pages(pages, binding, parse_assignments(where, "--where"))
    if not files:
        raise click.ClickException(f"no key of {kernel} with a successful config matched; nothing written")
    output.mkdir(parents=True, exist_ok=True)
    console = out()
    for name in sorted(files):
        atomic_write_text(output / name, json.dumps(files[name], indent=4) + "\n")
        console.print(f"wrote {output / name} ({len(files[name])} batch sizes)")


# ----------------------------------------------------------------------------- import


def parse_vllm_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(fields from the file name, {M: config}) or a ClickException saying what is wrong."""
    match = _NAME.match(path.name)
    if match is None:
        raise click.ClickException(
            f"{path.name} is not a vLLM config file name; expected "
            "E=<int>,N=<int>,device_name=<name>[,dtype=<str>][,block_shape=[<int>,<int>]].json"
        )
    if match["rest"]:
        raise click.ClickException(f"{path.name}: unsupported name part {match['rest']!r} (tunebook imports "
                                   "E, N, device_name, dtype and block_shape)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise click.ClickException(f"{path}: expected an object of batch size -> config object")
    block = _block_shape_list(match["block"]) if match["block"] is not None else None
    fields = {"E": int(match["E"]), "N": int(match["N"]), "device": match["device"], "dtype": match["dtype"],
              "block_shape": f"[{','.join(map(str, block))}]" if block else None}
    return fields, table


def imported_page(kernel: str, key_names: list[str], device_name: str,
                  entries: dict[str, Entry]) -> tuple[str, Document]:
    """(file name, document) for imported entries of one device."""
    ident = KernelIdentity(kernel, IMPORT_HASH, tuple(key_names))
    platform = {"backend": "imported", "device": device_name.replace("_", " "), "vllm_device_name": device_name,
                "timer": IMPORT_TIMER}
    pid = platform_id(platform)
    doc = Document(kernel=ident.to_json(), platform={**platform, "id": pid}, entries=entries)
    return book_file_name(ident, platform_slug(platform), pid), doc


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vllm"]), required=True, help="Source format.")
@click.option("--kernel", required=True, metavar="NAME", help="The kernel name to file the configs under.")
@click.option("-o", "--output", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Book directory to write to (default: TUNEBOOK_DIR).")
@click.option("--key", "key_names", default=None, metavar="NAMES",
              help="The kernel's key names, comma-separated (default: E,N,M plus dtype/block_shape when the "
                   "files have them).")
@click.option("--map", "mapping", multiple=True, metavar="VLLM=BOOK",
              help="Store a vLLM field under another key name or config parameter (repeatable).")
@click.option("--const", "constants", multiple=True, metavar="NAME=VALUE",
              help="Value for a key name the files do not give (repeatable).")
def import_command(files: tuple[Path, ...], fmt: str, kernel: str, output: Path | None, key_names: str | None,
                   mapping: tuple[str, ...], constants: tuple[str, ...]) -> None:
    """Turn vLLM tuned-config FILES into book entries of kernel NAME, marked as imported.

    Imported entries form their own platform ("timer": "imported:vllm"): they are never
    mistaken for measurements here. Re-importing a file replaces its entries.
    """
    maps = parse_assignments(mapping, "--map")
    consts = {k: _scalar(v) for k, v in parse_assignments(constants, "--const").items()}
    parsed = [(path, *parse_vllm_file(path)) for path in files]
    if key_names:
        names = [n.strip() for n in key_names.split(",") if n.strip()]
    else:
        names = ["E", "N", "M"] + [f for f in OPTIONAL_KEY_FIELDS if any(fields[f] for _, fields, _ in parsed)]
        names = [maps.get(n, n) for n in names]
    by_device: dict[str, dict[str, Entry]] = {}
    for path, fields, table in parsed:
        for m_text, vllm_config in table.items():
            values = {**fields, "M": _scalar(m_text)}
            by_book_name = {maps.get(f, f): values[f] for f in KEY_FIELDS if f in values}
            by_book_name.update(consts)
            missing = [n for n in names if n not in by_book_name]
            if missing:
                raise click.ClickException(
                    f"{path.name}: no value for key name(s) {missing}; the files give E, N, M, dtype and "
                    "block_shape: bind one with --map VLLM=NAME or give a constant with --const NAME=VALUE"
                )
            key = [by_book_name[n] for n in names]
            renamed = {maps.get(k, k): v for k, v in vllm_config.items()}
            record = config_record({k: v for k, v in renamed.items() if k not in COMPILER_OPTIONS},
                                   {k: v for k, v in renamed.items() if k in COMPILER_OPTIONS})
            result = Result(config=record, ms=(0.0, 0.0, 0.0), error=None, at="")
            entry = Entry(key=tuple(key), results={config_id(record): result}, tunebook=__version__)
            by_device.setdefault(fields["device"], {})[canonical_key_text(key)] = entry
    directory = resolve_book(output)
    directory.mkdir(parents=True, exist_ok=True)
    console = out()
    for device in sorted(by_device):
        name, doc = imported_page(kernel, names, device, by_device[device])
        path = directory / name
        existing = load(path).pages if path.exists() else []
        if path.exists() and not existing:
            raise click.ClickException(f"{path} exists but is not a readable book; move it away and re-run")
        if existing:  # re-import replaces the imported keys, keeps the others
            doc = Document(doc.kernel, doc.platform, {**existing[0].doc.entries, **doc.entries})
        write_document(path, doc)
        console.print(f"wrote {path} ({len(by_device[device])} keys imported, key names {names})")


