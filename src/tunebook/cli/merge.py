"""``tunebook merge``: combine books from many machines into one, decided by measurement.

**The rule.** Files are grouped by their identity — kernel name, kernel id (source hash
+ key names) and platform id — not by their file names. Within a group, entries are
united per key and results per config. Where two books hold a result for the same (key,
config), the better measurement stands:

1. a wrong result under ``check=`` beats everything else: it is a verdict about a run that
   succeeded, not a failure that may have been transient, and the other book's ``ok`` may
   be unchecked or the reference run of another judging. Between two wrong results, one
   that says what it was judged under (``_failures.judged_under``) beats one an older
   tunebook wrote: a tuning that judges otherwise judges the key again
   (``_failures.stale_verdicts``), where the untagged verdict would stand for good;
2. a successful timing beats any other failure (the config demonstrably runs on this
   platform; a failure elsewhere may have been a transient one, such as memory held by a
   neighbour);
3. between two timings, the smaller median stands — noise on a GPU only ever adds time;
4. remaining ties (and two failures of one kind) go to the smaller (ms, error, at, config)
   in JSON order, so that the choice never depends on the order of the inputs.

Every input's wrong results stand with what they were judged under (of two on one config,
one), so a tuning that judges under anything else judges the merged key again: one whose
inputs judged other configs wrong under different references or settings, whatever it
judges under. ``chosen`` is only ever a config that no input holds as wrong.

Entry bookkeeping: ``tuned_at`` is the earliest, ``updated_at`` and ``tunebook`` the
latest, ``tuning_seconds`` the largest (merging a book with itself must not double it).

Every choice is a minimum under a total order, so merging is commutative, associative
and idempotent: ``merge(A, B)`` and ``merge(B, A)`` write byte-identical files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import click
from rich.markup import escape

from .._book import pagedir
from .._book.records import Document, Entry, Result
from .._failures import is_wrong_result, judged_under
from ._common import (
    err,
    fail_if_left_alone,
    load_or_fail,
    out,
    output_fix,
    output_option,
    select_pages,
    skipped_results,
    warn_skipped,
    write_document,
    write_problem,
    writing,
)
from ._load import canonical_file_name, identity_of, platform_id_of
from ._ticker import Ticker


def _rank(result: Result) -> tuple[object, ...]:
    """Smaller is better; a total order over results (see the module docstring)."""
    wrong = is_wrong_result(result)
    return (
        0 if wrong else 1 if result.ok else 2,
        1 if wrong and judged_under(result) is None else 0,
        1 if result.quick else 0,  # a full measurement is better evidence than a screening one
        result.median if result.ok else 0.0,
        json.dumps(result.to_json(), sort_keys=True),
    )


def merge_entries(a: Entry, b: Entry) -> Entry:
    results = dict(a.results)
    for cid, result in b.results.items():
        mine = results.get(cid)
        if mine is None or _rank(result) < _rank(mine):
            results[cid] = result
    return Entry(
        key=min(a.key, b.key, key=lambda k: json.dumps(list(k))),
        results=results,
        tuning_seconds=max(a.tuning_seconds, b.tuning_seconds),
        tuned_at=min(filter(None, (a.tuned_at, b.tuned_at)), default=""),
        updated_at=max(a.updated_at, b.updated_at),
        tunebook=max(a.tunebook, b.tunebook, key=_version_order),
        chosen=_merged_choice(a.chosen, b.chosen, results),
        # The same book merged twice must not change: counts take the larger, not the sum.
        misses=max(a.misses, b.misses),
        call=min((c for c in (a.call, b.call) if c is not None), key=_canonical, default=None),
        first=min(filter(None, (a.first, b.first)), default=""),
    )


def _version_order(version: str) -> tuple[tuple[int, ...], int, str, str]:
    """The order of tunebook versions: "0.10.0" after "0.9.0" (as text it came first), "0.9.1"
    after "0.9", "1.0.0" after "1.0.0rc1". The release numbers (trailing zeros dropped), then
    a final release (or a +local / .postN one) after its pre-releases, then the text."""
    found = re.match(r"(\d+(?:\.\d+)*)(.*)", version)
    if found is None:
        return ((), 0, version, version)
    release = [int(p) for p in found[1].split(".")]
    while release and release[-1] == 0:
        release.pop()
    suffix = found[2]
    final = not suffix or suffix.startswith(("+", ".post"))
    return (tuple(release), int(final), suffix, version)


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _merged_choice(a: str, b: str, results: dict[str, Result]) -> str:
    """Both books' tie-aware choices: the measurably faster one, then the smaller id. A config
    that either book holds as a wrong result (its result in ``results``) is no choice."""
    candidates = [c for c in {a, b} if c and c in results and results[c].ok]
    if not candidates:
        return ""
    return min(candidates, key=lambda c: (results[c].median, c))


def merge_documents(a: Document, b: Document) -> Document:
    """``a`` and ``b`` are of one (kernel, platform); the result does not depend on their order."""
    entries = dict(a.entries)
    for key_text, entry in b.entries.items():
        entries[key_text] = merge_entries(entries[key_text], entry) if key_text in entries else entry

    def canonical(value: dict[str, object]) -> str:
        return json.dumps(value, sort_keys=True)

    kernel = min(a.kernel, b.kernel, key=canonical)
    platform = min(a.platform, b.platform, key=canonical)
    return replace(a, kernel=kernel, platform=platform, entries=entries)


def group_key(doc: Document) -> tuple[str, str, str]:
    ident = identity_of(doc)
    return (ident.name, ident.id, platform_id_of(doc.platform))


def merge_all(docs: Iterable[Document]) -> dict[str, Document]:
    """Merged documents by the file name tunebook gives each (kernel, platform)."""
    groups: dict[tuple[str, str, str], Document] = {}
    for doc in docs:
        gk = group_key(doc)
        groups[gk] = merge_documents(groups[gk], doc) if gk in groups else doc
    return {canonical_file_name(doc): doc for doc in groups.values()}


def write_merged(
    directory: Path,
    merged: dict[str, Document],
    left_alone: list[str],
    done: Callable[[str], None] | None = None,
) -> Iterator[tuple[Path, int, int]]:
    """Write each document atomically (see ``write_document``), yielding each page's path
    once written, how many of its keys were rewritten and how many its files already held
    as merged (left as they were: merging a book into itself rewrites nothing); key files
    left as they were for another reason (a newer tunebook's, one unreadable just now, a key
    grown past the size limit) are added to ``left_alone``. Each key's files are read again
    as it is written and folded in by ``merge_entries``: what another merge or a live
    autotuner wrote since is kept. ``done(key text)``: called as each key is done."""
    directory.mkdir(parents=True, exist_ok=True)
    pagedir.sweep_creations(directory)  # once for every page written (one listing of the book)
    for name in sorted(merged):
        held: list[str] = []
        left = write_document(directory / name, merged[name], fold=merge_entries, done=_counting(held, done))
        left_alone += left
        rewritten = len(merged[name].entries) - len(left) - len(held)
        yield directory / pagedir.page_dir_name(name), rewritten, len(held)


def _counting(held: list[str], done: Callable[[str], None] | None) -> Callable[[str, bool], None]:
    """A key's done-callback for ``write_document`` that lists in ``held`` the keys whose files
    already held what was written, then calls ``done``."""

    def key_done(text: str, changed: bool) -> None:
        if not changed:
            held.append(text)
        if done is not None:
            done(text)

    return key_done


def page_line(path: Path, written: int, held: int) -> str:
    """What a merge did to one page: the keys it rewrote, and those whose files already held
    the merged result (left as they were)."""
    where = escape(str(path))
    if not written and held:
        return f"unchanged {where} ({held} keys already as merged)"
    unchanged = f"; {held} already as merged, left as they were" if held else ""
    return f"wrote {where} ({written} keys{unchanged})"


def skipped_inputs(count: int) -> str:
    """The end of a final line when input files were skipped (the exit status is then 1)."""
    return f"; {count} input file(s) skipped (listed above), their results not included" if count else ""


def read_books(
    sources: Sequence[Path | None], inputs: Collection[Path | None], undone: str
) -> tuple[dict[str, Document], int, int]:
    """Read ``sources`` and combine them by the merge rule: (the merged pages, the book files
    read, the input files skipped). ``inputs``: the sources given as inputs, each of which
    must hold a book file, and whose skipped files are counted. Ctrl-C while reading says
    that nothing was ``undone`` ("written", "sent") and exits 130."""
    docs: list[Document] = []
    skipped = 0
    try:
        for source in sources:
            loaded = load_or_fail(source)
            warn_skipped(loaded)
            if source in inputs:
                select_pages(loaded)  # an input with no readable book file is an error (docs/cli.md)
                skipped += skipped_results(loaded)
            docs += [page.doc for page in loaded.pages]
        return merge_all(docs), len(docs), skipped
    except KeyboardInterrupt:
        err().print(f"interrupted while reading the books: nothing was {undone}", highlight=False)
        raise click.exceptions.Exit(130) from None


def fail_if_skipped(skipped: int, rest: str = "") -> None:
    """Exit 1 when input files were skipped (each was listed with its reason), saying that
    ``rest`` ("The rest was merged") was done all the same."""
    if skipped:
        raise click.ClickException(
            f"{skipped} input file(s) skipped (listed above, each with its reason): their results are "
            f"not included{'. ' + rest if rest else ''}"
        )


@click.command("merge")
@click.argument("books", nargs=-1, required=True, type=click.Path(path_type=Path))
@output_option("Directory to write the merged book to; book files already in it take part in the merge.")
@click.option("--dry-run", is_flag=True, help="Say what would be written; write nothing.")
def command(books: tuple[Path, ...], output: Path, dry_run: bool) -> None:
    """Merge BOOKS (directories or files, e.g. from several machines) into the directory OUTPUT.

    Results for the same kernel, platform, key and config are decided by measurement: a
    success beats a failure, then the smaller median time stands. The output does not depend
    on the order of the inputs. Exit status 1 if an input file was skipped or a key could
    not be written (each is named; the rest is merged).
    """
    fix = output_fix(output, "Choose a writable directory with -o")
    if not dry_run:
        problem = write_problem(output)  # before reading the inputs, which may take a while
        if problem is not None:
            raise click.ClickException(f"cannot write {output}: {problem}. {fix}")
    sources: list[Path | None] = list(dict.fromkeys(books))  # a book given twice is read once
    if output.is_dir() and output not in sources:
        sources.append(output)  # merging into a live book keeps what it already has
    merged, files, skipped = read_books(sources, books, "written")
    console = out()
    if dry_run:
        for name in sorted(merged):
            # the page directory write_merged makes (format 2), not the format-1 file name
            page = output / pagedir.page_dir_name(name)
            console.print(f"would write {escape(str(page))} ({len(merged[name].entries)} keys)")
        fail_if_skipped(skipped)
        return
    left_alone: list[str] = []
    written = Ticker("merge", sum(len(doc.entries) for doc in merged.values()), "keys written")

    def progress() -> str:
        return (
            f"{written.done} of {written.total} keys were written, each whole; running the merge again "
            "is safe (it writes the rest)"
        )

    try:
        with writing(output, fix, progress):
            for path, keys, held in write_merged(output, merged, left_alone, lambda _: written.add()):
                console.print(page_line(path, keys, held))
    except KeyboardInterrupt:
        err().print(f"interrupted: {escape(progress())}", highlight=False)
        raise click.exceptions.Exit(130) from None
    where = escape(str(output))  # a path may hold [...], which rich would take for markup
    console.print(
        f"merged {files} book files from {len(books)} inputs into {len(merged)} files in {where}"
        + skipped_inputs(skipped)
    )
    fail_if_left_alone(left_alone)
    fail_if_skipped(skipped, "The rest was merged")
