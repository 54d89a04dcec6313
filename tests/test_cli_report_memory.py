"""`tunebook report` holds what it draws, not the book (issue 10 item 6: a 40,000-key page
took 415 MB, all of it the loaded page): a format-2 page's keys are read one at a time and
folded into the section, which keeps only the evenly spaced keys it shows, and the report
is the same as when the whole page is read (a format-1 book: read whole)."""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

import pytest

from report_books import varied_doc, write_book
from test_cli import invoke
from tunebook._book import Entry, pagedir
from tunebook._jsonio import key_text
from tunebook.cli._load import load
from tunebook.cli.report import MAX_KEYS_DRAWN, MAX_TABLE_ROWS, page_section

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once


def _report(book: Path, out: Path) -> str:
    invoke("report", book, "-o", out, "--jobs", "1")
    # The page's own name: a format-1 file ``<page>.json`` or a format-2 directory ``<page>``.
    return re.sub(r"(--[0-9a-f]{16})\.json", r"\1", out.read_text().replace(str(book), "BOOK"))


@pytest.mark.parametrize("keys", [45, 450])  # every key drawn in the table; 200 of 450
def test_a_streamed_page_reports_what_the_whole_page_reports(tmp_path: Path, keys: int) -> None:
    docs = [varied_doc(keys)]
    write_book(tmp_path / "one", docs, fmt=1)
    write_book(tmp_path / "two", docs, fmt=2)
    assert [p.streamed for p in load(tmp_path / "two", stream=True).pages] == [True]
    whole, streamed = (
        _report(tmp_path / "one", tmp_path / "1.html"),
        _report(tmp_path / "two", tmp_path / "2.html"),
    )
    assert streamed == whole
    assert f"· {keys} keys</p>" in streamed and "failed configs</summary>" in streamed
    assert "first config is not recorded" in streamed and "without results" in streamed
    assert (f"{MAX_TABLE_ROWS} of {keys} keys shown" in streamed) == (keys > MAX_TABLE_ROWS)


def write_page(directory: Path, keys: int) -> Path:
    """A format-2 page of ``keys`` keys, written directly (a fixture need not lock and fsync)."""
    doc = varied_doc(1, "many")
    meta = {"kernel": doc.kernel, "platform": doc.platform}
    page = directory / "many--page"
    pagedir.ensure_page(page, meta)
    template = next(iter(doc.entries.values()))
    for n in range(keys):
        entry = Entry((n, "torch.float16"), template.results, first=template.first)
        (page / pagedir.key_file_name(key_text(list(entry.key)))).write_text(pagedir.entry_text(entry, meta))
    return page


def test_a_section_holds_the_entries_it_draws_not_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every entry the reader returns is watched: at no time are more of them alive than the
    section draws (plus the one being read), although every key is read."""
    keys = 1000
    page_dir = write_page(tmp_path / "book", keys)
    reads, alive, most = 0, 0, 0
    real = pagedir.read_key

    def freed() -> None:
        nonlocal alive
        alive -= 1

    def watched(*args: Any) -> Entry | None:
        nonlocal reads, alive, most
        entry = real(*args)
        assert entry is not None
        reads, alive = reads + 1, alive + 1
        weakref.finalize(entry, freed)
        most = max(most, alive)
        return entry

    monkeypatch.setattr(pagedir, "read_key", watched)
    (page,) = load(page_dir, stream=True).pages
    section = page_section(page)
    assert reads == keys and f"{MAX_TABLE_ROWS} of {keys} keys shown" in section
    assert MAX_KEYS_DRAWN <= most <= MAX_KEYS_DRAWN + 1, most  # the drawn ones, and the one being read


def test_a_key_file_the_report_cannot_read_is_listed_as_skipped(tmp_path: Path) -> None:
    page_dir = write_page(tmp_path / "book", 10)
    broken = page_dir / pagedir.key_file_name(key_text([3, "torch.float16"]))
    broken.write_text("{not json")
    res = invoke("report", tmp_path / "book", "-o", tmp_path / "r.html")
    assert "skipped" in res.output and broken.name in res.output
    assert "· 9 keys</p>" in (tmp_path / "r.html").read_text()
