"""``tunebook export --format vllm``: a book's winners as vLLM tuned-config files.

The format and the mapping rule are described in ``_vllm_format`` and docs/cli.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .._book import Entry
from .._book.files import MAX_BOOK_BYTES, Unusable, atomic_write_text, read_regular_file
from ._common import (
    err,
    load_or_fail,
    out,
    output_fix,
    output_option,
    parse_assignments,
    select_pages,
    warn_skipped,
    writing,
)
from ._load import Page
from ._modules import resolve_kernel
from ._summary import key_order
from ._vllm_format import (
    COMPILER_OPTIONS,
    CONFIG_FIELDS,
    INTEGER_FIELDS,
    KEY_FIELDS,
    OPTIONAL_KEY_FIELDS,
    ROCM_FIELDS,
    TRITON_VERSION_FIELD,
    block_shape_list,
    is_integer,
    lookup,
    name_problems,
    parse_name,
    scalar,
    vllm_device_name,
    vllm_file_name,
)


@dataclass(frozen=True)
class Binding:
    """Where each vLLM field comes from: a key position, a config name, or a constant."""

    key_positions: dict[str, int]
    config_names: dict[str, str]
    constants: dict[str, Any]


def bind(
    key_names: list[str],
    config_names: set[str],
    mapping: dict[str, str],
    constants: dict[str, Any],
    kernel: str,
) -> Binding:
    """Bind every vLLM field or raise an error that lists what is missing and how to supply it."""
    positions: dict[str, int] = {}
    missing_keys: list[str] = []
    for field, candidates in KEY_FIELDS.items():
        if field in constants:
            continue
        name = mapping.get(field) or lookup(key_names, candidates)
        if name is not None and name in key_names:
            positions[field] = key_names.index(name)
        elif field in mapping:
            raise click.UsageError(
                f"--map {field}={mapping[field]}: {kernel} has no key argument "
                f"{mapping[field]!r}; its key names are {key_names}"
            )
        elif field not in OPTIONAL_KEY_FIELDS:
            missing_keys.append(field)
    names: dict[str, str] = {}
    missing_params: list[str] = []
    for field, candidates in CONFIG_FIELDS.items():
        if field in constants:
            continue
        name = mapping.get(field) or lookup(sorted(config_names), candidates)
        if name is not None and name in config_names:
            names[field] = name
        elif field in mapping:
            raise click.UsageError(
                f"--map {field}={mapping[field]}: {kernel}'s configs have no "
                f"{mapping[field]!r}; they have {sorted(config_names)}"
            )
        else:
            missing_params.append(field)
    if missing_keys or missing_params:
        found = []
        if missing_keys:
            found.append(f"key field(s) {', '.join(missing_keys)} among the key names {key_names}")
        if missing_params:
            found.append(
                f"config field(s) {', '.join(missing_params)} among the config parameters "
                f"{sorted(config_names)}"
            )
        raise click.ClickException(
            f"kernel {kernel} does not fit vLLM's fused-MoE config format: no {'; no '.join(found)}. "
            "Name the book's field with --map VLLM=BOOK (e.g. --map M=num_tokens --map BLOCK_SIZE_M=BLOCK), "
            "or give a constant with --const VLLM=VALUE (e.g. --const GROUP_SIZE_M=1)."
        )
    return Binding(positions, names, constants)


def argument_names(page: Page) -> list[str]:
    """The page's key argument names as its kernel's arguments are named: a bucketed one is
    stored with its bucketing (``M|edges=1,2,...``, ``M|pow2``), which neither inference by
    name nor ``--map M=M`` could bind (the pack's own fused_moe kernels could not export)."""
    return [str(k).split("|", 1)[0] for k in page.doc.kernel.get("key", [])]


def _config_value(config: dict[str, Any], name: str) -> Any:
    return config["kwargs"][name] if name in config.get("kwargs", {}) else config.get(name)


def _matches(key: list[Any], key_names: list[str], where: dict[str, str]) -> bool:
    for name, wanted in where.items():
        index = (
            (int(name[1:]) if name[1:].isdigit() else None)
            if name.startswith("#")
            else key_names.index(name)
            if name in key_names
            else None
        )
        if index is None or index >= len(key):
            raise click.UsageError(
                f"--where {name}=...: no such key name or position; key names {key_names} "
                f"(positions after them, #{len(key_names)} on, are argument dtypes)"
            )
        if str(key[index]) != wanted:
            return False
    return True


Declares = Callable[[Mapping[str, Any]], bool]


def declared_by(target: str, kernel: str) -> Declares:
    """Whether a stored config is one the kernel ``MODULE:KERNEL`` declares (imported to ask
    it), which must be the kernel exported: another one's configs said "no declared config
    ran" of every key, or that the kernel did not fit vLLM's format."""
    _, tuner = resolve_kernel(target)
    name = tuner.kernel_identity().name
    if name != kernel:
        raise click.UsageError(
            f"--declared {target} is kernel {name} in the books, not {kernel}, which --kernel exports; "
            "name the same kernel twice"
        )
    return tuner.declares


def winner(entry: Entry, declares: Declares | None, notes: list[str]) -> str | None:
    """The entry's winner among the configs the kernel declares (as the kernel itself would pick
    from this book); what was passed over is added to ``notes``, one line per key."""
    best = entry.best()
    if declares is None or best is None or declares(entry.results[best].config):
        return best
    allowed = [cid for cid, r in entry.results.items() if declares(r.config)]
    chosen = entry.best(allowed)
    notes.append(
        f"key {list(entry.key)}: winner {best} is not a config the kernel declares; "
        + (f"exported {chosen}, the fastest it declares" if chosen else "no declared config ran: key skipped")
    )
    return chosen


def export_pages(
    pages: list[Page], binding: Binding, where: dict[str, str], declares: Declares | None, notes: list[str]
) -> dict[str, dict[str, Any]]:
    """{file name: {M: config}} for vLLM, or an error naming the collision. With ``declares``,
    only configs the kernel declares are written (see :func:`winner`)."""
    files: dict[str, dict[int | str, dict[str, Any]]] = {}
    origin: dict[tuple[str, Any], tuple[Page, list[Any]]] = {}
    for page in pages:
        key_names = argument_names(page)
        device = str(page.doc.platform.get("vllm_device_name") or page.doc.platform.get("device", "unknown"))
        for key_text in sorted(page.doc.entries):
            entry = page.doc.entries[key_text]
            key = list(entry.key)
            if entry.best() is None or not _matches(key, key_names, where):
                continue
            best = winner(entry, declares, notes)
            if best is None:
                continue
            field = {f: key[i] for f, i in binding.key_positions.items()}
            field.update({f: binding.constants[f] for f in KEY_FIELDS if f in binding.constants})
            name = vllm_file_name(
                field["E"], field["N"], device, field.get("dtype"), field.get("block_shape")
            )
            _check_name(name, field, device, key, page)
            m = field["M"]
            if (name, m) in origin:
                other_page, other_key = origin[(name, m)]
                differ = [
                    f"#{i}" + (f" ({key_names[i]})" if i < len(key_names) else " (argument dtype)")
                    for i in range(min(len(key), len(other_key)))
                    if key[i] != other_key[i]
                ]
                raise click.ClickException(
                    f"two book entries map to M={m} in {name}: key {other_key} ({other_page.path.name}) and "
                    f"key {key} ({page.path.name}); they differ at {', '.join(differ) or 'their platform'}. "
                    "Pick one with --where NAME=VALUE (or --where '#POSITION=VALUE'), or --platform."
                )
            origin[(name, m)] = (page, key)
            config = entry.results[best].config
            out_config = {f: _config_value(config, n) for f, n in binding.config_names.items()}
            # ROCm's fields (waves_per_eu, matrix_instr_nonkdim, kpack), as an import stored them
            out_config.update({f: v for f in ROCM_FIELDS if (v := _config_value(config, f)) is not None})
            out_config.update({f: v for f, v in binding.constants.items() if f not in KEY_FIELDS})
            wrong = [f"{f}={v!r}" for f, v in out_config.items() if f in INTEGER_FIELDS and not is_integer(v)]
            if wrong:
                raise click.ClickException(
                    f"key {key} of {page.path.name}: its winner {best} gives {', '.join(wrong)}, which vLLM "
                    "reads as integers; nothing written. Fix the value with --const, or leave the key out "
                    "with --where."
                )
            files.setdefault(name, {})[m] = {
                f: out_config[f]
                for f in (*CONFIG_FIELDS, *ROCM_FIELDS, *sorted(out_config))
                if f in out_config
            }
    return {name: {str(m): table[m] for m in sorted(table, key=_m_order)} for name, table in files.items()}


def _check_name(name: str, field: dict[str, Any], device: str, key: list[Any], page: Page) -> None:
    """Refuse, before anything is written, a file name that vLLM (and our import) would not read."""
    problems = name_problems(field, vllm_device_name(device))
    parsed, problem = parse_name(name)
    if not problems and parsed is not None:
        wanted = {"E": field["E"], "N": field["N"], "dtype": field.get("dtype") or None}
        problems = [f"{f}={v!r} reads back as {parsed[f]!r}" for f, v in wanted.items() if parsed[f] != v]
    elif not problems:
        problems = [str(problem)]
    if problems:
        raise click.ClickException(
            f"key {key} of {page.path.name} cannot become a vLLM config file: {'; '.join(problems)} "
            f"(file name {name!r}). vLLM reads E, N and M as integers and splits names at ','; fix the "
            "value with --const or --map, or leave the key out with --where."
        )


def _m_order(m: Any) -> tuple[Any, ...]:
    return key_order([m])


@click.command("export")
@click.argument("book", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["vllm"]), required=True, help="Target format.")
@output_option("Directory to write the config files to (e.g. VLLM_TUNED_CONFIG_FOLDER).")
@click.option("--kernel", required=True, metavar="NAME", help="The kernel's name in the book.")
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="VLLM=BOOK",
    help="Bind a vLLM field to a key name or config parameter of the kernel (repeatable).",
)
@click.option(
    "--const",
    "constants",
    multiple=True,
    metavar="VLLM=VALUE",
    help="A constant for a vLLM field the kernel lacks (repeatable).",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="NAME=VALUE",
    help="Only keys whose key argument NAME (or position #i) has this value (repeatable).",
)
@click.option(
    "--platform",
    "platform",
    default=None,
    metavar="X",
    help="Only platforms whose id starts with X or whose device contains X.",
)
@click.option(
    "--declared",
    "declared",
    default=None,
    metavar="MODULE:KERNEL",
    help="The kernel as the program defines it (e.g. mypkg.ops:fused_moe_kernel): only configs "
    "it declares are exported. Without it, winners are exported unchecked, with a warning.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a config file in OUTPUT even where it holds batch sizes this export lacks (they are lost).",
)
def command(
    book: Path | None,
    fmt: str,
    output: Path,
    kernel: str,
    mapping: tuple[str, ...],
    constants: tuple[str, ...],
    where: tuple[str, ...],
    platform: str | None,
    declared: str | None,
    overwrite: bool,
) -> None:
    """Write the winners of kernel NAME in BOOK as vLLM tuned-config files into OUTPUT.

    One file per (E, N, device[, dtype][, block_shape]), keyed by batch size M. See
    docs/cli.md for how key names and config parameters are bound to vLLM's fields.
    """
    declares = declared_by(declared, kernel) if declared is not None else None
    loaded = load_or_fail(book)
    pages = select_pages(loaded, (kernel,))
    warn_skipped(loaded)
    if platform:
        pages = [
            p
            for p in pages
            if p.platform_id.startswith(platform)
            or platform.lower() in str(p.doc.platform.get("device", "")).lower()
        ]
    if not pages:
        platforms = sorted(
            {f"{p.platform_id} {p.platform_label}" for p in loaded.pages if p.kernel_name == kernel}
        )
        raise click.ClickException(
            f"no book file for kernel {kernel} on a platform matching {platform!r} in {loaded.source}; "
            f"its platforms there: {'; '.join(platforms)}"
        )
    consts = {k: scalar(v) for k, v in parse_assignments(constants, "--const").items()}
    known = tuple(dict.fromkeys((*KEY_FIELDS, *CONFIG_FIELDS, *COMPILER_OPTIONS, *ROCM_FIELDS)))
    strangers = sorted(set(consts) - set(known))
    if strangers:  # vLLM launches with **config: a name its kernel lacks fails there
        raise click.UsageError(
            f"--const names unknown vLLM fields {strangers}; vLLM fields are {list(known)}"
        )
    for name, value in consts.items():
        if name in INTEGER_FIELDS and not is_integer(value):
            raise click.BadParameter(
                f"vLLM reads {name} as an integer; found {value!r}", param_hint=f"--const {name}={value}"
            )
        if name == "block_shape" and len(block_shape_list(value) or []) != 2:
            raise click.BadParameter(
                f"vLLM names files block_shape=[n,k]: two integers, e.g. 128,128; found {value!r}",
                param_hint=f"--const {name}={value}",
            )
    maps = parse_assignments(mapping, "--map")
    unknown = sorted(set(maps) - set(KEY_FIELDS) - set(CONFIG_FIELDS))
    if unknown:
        raise click.UsageError(
            f"--map names unknown vLLM fields {unknown}; vLLM fields are {[*KEY_FIELDS, *CONFIG_FIELDS]}"
        )
    versions = {
        (str(p.doc.kernel.get("hash", "")), tuple(map(str, p.doc.kernel.get("key", [])))) for p in pages
    }
    if len(versions) > 1:  # another source or bucketing: its winners are not this kernel's
        raise click.ClickException(
            f"the book holds {len(versions)} versions of kernel {kernel} (other source code or key "
            "bucketing); their winners would mix in one file. Remove the old ones with `tunebook prune BOOK "
            "--keep MODULE` (or, where they are of other GPUs, select one with --platform)"
        )
    config_names: set[str] = set()
    for page in pages:
        for entry in page.doc.entries.values():
            for result in entry.results.values():
                if declares is None or declares(result.config):
                    config_names |= set(result.config.get("kwargs", {})) | (set(result.config) - {"kwargs"})
    binding = bind(argument_names(pages[0]), config_names, maps, consts, kernel)  # one version: one key
    notes: list[str] = []
    files = export_pages(pages, binding, parse_assignments(where, "--where"), declares, notes)
    if not files:
        warn_declared(kernel, declared, notes, 0)  # which keys had only undeclared winners
        raise click.ClickException(f"no key of {kernel} with a successful config matched; nothing written")
    dropped = {name: lost for name in files if (lost := _dropped(output / name, files[name]))}
    if dropped and not overwrite:
        lines = "; ".join(f"{output / name}: {', '.join(lost)}" for name, lost in sorted(dropped.items()))
        raise click.ClickException(
            f"{len(dropped)} existing config file(s) hold batch sizes this export does not ({lines}); "
            "nothing written. Export to another directory and merge by hand, or pass --overwrite to "
            "replace them"
        )
    console = out()
    with writing(output, output_fix(output, "Choose a writable directory with -o")):
        output.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            verb = "replaced" if (output / name).exists() else "wrote"
            atomic_write_text(output / name, json.dumps(files[name], indent=4) + "\n")
            gone = f"; batch sizes {', '.join(dropped[name])} dropped" if name in dropped else ""
            console.print(f"{verb} {output / name} ({len(files[name])} batch sizes{gone})")
    warn_declared(kernel, declared, notes, sum(len(table) for table in files.values()))


