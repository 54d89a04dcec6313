"""``tunebook prune``: drop book files of kernel versions a program no longer has.

Editing a kernel (or a jitted helper it calls) changes its source hash and so its kernel
id; the old results stay in files nobody reads again. Given the modules that define the
kernels as they are now, prune deletes the files of the same kernel names and key names
whose kernel id is not a current one, on this Triton version, and the
``<name>.corrupt-<time>-<pid>`` copies the library kept aside, empty pages and the temp
files of writes killed at least an hour before (``pagedir.stale_leftovers``). Left alone: kernels of
other names, imported pages
(``tunebook import``), unreadable files, and, reported, pages of another Triton version
(the source hash covers Triton's own jitted functions, such as ``tl.sum``, which change
between releases: such a page may be current for the fleet that runs that version) and
pages with other key names (a kernel of the same name in another project, in a shared
book, is told apart by nothing else).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import click
from rich.markup import escape

from .._book import pagedir
from .._book.pages import KernelIdentity
from .._compat import triton_version
from ._common import book_argument, load_or_fail, out, warn_skipped
from ._load import PRUNING, is_page_dir
from ._modules import module_autotuners
from ._summary import is_imported


def current_kernels(modules: tuple[str, ...]) -> dict[str, list[KernelIdentity]]:
    """Kernel name -> the identities its @tunebook.autotune objects have in this process."""
    kernels: dict[str, list[KernelIdentity]] = {}
    for spec in modules:
        found = module_autotuners(spec, "--keep names the modules whose kernels are current")
        for tuner in found.values():
            ident = tuner.kernel_identity()
            kernels.setdefault(ident.name, []).append(ident)
    return kernels


def _remove_page(page: Path, empty: bool = False) -> bool:
    """Delete a page directory whole or leave it whole. Renamed first (a name with a dot,
    which readers skip): a book directory that forbids deleting its entries refuses the
    rename, before any key file is gone (the page was emptied, then its removal failed), and
    no reader meets a half-deleted page. A removal that fails after the rename puts back the
    name of what is left.

    ``empty``: a page judged empty when the book was read, seconds before (the --keep imports
    come between): a writer may have written its page.json and keys into it since, this
    being the name its kernel writes to. It is looked at again under its new name, which no
    writer reaches (their paths name the page), and put back if it holds anything now; or,
    where a writer made the page anew meanwhile, what it holds is merged into that one.
    False: it was kept so."""
    doomed = page.with_name(f"{page.name}{PRUNING}{os.getpid()}")
    page.rename(doomed)
    if empty and not pagedir.is_empty_page(doomed):
        _put_back(doomed, page)
        return False
    try:
        shutil.rmtree(doomed)
    except OSError:
        with contextlib.suppress(OSError):
            doomed.rename(page)
        raise
    return True


def _put_back(doomed: Path, page: Path) -> None:
    try:
        doomed.rename(page)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    meta = pagedir.read_page_file(doomed)[0]  # a writer writes page.json before any key
    if meta is None:
        raise OSError(f"it was written to since it was read, and {page} made again; it is left as {doomed}")
    pagedir.merge_entries(page, meta, pagedir.read_all(doomed, meta))
    shutil.rmtree(doomed)


@click.command("prune")
@book_argument
@click.option(
    "--keep",
    "keep",
    multiple=True,
    required=True,
    metavar="MODULE",
    help="A module (or path/to/file.py) whose tunebook kernels are current (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
def command(book: Path | None, keep: tuple[str, ...], dry_run: bool) -> None:
    """Delete BOOK files of old versions of the kernels defined in the --keep modules.

    A file is dropped when its kernel name is one of those kernels' names and its kernel id
    (source hash + key names) is not the one this process computes. Copies of unreadable
    files a write kept aside (NAME.corrupt-TIME-PID), pages an interrupted prune left
    (PAGE.pruning-PID), empty pages and the temp files of writes killed an hour ago or more
    are dropped too.
    """
    # Streamed: prune judges pages by their kernel and platform, never reads their keys (a
    # 200,000-key book was read whole, keys and all, only to be judged by page.json).
    loaded = load_or_fail(book, stream=True)  # before the imports, which take seconds (torch)
    kernels = current_kernels(keep)
    warn_skipped(loaded)
    triton_now = triton_version()
    doomed: list[tuple[Path, str]] = []
    kept, other_triton, other_key = 0, 0, 0
    for page in loaded.pages:
        current = kernels.get(page.kernel_name)
        if current is None or is_imported(page.doc):
            continue
        mine = page.identity
        if mine.id in {k.id for k in current}:
            kept += 1
        elif page.doc.platform.get("triton") != triton_now:
            other_triton += 1
        elif mine.key not in {k.key for k in current}:
            other_key += 1
        else:
            ids = ", ".join(sorted(k.id for k in current))
            why = f"old version of {page.kernel_name} (kernel id {mine.id}; current {ids})"
            doomed.append((page.path, why))
    # Copies of unreadable files kept aside by a write (beside the pages, or in one) and pages
    # an interrupted prune left; a ``.foreign-*`` page (another kernel's readable book) stays.
    doomed += [(path, what) for path, what, pruned in loaded.leftover_kinds() if pruned]
    doomed += [(path, "an empty page (a write killed while it created it)") for path in loaded.empty]
    # Temp files, and pages being created, of writes killed at least an hour ago.
    where = dict.fromkeys([loaded.source, *(page.path for page in loaded.pages if page.path.is_dir())])
    stale = [path for d in where for path in pagedir.stale_leftovers(d)]
    if not is_page_dir(loaded.source):  # a book directory, where pages are created
        stale += pagedir.stale_creations(loaded.source)
    doomed += [(path, "left by a write killed mid-way") for path in stale]
    console = out()
    verb = "would drop" if dry_run else "dropped"
    failed: list[str] = []
    spared = 0
    for path, why in doomed:
        if not dry_run:
            try:
                if path.is_dir() and not path.is_symlink():
                    # a format-2 page, its locks and pending news
                    if not _remove_page(path, empty=path in loaded.empty):
                        spared += 1
                        console.print(
                            f"kept {escape(str(path))}: a writer wrote to it since it was read empty"
                        )
                        continue
                else:
                    path.unlink(missing_ok=True)
                    # The lock older tunebooks kept beside a format-1 file: no owner left.
                    # Unlinking removes a planted symbolic link itself, never its target.
                    Path(str(path) + ".lock").unlink(missing_ok=True)
            except OSError as exc:
                failed.append(f"{path}: {exc.strerror or exc}")
                continue
        console.print(f"{verb} {escape(str(path))}: {escape(why)}")
    dropped = len(doomed) - spared - len(failed)
    if failed:  # one error line, and a failing exit status: never "dropped" for what stayed
        raise click.ClickException(
            f"could not delete {len(failed)} of {len(doomed) - spared} files ({dropped} dropped): "
            f"{'; '.join(failed[:3])}{'; ...' if len(failed) > 3 else ''}. Check the permissions of "
            f"{loaded.source} (or who holds those files) and run prune again."
        )
    console.print(
        f"{verb} {len(doomed) - spared} files; kept {kept} current files of {len(kernels)} kernels"
        f"{'' if not dry_run else ' (dry run: nothing deleted)'}"
    )
    if other_triton:
        console.print(
            f"left {other_triton} files of these kernels tuned under another Triton version than "
            f"{triton_now}: the kernel id covers Triton's own functions, so it differs there; run "
            "prune under that version to judge them"
        )
    if other_key:
        console.print(
            f"left {other_key} files of these kernel names with other key names: another kernel of "
            "the same name (another project's?) or an older key; delete them by hand if they are yours"
        )
