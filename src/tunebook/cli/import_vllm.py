"""``tunebook import --format vllm``: vLLM tuned-config files as imported book entries.

How imports are represented in the book format is described in ``_vllm_format``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .._book import KernelIdentity, book_file_name, pagedir
from .._book.files import LOCK_TIMEOUT_S, MAX_BOOK_BYTES, Unusable, read_regular_file
from .._book.records import Document, Entry, Result, config_id, config_record
from .._fingerprint import platform_id, platform_slug
from .._jsonio import INT_LIMIT, key_text, strict_loads
from .._tables import IMPORTED_BACKEND
from .._version import __version__
from ._common import (
    err,
    fail_if_left_alone,
    out,
    output_fix,
    output_option,
    parse_assignments,
    resolve_book,
    write_document,
    writing,
)
from ._load import load
from ._vllm_format import (
    COMPILER_OPTIONS,
    CONFIG_FIELDS,
    IMPORT_HASH,
    IMPORT_TIMER,
    KEY_FIELDS,
    OPTIONAL_KEY_FIELDS,
    TRITON_VERSION_FIELD,
    device_problem,
    is_integer,
    parse_name,
    scalar,
)


def parse_vllm_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(fields from the file name, {M: config}) or a ClickException saying what is wrong."""
    fields, problem = parse_name(path.name)
    if fields is not None and (bad := device_problem(fields["device"])):
        fields, problem = None, bad
    if fields is None:
        raise click.ClickException(
            f"{path.name}: {problem}; pass --skip-unsupported to import the other files without it"
        )
    try:
        # Bounded and regular files only: a FIFO in the directory hung the import, a link to
        # /dev/zero read until memory ran out.
        raw = read_regular_file(path, MAX_BOOK_BYTES)
        if raw is None:
            raise FileNotFoundError(f"{path} is gone")
        table = strict_loads(raw.decode("utf-8"), unique_keys=True)
    except (Unusable, OSError, ValueError, RecursionError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    if isinstance(table, dict):
        table.pop(TRITON_VERSION_FIELD, None)
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise click.ClickException(f"{path}: expected an object of batch size -> config object")
    if not table:  # imported as nothing, with exit 0, before
        raise click.ClickException(
            f"{path}: holds no batch size; fix the file, or leave it out of the import"
        )
    for m_text, config in table.items():
        if problem := _entry_problem(m_text, config):
            raise click.ClickException(f"{path}: {problem}. Fix the file, or leave it out of the import")
    return fields, table


# The tile of each entry: vLLM launches its kernel with an entry's fields as the kernel's
# meta-parameters, so an entry without them is one vLLM itself cannot run.
_TILE_FIELDS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
_INTEGERS = "expected an integer (vLLM reads batch sizes and config fields as integers)"


def _entry_problem(m_text: str, config: dict[str, Any]) -> str | None:
    """What vLLM could not read in one entry (None: nothing): the batch size, a field it reads
    as an integer that is not one, or a tile size it needs that the entry lacks."""
    m = scalar(m_text)
    if not is_integer(m):
        return f"the batch size {json.dumps(m_text)}; {_INTEGERS}"
    if not 1 <= m < INT_LIMIT:
        return f"the batch size {m_text[:24]}{'...' * (len(m_text) > 24)}; expected one from 1 to 2**63 - 1"
    integers = {alias for aliases in CONFIG_FIELDS.values() for alias in aliases} | set(COMPILER_OPTIONS)
    for name, value in config.items():
        if name not in integers:  # BLOCK_M as well as BLOCK_SIZE_M is one
            continue
        if not is_integer(value):
            return f"batch size {m_text}: {name} is {json.dumps(value)}; {_INTEGERS}"
        # A tile, a group or a warp count below 1 launches nothing (num_stages may be 0: ROCm's)
        least = 0 if name == "num_stages" else 1
        if value < least:
            return f"batch size {m_text}: {name} is {value}; expected {least} or more"
    missing = [f for f in _TILE_FIELDS if not any(alias in config for alias in CONFIG_FIELDS[f])]
    if missing:
        return (
            f"batch size {m_text} has no {', '.join(missing)} (its fields: {', '.join(config) or 'none'}); "
            "vLLM runs an entry's tile sizes, so every entry names them"
        )
    return None


def imported_page(
    kernel: str, key_names: list[str], device_name: str, entries: dict[str, Entry]
) -> tuple[str, Document]:
    """(file name, document) for imported entries of one device."""
    ident = KernelIdentity(kernel, IMPORT_HASH, tuple(key_names))
    platform = {
        "backend": IMPORTED_BACKEND,
        "device": device_name.replace("_", " "),
        "vllm_device_name": device_name,
        "timer": IMPORT_TIMER,
    }
    pid = platform_id(platform)
    doc = Document(kernel=ident.to_json(), platform={**platform, "id": pid}, entries=entries)
    return book_file_name(ident, platform_slug(platform), pid), doc


def table_files(paths: Sequence[Path]) -> list[Path]:
    """The table files ``paths`` name: a file as given, a directory's ``*.json`` in name
    order. ValueError for a path that is neither, or when no file is left."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no .json file in {', '.join(map(str, paths))}")
    return files


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vllm"]), required=True, help="Source format.")
@click.option("--kernel", required=True, metavar="NAME", help="The kernel name to file the configs under.")
@output_option("Book directory to write to (default: TUNEBOOK_DIR).", required=False)
@click.option(
    "--key",
    "key_names",
    default=None,
    metavar="NAMES",
    help="The kernel's key names, comma-separated (default: E,N,M plus dtype/block_shape when the "
    "files have them).",
)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="VLLM=BOOK",
    help="Store a vLLM field under another key name or config parameter (repeatable).",
)
@click.option(
    "--const",
    "constants",
    multiple=True,
    metavar="NAME=VALUE",
    help="Value for a key name the files do not give (repeatable).",
)
@click.option(
    "--skip-unsupported",
    is_flag=True,
    help="Skip files whose names tunebook cannot import (each named on stderr) instead of failing: "
    "for importing a whole vLLM configs directory.",
)
def command(
    files: tuple[Path, ...],
    fmt: str,
    kernel: str,
    output: Path | None,
    key_names: str | None,
    mapping: tuple[str, ...],
    constants: tuple[str, ...],
    skip_unsupported: bool,
) -> None:
    """Turn vLLM tuned-config FILES into book entries of kernel NAME, marked as imported.

    A directory among FILES stands for its ``*.json`` files (vLLM's ``fused_moe/configs``
    imports whole, with --skip-unsupported). Imported entries form their own platform
    ("timer": "imported:vllm"): they are never mistaken for measurements here. Re-importing a
    file replaces its entries.
    """
    try:
        files = tuple(table_files(files))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    maps = parse_assignments(mapping, "--map")
    consts = {k: scalar(v) for k, v in parse_assignments(constants, "--const").items()}
    parsed = []
    for path in files:
        fields, problem = parse_name(path.name)
        if fields is None and skip_unsupported:
            err().print(f"skipped {path.name}: {problem}", markup=False, highlight=False)
            continue
        parsed.append((path, *parse_vllm_file(path)))
    if not parsed:
        raise click.ClickException("no importable file among those given (all were skipped)")
    given = {*KEY_FIELDS, *(field for _, _, table in parsed for config in table.values() for field in config)}
    if unknown := sorted(set(maps) - given):  # a misspelt field was ignored, with exit 0
        raise click.BadParameter(
            f"{', '.join(unknown)} is no field of these files; they give {sorted(given)}",
            param_hint="--map",
        )
    if not kernel.strip():
        raise click.BadParameter("the kernel name is empty", param_hint="--kernel")
    if key_names:
        names = [n.strip() for n in key_names.split(",")]
        twice = sorted({n for n in names if names.count(n) > 1})
        if not all(names) or twice:
            problem = f"{', '.join(twice)} given twice" if twice else "an empty name"
            raise click.BadParameter(
                f"{problem} in {key_names!r}: give each key name once", param_hint="--key"
            )
    else:
        names = ["E", "N", "M"] + [
            f for f in OPTIONAL_KEY_FIELDS if any(fields[f] for _, fields, _ in parsed)
        ]
        names = [maps.get(n, n) for n in names]
    unused = sorted(set(consts) - set(names))
    if unused:
        raise click.BadParameter(
            f"{', '.join(unused)} not among the key names {names}: a constant only fills a key name",
            param_hint="--const",
        )
    by_device: dict[str, dict[str, Entry]] = {}
    source: dict[tuple[str, str], Path] = {}  # (device, key text) -> the file that gave it
    batch: dict[tuple[str, str], str] = {}  # (device, key text) -> the batch size that gave it
    for path, fields, table in parsed:
        for m_text, vllm_config in table.items():
            values = {**fields, "M": scalar(m_text)}
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
            record = config_record(
                {k: v for k, v in renamed.items() if k not in COMPILER_OPTIONS},
                {k: v for k, v in renamed.items() if k in COMPILER_OPTIONS},
            )
            result = Result(config=record, ms=(0.0, 0.0, 0.0), error=None, at="")
            entry = Entry(key=tuple(key), results={config_id(record): result}, tunebook=__version__)
            text, device = key_text(key), fields["device"]
            earlier = by_device.get(device, {}).get(text)
            if earlier is not None and source[device, text] == path and earlier.results != entry.results:
                raise click.ClickException(
                    f"{path.name}: batch sizes {batch[device, text]} and {m_text} both become key "
                    f"{names}={key} with different configs, and one would be lost: the key names leave "
                    f"out the batch size ({maps.get('M', 'M')}); add it to --key"
                )
            if earlier is not None and source[device, text] != path and earlier.results != entry.results:
                raise click.ClickException(
                    f"{source[device, text].name} and {path.name} both give key {names}={key} with different "
                    f"configs: the key names {names} leave out what tells these files apart (their dtype or "
                    "block_shape); drop --key to keep those columns, or import them under two --kernel names"
                )
            by_device.setdefault(device, {})[text] = entry
            source[device, text], batch[device, text] = path, m_text
    directory = resolve_book(output)
    fix = (
        output_fix(directory, "Choose a writable book directory with -o")
        if output is not None
        else "Pass a writable book directory with -o, or point TUNEBOOK_DIR at one."
    )
    with writing(directory, fix):
        _write_imports(directory, kernel, names, by_device, maps.get("M", "M"))


def _write_imports(
    directory: Path, kernel: str, names: list[str], by_device: dict[str, dict[str, Entry]], m_name: str
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    console = out()
    left_alone: list[str] = []
    # Every device's page is read and checked before any is written: a refusal must not leave
    # some devices' pages of the refused import behind.
    pages = [_existing(directory, kernel, device, *imported_page(kernel, names, device, by_device[device]))
             for device in sorted(by_device)]  # fmt: skip
    pagedir.sweep_creations(directory)  # once for every device's page (one listing of the book)
    for device, path, page_dir, doc, existing in pages:
        replaced, stale = 0, []
        if existing:  # re-import replaces each imported file's entries, keeps the other files'
            before = existing[0].doc.entries
            files = {_file_of(e.key, names, m_name) for e in doc.entries.values()}
            kept = {t: e for t, e in before.items() if _file_of(e.key, names, m_name) not in files}
            replaced = len(before) - len(kept)
            stale = [t for t in before if t not in kept and t not in doc.entries]
            doc = Document(doc.kernel, doc.platform, {**kept, **doc.entries})
        left_alone += write_document(path, doc)
        if stale:  # batch sizes the file's new version no longer lists
            pagedir.remove_keys(page_dir, stale, LOCK_TIMEOUT_S)
        note = f", {replaced} earlier entries of the same files replaced" if replaced else ""
        imported = f"{len(by_device[device])} keys imported{note}, key names {names}"
        console.print(f"wrote {escape(str(page_dir))} ({imported})")
    fail_if_left_alone(left_alone)


def _existing(directory: Path, kernel: str, device: str, name: str, doc: Document) -> tuple[Any, ...]:
    """(device, path, page directory, document, the pages already there) of one device's
    import, or a ClickException where writing it would replace what it must not."""
    path = directory / name
    page_dir = directory / pagedir.page_dir_name(name)
    there = page_dir if page_dir.exists() else path
    loaded = load(there) if there.exists() else None
    existing = loaded.pages if loaded is not None else []
    if loaded is not None and not existing and not loaded.empty:  # an empty page is reused
        raise click.ClickException(f"{there} exists but is not a readable book; move it away and re-run")
    other = existing[0].doc.kernel.get("name") if existing else kernel
    if other != kernel:  # names alike but for punctuation file under one page name
        raise click.ClickException(
            f"{page_dir} holds the tables imported as kernel {json.dumps(other)}, which files under "
            f"the same page name as {json.dumps(kernel)}: importing would replace them. Import "
            f"{json.dumps(kernel)} into another book (-o DIR), or under another name (a page's name "
            "keeps a kernel name's letters, digits and '_', writes the rest as '-', and stops at 60)"
        )
    return device, path, page_dir, doc, existing


def _file_of(key: tuple[object, ...], names: list[str], m_name: str) -> tuple[object, ...]:
    """The file an imported key came from: its fields but the batch size (one vLLM file is
    one (E, N, dtype, block_shape) on one device, one entry per M)."""
    return tuple(v for n, v in zip(names, key) if n != m_name) if m_name in names else tuple(key)