def _dropped(path: Path, table: Mapping[str, Any]) -> list[str]:
    """The batch sizes the config file at ``path`` holds that ``table`` lacks (none if there
    is no such file; every one if it does not read as a config file: nothing to keep)."""
    try:
        raw = read_regular_file(path, MAX_BOOK_BYTES)  # a FIFO at the name: never opened
        if raw is None:
            return []
        existing = json.loads(raw)
    except Unusable as exc:
        return [f"(not a file: {exc})"]
    except (OSError, ValueError):
        return ["(an unreadable file)"]
    if not isinstance(existing, dict):
        return ["(not a vLLM config table)"]
    existing.pop(TRITON_VERSION_FIELD, None)
    return sorted((m for m in existing if m not in table), key=lambda m: (len(m), m))


def warn_declared(kernel: str, declared: str | None, notes: list[str], exported: int) -> None:
    """On stderr: each key whose winner the kernel does not declare, or that nothing was checked."""
    console = err()
    for note in notes:
        console.print(f"[yellow]{declared}[/]: {escape(note)}", markup=True, highlight=False)
    if declared is None and exported:
        console.print(
            f"[yellow]unchecked[/]: the {exported} winners of {kernel} were not checked against the "
            "configs the kernel declares now (the book keeps results of configs a kernel no longer "
            "declares, and does not record which it declares); pass --declared MODULE:KERNEL to "
            "export only declared configs",
            markup=True,
            highlight=False,
        )
