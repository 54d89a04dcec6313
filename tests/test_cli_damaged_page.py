"""The command line on a page whose page.json is damaged (a truncated write from another tool,
a bad byte) while its key files are intact: the keys are shown where the book's other pages
name the page's kernel and platform (their ids are the ones the directory's name carries),
else listed by name; either way one line says so and how page.json is rewritten."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import tunebook
from conftest import book_files
from test_cli import SIZES, h200, invoke, the_doc, tune_add, write_doc

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once

TRUNCATED = b'{"format": "tunebook-page", "version": 2, "kernel": {"hash": "'


def _damaged(book_dir: Path) -> Path:
    """The tuned add_kernel page of ``book_dir`` with its page.json truncated."""
    (page,) = (p for p in book_files(book_dir) if p.is_dir())
    (page / "page.json").write_bytes(TRUNCATED)
    return page


def test_show_lists_the_keys_of_a_page_it_cannot_name_and_says_how_to_rewrite_page_json(
    book_dir: Path,
) -> None:
    tune_add()
    page = _damaged(book_dir)
    res = invoke("show", ok=False)  # nothing else in the book: nothing to show is a failure
    assert "3 key file(s) are not shown" in res.output
    assert '[100,"torch.float32","torch.float32","torch.float32"]' in res.output
    assert f"TUNEBOOK_DIR={book_dir}" in res.output
    # The fix it names: a call of the kernel with the book as TUNEBOOK_DIR, which reads the
    # keys without page.json (it knows which page it asked for), benchmarks nothing, rewrites it.
    before = tunebook.stats()["benchmarked"]
    with pytest.warns(tunebook.BookWarning, match="keys were read without it.*It was rewritten"):
        tune_add()
    assert tunebook.stats()["benchmarked"] == before
    assert json.loads((page / "page.json").read_text())["kernel"]["name"] == "add_kernel"
    data = json.loads(invoke("show", "--json").stdout)
    assert data["skipped"] == [] and [e["key"][0] for e in data["files"][0]["entries"]] == list(SIZES)


def test_a_page_named_by_the_books_other_pages_is_shown_and_merge_into_itself_rewrites_page_json(
    book_dir: Path,
) -> None:
    tune_add()
    doc = the_doc(book_dir)
    write_doc(book_dir, h200(doc))  # the same kernel on another platform: names the kernel
    other = {**doc.kernel, "name": "other_kernel", "hash": "0" * 64}
    write_doc(book_dir, replace(doc, kernel=other))  # another kernel on this platform: names it
    page = _damaged(book_dir)
    data = json.loads(invoke("show", "--json").stdout)
    (shown,) = (f for f in data["files"] if f["path"] == str(page))
    assert shown["kernel"]["hash"] == doc.kernel["hash"] and shown["platform"] == doc.platform
    assert [e["key"][0] for e in shown["entries"]] == list(SIZES)
    (skipped,) = data["skipped"]
    assert skipped["path"] == str(page / "page.json") and "taken from" in skipped["reason"]
    assert f"tunebook merge {book_dir} -o {book_dir}" in skipped["reason"]
    invoke("merge", book_dir, "-o", book_dir)
    assert json.loads((page / "page.json").read_text())["kernel"] == doc.kernel
    assert json.loads(invoke("show", "--json").stdout)["skipped"] == []
    assert the_doc_of(page).entries == doc.entries


def test_merge_carries_a_page_named_by_the_books_other_pages_into_its_output(
    book_dir: Path, tmp_path: Path
) -> None:
    tune_add()
    doc = the_doc(book_dir)
    write_doc(book_dir, h200(doc))
    write_doc(book_dir, replace(doc, kernel={**doc.kernel, "name": "other_kernel", "hash": "0" * 64}))
    page = _damaged(book_dir)
    out = tmp_path / "out"
    invoke("merge", book_dir, "-o", out)
    copied = out / page.name
    assert json.loads((copied / "page.json").read_text())["kernel"] == doc.kernel
    assert the_doc_of(copied).entries == doc.entries


def the_doc_of(page: Path) -> tunebook._book.Document:
    from tunebook._book import DirectoryStore

    found = DirectoryStore(page.parent, writable=False).fetch(page.name + ".json")
    assert found is not None
    return found
