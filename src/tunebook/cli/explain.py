"""``tunebook explain MODULE:KERNEL``: why this process does (not) find its results in a book.

A kernel finds its results only in the file of its exact identity: the same kernel source
hash and key names (the kernel id), on the same platform fingerprint (backend, device,
arch, runtime, Triton version, timer). This command computes that identity the way the
autotuner does in this process and compares it, field by field, with every book file of a
kernel of the same name (or the same source, if it was renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .. import _compat, _devices
from .._autotuner import Autotuner
from .._book import Book, KernelIdentity, book_file_name, pagedir, relation
from .._fingerprint import platform_slug
from .._tables import load as load_tables
from .._tables import same_device
from ._common import echo_json, err, load_or_fail, out, parse_assignments, trouble_exits_2
from ._load import Page, load, page_entries, skipped_as
from ._modules import resolve_kernel
from ._summary import fmt_key, is_recorded_miss, key_order, miss_hint

LABELS = {
    "name": "kernel name",
    "hash": "kernel source hash",
    "key": "key names",
    "backend": "backend",
    "device": "GPU device",
    "arch": "arch",
    "runtime": "runtime (CUDA/ROCm/Python)",
    "sm_count": "SM count",
    "triton": "Triton version",
    "timer": "timer",
}

HINTS = {
    "hash": "the kernel or a jitted helper or constant it uses differs from the one the book was tuned "
    "with: an edit, or Triton's own jitted functions (tl.sum, ...) under another Triton version; re-tune "
    "(or ship the book tuned from this source and Triton)",
    "key": "the autotune key= list changed; re-tune",
    "triton": "tuned with another Triton version; re-tune with this one (on the same GPU and timer its keys "
    "seed the search and answer serve mode until then), or pin the Triton the book was tuned with",
    "device": "tuned on another GPU model; tune on this one or ship a book from one",
    "timer": "tuned with another timer (do_bench=, use_cuda_graph=, warmup/rep, or the interpreter)",
    "runtime": "tuned under another CUDA/ROCm runtime",
    "sm_count": "another SKU or partition of this GPU model (H100 PCIe or SXM, a MIG slice, another SM "
    "count); tune on this one or ship a book from one like it",
    "arch": "another GPU architecture (compute capability or gfx arch); tune on this one",
    "backend": "another backend (CUDA, ROCm or Triton's interpreter); tune on this one",
}

# What serve mode does with a file that does not match, by its relation to this process's page.
SERVE_ROLES = {
    "upgraded": "serve mode answers a key this process's page lacks with the key's winner here "
    "(an old release's, before the nearest key's)",
    "same_arch": "serve mode answers a key this process's page lacks with the key's winner here "
    "(a GPU of this architecture and Triton release: after this GPU's nearest key)",
    "edited": "serve mode answers a key this process's page lacks with the key's winner here "
    "(an earlier source: after the nearest key, before the first config)",
}


def identity_here(tuner: Autotuner) -> tuple[KernelIdentity, dict[str, Any], str]:
    """(kernel identity, platform fingerprint, platform id) exactly as ``Autotuner.page()`` builds them."""
    try:
        ident = tuner.identity()
    except RuntimeError as exc:  # Triton found no GPU driver
        raise click.ClickException(
            f"cannot tell this process's platform: {str(exc).rstrip('.')}. On a machine without a GPU, "
            "explain the interpreter platform with TRITON_INTERPRET=1 (or --env TRITON_INTERPRET=1)."
        ) from None
    return ident.kernel, ident.platform, ident.platform_id


def differences(page: Page, ident: KernelIdentity, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """Every identity field in which ``page`` differs from this process."""
    found = []
    book_kernel = {
        "name": page.kernel_name,
        "hash": page.doc.kernel.get("hash"),
        "key": list(page.doc.kernel.get("key", [])),
    }
    here_kernel = {"name": ident.name, "hash": ident.source_hash, "key": list(ident.key)}
    book_platform = {k: v for k, v in page.doc.platform.items() if k != "id"}
    for book_side, here_side in ((book_kernel, here_kernel), (book_platform, fingerprint)):
        for name in sorted(set(book_side) | set(here_side), key=lambda n: (n not in LABELS, n)):
            if book_side.get(name) != here_side.get(name):
                found.append(
                    {
                        "field": name,
                        "label": LABELS.get(name, name),
                        "book": book_side.get(name),
                        "here": here_side.get(name),
                        "hint": HINTS.get(name),
                    }
                )
    return found


def explain_data(target: str, tuner: Autotuner, directories: list[Path], key_limit: int) -> dict[str, Any]:
    ident, fingerprint, pid = identity_here(tuner)
    expected = pagedir.page_dir_name(book_file_name(ident, platform_slug(fingerprint), pid))
    # A fallback= asked first answers every key serve mode misses: other pages are never read.
    chain = tuner.options.fallback is None or tuner.options.prefer_nearest
    files, skipped = [], []
    for directory in directories:
        if not directory.exists():
            continue
        # Streamed: the keys of this kernel's pages are read, never those of the book's others.
        loaded = load(directory, stream=True)
        skipped += [{"path": str(p), "reason": why} for p, why in loaded.skipped]
        for page in loaded.pages:
            if page.kernel_name != ident.name and page.doc.kernel.get("hash") != ident.source_hash:
                continue
            diffs = differences(page, ident, fingerprint)
            role = relation(ident, fingerprint, page.doc.kernel, page.doc.platform) if chain else None
            with skipped_as(page.path) as unread:
                entries = sorted((e for _, e in page_entries(page)[1]), key=lambda e: key_order(e.key))
            skipped += [{"path": str(p), "reason": why} for p, why in unread]
            keys = [e.key for e in entries]
            missed = [e.key for e in entries if is_recorded_miss(e)]
            files.append(
                {
                    "path": str(page.path),
                    "match": not [d for d in diffs if d["field"] != "name"]
                    and page.kernel_name == ident.name,
                    "differences": diffs,
                    "serve_role": role,
                    "keys": [list(k) for k in keys[:key_limit]],
                    "key_count": len(keys),
                    "recorded_misses": [list(k) for k in missed[:key_limit]],
                    "recorded_miss_count": len(missed),
                }
            )
    return {
        "target": target,
        "kernel": ident.to_json(),
        "platform": {**fingerprint, "id": pid},
        "expected_file": expected,
        "directories": [str(d) for d in directories],
        "files": files,
        "skipped": skipped,
        "tables": imported_tables(tuner, directories, str(fingerprint.get("device", ""))),
        # how a hit launches here: the compiled kernel's own launcher, or Triton's run and why
        "hit_launch": _compat.direct.available(tuner.fn) or "direct",
        "verdict": "hit" if any(f["match"] for f in files) else "miss",
        "gpus": judged_gpu(),
    }


def judged_gpu() -> dict[str, Any] | None:
    """On a host whose GPUs are of several models, which one the verdict is for (this
    process's current device) and those of the other models; None on a host of one model."""
    if not _devices.mixed():
        return None
    models, ids = _devices.models(), _compat.local_gpu_ids()
    gpus = [
        {"gpu": ids[i] if i < len(ids) else str(i), "device": str(m[0]), "arch": m[1], "sm_count": m[2]}
        for i, m in enumerate(models)
    ]
    here = _compat.current_device_index()
    return {"judged": gpus[here], "others": [g for i, g in enumerate(gpus) if models[i] != models[here]]}


def imported_tables(tuner: Autotuner, directories: list[Path], device: str) -> dict[str, Any] | None:
    """The imported tables the kernel reads (``tables=``), None if it reads none: per page,
    its GPU, its entries and whether it serves here (tuned on this GPU) or only hints."""
    tables = tuner.options.tables
    if tables is None:
        return None
    pages = load_tables(tables, [d for d in directories if d.exists()])
    return {
        "kernel": tables.kernel,
        "pages": [
            {
                "path": p.where,
                "device": p.device,
                "entries": len(p.entries),
                "this_gpu": same_device(p.device, device),
            }
            for p in pages
        ],
    }


def _key_list(keys: list[list[Any]], count: int) -> str:
    shown = ", ".join(fmt_key(key) for key in keys)
    more = f" … and {count - len(keys)} more" if count > len(keys) else ""
    return f"{escape(shown) or '(none)'}{more}"


def _print(data: dict[str, Any]) -> None:
    console = out()
    k, p = data["kernel"], data["platform"]
    console.print(f"[bold]{escape(data['target'])}[/] in this process:")
    console.print(
        f"  kernel  {escape(k['name'])}  id {k['id']}  source hash {k['hash'][:16]}…  "
        f"key ({', '.join(k['key'])}) + argument dtypes"
    )
    plat = "  ".join(f"{n}={v}" for n, v in p.items() if n != "id")
    console.print(f"  platform  {escape(plat)}  id {p['id']}")
    if data["gpus"] is not None:
        judged, others = data["gpus"]["judged"], data["gpus"]["others"]
        console.print(
            f"  GPU  {judged['gpu']} ({escape(judged['device'])}); this host has GPUs of other models: "
            + "; ".join(f"{g['gpu']} ({escape(g['device'])})" for g in others)
            + f". For one of those: tunebook explain {escape(data['target'])} "
            f"--env CUDA_VISIBLE_DEVICES={others[0]['gpu']}"
        )
    console.print(f"  reads  {escape(data['expected_file'])}")
    where = [d if Path(d).exists() else f"{d} (does not exist)" for d in data["directories"]]
    console.print(f"  in  {escape(', '.join(where) or '(no book directory)')}")
    how = data["hit_launch"]
    console.print(
        "  hits  launch the compiled kernel directly"
        if how == "direct"
        else f"  hits  launch through Triton's JITFunction.run: {escape(how)}"
    )
    console.print()
    if not data["files"]:
        console.print(
            f"[red]miss[/]: no book file of a kernel named {escape(k['name'])} (or of the same source) "
            "in these directories. Tune it here (TUNEBOOK_MODE=tune), or ship a book tuned on this "
            "platform and point TUNEBOOK_PATH or autotune(books=...) at it."
        )
        _print_tables(data["tables"])
        return
    for f in data["files"]:
        head = "[green]match[/]" if f["match"] else "[red]differs[/]"
        console.print(f"{head}  {escape(f['path'])}  ({f['key_count']} keys)")
        for d in f["differences"]:
            console.print(f"    {d['label']}: book {escape(repr(d['book']))}, here {escape(repr(d['here']))}")
            if d["hint"]:
                console.print(f"      [dim]{escape(d['hint'])}[/]")
        if f["serve_role"]:
            console.print(f"    [yellow]{escape(SERVE_ROLES[f['serve_role']])}[/]")
        missed = {fmt_key(k) for k in f["recorded_misses"]}
        tuned = [k for k in f["keys"] if fmt_key(k) not in missed]
        console.print(f"    keys: {_key_list(tuned, f['key_count'] - f['recorded_miss_count'])}")
        if f["recorded_miss_count"]:
            console.print(
                "    recorded misses (serve mode met them; no results yet): "
                f"{_key_list(f['recorded_misses'], f['recorded_miss_count'])}"
            )
            module = data["target"].rpartition(":")[0]
            console.print(f"      [yellow]{escape(miss_hint(module))}[/]")
    _print_tables(data["tables"])
    if data["verdict"] == "hit":
        on = f" on GPU {data['gpus']['judged']['gpu']}" if data["gpus"] is not None else ""
        console.print(
            f"\n[green]A book file matches this process{on}[/]: a call hits when its key (the key "
            "values and argument dtypes listed above) is in it and every config is measured."
        )
    else:
        gpus = data["gpus"]
        on = f" on GPU {gpus['judged']['gpu']}" if gpus is not None else ""
        console.print(
            f"\n[red]No book file matches this process{on}[/]: every call{on} misses. Fix the "
            "differences above, or tune on this platform."
        )


def _print_tables(tables: dict[str, Any] | None) -> None:
    if tables is None:
        return
    console = out()
    name = escape(tables["kernel"])
    if not tables["pages"]:
        console.print(
            f"imported tables ({name}): none in these directories; import them with "
            f"tunebook import --format vllm --kernel {name} -o BOOK FILES..."
        )
        return
    console.print(f"imported tables ({name}), read where the book lacks a key:")
    for page in tables["pages"]:
        role = (
            "this GPU: serve mode launches its entries" if page["this_gpu"] else "another GPU: search hints"
        )
        console.print(
            f"  {escape(page['device'])}  {page['entries']} entries  ({role})  {escape(page['path'])}"
        )


@click.command("explain")
@click.argument("target", metavar="MODULE:KERNEL")
@click.argument("book", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--keys",
    "key_limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="List at most this many keys per file.",
)
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set an environment variable before importing the module (e.g. TRITON_INTERPRET=1).",
)
@trouble_exits_2
def command(target: str, book: Path | None, as_json: bool, key_limit: int, env: tuple[str, ...]) -> None:
    """Why MODULE:KERNEL misses (or hits) the book in this process.

    Imports MODULE, finds the @tunebook.autotune kernel KERNEL, computes its identity here
    (kernel source hash, key names, platform fingerprint) and compares it field by field with
    every book file of a kernel of that name. Without BOOK, looks where the kernel itself
    looks: TUNEBOOK_DIR, the kernel's books=, then TUNEBOOK_PATH.
    """
    if book is not None:  # before the import, which may take seconds (torch)
        # A BOOK that holds no book at all (a junk file, a FIFO, a page's page.json) is an
        # error, as for every command; it answered "miss" (exit 1), read as a verdict.
        loaded = load_or_fail(book, stream=True)
        if not loaded.pages and loaded.skipped:
            path, why = loaded.skipped[0]
            raise click.ClickException(f"{book} holds no readable book file: {path}: {why}")
    os.environ.update(parse_assignments(env, "--env", empty_ok=True))
    _, tuner = resolve_kernel(target)
    if book is not None:
        directories = [book]
    else:
        layers = Book.from_env(tuner.options.book_dirs())
        directories = ([layers.directory] if layers.directory is not None else []) + list(layers.readonly)
    data = explain_data(target, tuner, directories, key_limit)
    if as_json:
        echo_json(data)
    else:
        for skipped in data["skipped"]:
            err().print(f"[yellow]skipped[/] {escape(skipped['path'])}: {escape(skipped['reason'])}")
        _print(data)
    if data["verdict"] == "miss":
        raise SystemExit(1)
