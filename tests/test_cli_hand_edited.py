"""The book-reading commands over books a person edited or arranged by hand, and outputs that
would land on a book: what a misuse review of `report`, `show`, `diff`, `merge`, `prune` and
`explain` found (2026-12-05). Each case failed before its fix: a traceback, a file of the book
overwritten, or a wrong answer with exit status 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from test_cli import entry, invoke, module_file, result, tune_add
from tunebook import _warnings
from tunebook._book import Document, pagedir
from tunebook._jsonio import key_text
from tunebook.cli._common import write_document
from tunebook.cli._load import canonical_file_name
from tunebook.cli.report import MAX_FAILURES_LISTED

# The command line: last Triton only (test_cli.py says why).
pytestmark = pytest.mark.once

PLATFORM = {"backend": "cuda", "device": "NVIDIA H200", "arch": "90", "triton": "3.6.0", "timer": "events"}


def book_of(
    directory: Path,
    keys: dict[tuple[Any, ...], list[Any]],
    version: str = "0.1.0",
    platform: dict[str, Any] = PLATFORM,
) -> Path:
    """A format-2 book in ``directory`` of kernel ``k`` (key n, dtype), one key per item; the page."""
    entries = {}
    for key, results in keys.items():
        e = replace(entry([*key, "torch.float16"], results), tunebook=version)
        entries[key_text(e.key)] = e
    doc = Document({"name": "k", "hash": "cd" * 32, "key": ["n"]}, platform, entries)
    name = canonical_file_name(doc)
    assert write_document(directory / name, doc) == []
    return directory / pagedir.page_dir_name(name)


def key_files(page: Path) -> list[Path]:
    return sorted(p for p in page.glob("*.json") if p.name != pagedir.PAGE_FILE)


def edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for name, value in changes.items():
        if value is None:
            data.pop(name)
        else:
            data[name] = value
    path.write_text(json.dumps(data))


def two_configs(fast: float = 1.0) -> list[Any]:
    return [result({"BLOCK": 32}, 2.0), result({"BLOCK": 64}, fast)]


# ------------------------------------------------------------------------------------ report


def test_report_refuses_an_output_that_is_a_file_of_the_book_or_not_html(tmp_path: Path) -> None:
    # `report -o` onto a key file replaced that key's results with HTML (exit 0); onto
    # page.json, the whole page was lost.
    page = book_of(tmp_path / "book", {(1,): two_configs(), (2,): two_configs()})
    before = {p: p.read_bytes() for p in page.iterdir() if p.is_file()}
    for target in (key_files(page)[0], page / pagedir.PAGE_FILE, page / "new.html"):
        res = invoke("report", tmp_path / "book", "-o", target, ok=False)
        assert res.exit_code == 2 and "inside the page" in res.output, res.output
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    res = invoke("report", tmp_path / "book", "-o", notes, ok=False)
    assert "exists and is not an HTML page" in res.output and notes.read_text() == "my notes"
    assert {p: p.read_bytes() for p in page.iterdir() if p.is_file()} == before
    out = tmp_path / "report.html"
    invoke("report", tmp_path / "book", "-o", out)
    invoke("report", tmp_path / "book", "-o", out)  # its own earlier output is replaced


def test_report_draws_keys_holding_dollar_signs_and_long_keys(tmp_path: Path) -> None:
    # matplotlib read "$\\foo{$" as TeX and raised; a balanced "a$b$c" was drawn as "abc".
    book_of(tmp_path / "book", {("$\\foo{$",): two_configs(), ("a$b$c",): two_configs(0.5)})
    invoke("report", tmp_path / "book", "-o", tmp_path / "r.html")
    assert "$\\\\foo{$" in (tmp_path / "r.html").read_text()
    from tunebook.cli._plots import MOST_TICK_CHARS, _tick_label

    # Long keys are cut in the middle: a rotated label the figure crops showed only its tail,
    # the same for every key.
    long_a, long_b = "[" + "k" * 60 + ",1]", "[" + "k" * 60 + ",2]"
    assert len(_tick_label(long_a)) <= MOST_TICK_CHARS and "…" in _tick_label(long_a)
    assert _tick_label(long_a) != _tick_label(long_b) and _tick_label("[1,2]") == "[1,2]"


def test_the_reports_failure_list_says_when_it_is_cut(tmp_path: Path) -> None:
    failing = [result({"BLOCK": 64}, 1.0), result({"BLOCK": 8}, None, "OutOfResources: shared memory")]
    book_of(tmp_path / "book", {(n,): failing for n in range(MAX_FAILURES_LISTED + 5)})
    invoke("report", tmp_path / "book", "-o", tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    assert f"{MAX_FAILURES_LISTED + 5} failed configs" in text
    assert f"the first {MAX_FAILURES_LISTED} shown" in text and f"lists all {MAX_FAILURES_LISTED + 5}" in text


# ----------------------------------------------------------------------- hand-edited contents


def test_square_brackets_in_what_is_skipped_are_printed_not_read_as_markup(tmp_path: Path) -> None:
    # A key file holding another key than its name says is skipped, its reason quoting the key:
    # "[/foo]" in it raised rich's MarkupError in show, diff (exit 1: "the books differ") and merge.
    page = book_of(tmp_path / "book", {(1,): two_configs(), (2,): two_configs()})
    edit(key_files(page)[0], key=[1, "[/foo]", "torch.float16"])
    for args in (["show"], ["report", "-o", tmp_path / "r.html"], ["merge", "-o", tmp_path / "m"]):
        _warnings.forget()  # each command is a process of its own where people run them
        # merge exits 1: an input file was skipped, its results not merged
        res = invoke(args[0], tmp_path / "book", *args[1:], ok=args[0] != "merge")
        assert "Traceback" not in res.output and '"[/foo]"' in res.output, res.output
    _warnings.forget()
    res = invoke("diff", tmp_path / "book", tmp_path / "book", ok=None)
    assert res.exit_code == 0 and '"[/foo]"' in res.output, res.output


def test_a_timing_no_kernel_takes_makes_its_file_unreadable_and_a_tiny_one_no_infinite_speedup(
    tmp_path: Path,
) -> None:
    # 1e308 ms: "infx" speed-ups, --json that refused to encode, a report that raised.
    # A winner of 1e-310 ms: the speed-up over it overflowed to infinity.
    page = book_of(tmp_path / "book", {(1,): two_configs(), (2,): two_configs(1e-310)})
    huge = key_files(page)[0]
    data = json.loads(huge.read_text())
    first = next(iter(data["results"]))
    data["results"][first]["ms"] = [1e308, 1e308, 1e308]
    huge.write_text(json.dumps(data))
    shown = json.loads(invoke("show", tmp_path / "book", "--json").stdout)
    (page_json,) = shown["files"]
    assert [k["speedup"] for k in page_json["entries"]] == [None]  # key 2's; key 1's file is skipped
    _warnings.forget()
    assert "at most 1e+09 ms" in invoke("show", tmp_path / "book").output
    invoke("report", tmp_path / "book", "-o", tmp_path / "r.html")
    other = tmp_path / "other"
    book_of(other, {(2,): two_configs(0.5)})
    diffed = invoke("diff", tmp_path / "book", other, "--json", ok=None)
    assert diffed.exit_code == 1 and json.loads(diffed.stdout)["differ"]


def test_a_key_file_without_its_kernel_field_is_called_damaged_not_another_version(tmp_path: Path) -> None:
    page = book_of(tmp_path / "book", {(1,): two_configs(), (2,): two_configs()})
    edit(key_files(page)[0], kernel=None)
    edit(key_files(page)[1], key=None)
    output = invoke("show", tmp_path / "book").output
    assert "its 'kernel' field is missing or not a string" in output
    assert "another kernel version" not in output
    (line,) = [x for x in output.splitlines() if "'key' must be a list" in x]
    assert line.count(key_files(page)[1].name) == 1, line  # the file was named twice


def test_keys_that_are_not_ascii_are_shown_as_written(tmp_path: Path) -> None:
    book_of(tmp_path / "book", {("注意",): two_configs(), ("\ud800",): two_configs()})
    shown = invoke("show", tmp_path / "book").stdout  # a lone surrogate cannot be printed as is
    assert "注意" in shown and "\\ud800" in shown
    invoke("report", tmp_path / "book", "-o", tmp_path / "r.html")


def test_report_to_a_fifo_does_not_wait_on_it(tmp_path: Path) -> None:
    # The check for a non-HTML file opened the FIFO to read it: the command hung.
    book_of(tmp_path / "book", {(1,): two_configs()})
    fifo = tmp_path / "out.html"
    os.mkfifo(fifo)
    res = invoke("report", tmp_path / "book", "-o", fifo, ok=None)
    assert "Traceback" not in res.output


def test_a_directory_kept_aside_as_corrupt_is_a_leftover(book_dir: Path, tmp_path: Path) -> None:
    # A write keeps aside whatever sits at a key file's name, a directory too.
    tune_add()
    (page,) = [p for p in book_dir.iterdir() if p.is_dir()]
    aside = page / "1.json.corrupt-20260101T000000-1"
    aside.mkdir()
    assert str(aside) in invoke("show", book_dir).output
    invoke("prune", book_dir, "--keep", module_file(tmp_path))
    assert not aside.exists()


# ------------------------------------------------------------------------------------ prune


def test_prune_removes_only_the_leftovers_tunebook_names(book_dir: Path, tmp_path: Path) -> None:
    # "my-notes.corrupt-keep" was "an unreadable book kept aside" to prune, and deleted whole.
    tune_add()
    mine = book_dir / "my-notes.corrupt-keep"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (book_dir / "plans.pruning-soon").mkdir()
    ours = book_dir / "x.json.corrupt-20260101T000000-1"
    ours.write_text("junk")
    module = module_file(tmp_path)
    output = invoke("prune", book_dir, "--keep", module).output
    assert not ours.exists() and (mine / "notes.txt").read_text() == "mine"
    assert (book_dir / "plans.pruning-soon").is_dir() and "my-notes" not in output


# ------------------------------------------------------------------------------------- diff


def test_diff_refuses_two_platform_options_that_name_one_platform(tmp_path: Path) -> None:
    book_of(tmp_path / "book", {(1,): two_configs()})
    res = invoke("diff", tmp_path / "book", "--platform", "H200", "--platform", "h200", ok=False)
    assert res.exit_code == 2 and "both match the platform" in res.output, res.output


def test_diff_platform_filters_match_as_before_the_labels_named_the_runtime_and_sm_count(
    tmp_path: Path,
) -> None:
    """Found by a review: labels now say the CUDA runtime and SM count, so a filter that named
    one platform (``4`` for the L4) also matched another's ``114 SMs`` and was refused as
    ambiguous. The device, arch, Triton and timer are matched first, as before; the runtime
    and SM count only where those match nothing."""
    l4 = {**PLATFORM, "device": "NVIDIA L4", "arch": "89", "runtime": "cuda 12.4", "sm_count": 58}
    h100 = {**PLATFORM, "device": "NVIDIA H100 PCIe", "runtime": "cuda 12.8", "sm_count": 114}
    book_of(tmp_path / "book", {(1,): two_configs()}, platform=l4)
    book_of(tmp_path / "book", {(1,): two_configs(0.5)}, platform=h100)
    data = json.loads(
        invoke(
            "diff", tmp_path / "book", "--platform", "4", "--platform", "cuda 12.8", "--json", ok=None
        ).stdout
    )
    (pair,) = data["pages"]
    assert pair["a"]["platform"].startswith("NVIDIA-L4-89") and pair["b"]["platform"].startswith(
        "NVIDIA-H100"
    )
    assert not any(p["platform_id"].startswith("4") for p in (pair["a"], pair["b"]))


def test_diff_lists_keys_in_the_order_show_does(tmp_path: Path) -> None:
    book_of(tmp_path / "a", {(9,): two_configs(), (10,): two_configs(), (100,): two_configs()})
    book_of(tmp_path / "b", {(100,): two_configs()})
    data = json.loads(invoke("diff", tmp_path / "a", tmp_path / "b", "--json", ok=None).stdout)
    (pair,) = data["pages"]
    assert [k[0] for k in pair["keys_only_a"]] == [9, 10]  # as text, "[10," came before "[9,"


# ------------------------------------------------------------------------------------ merge


def test_merge_counts_what_it_wrote_and_names_the_fix_for_what_it_left(tmp_path: Path) -> None:
    # A key file of a newer tunebook in OUT is left as it is: "wrote ... (2 keys)" was said of 1.
    page = book_of(tmp_path / "out", {(1,): two_configs(), (2,): two_configs()})
    edit(key_files(page)[0], version=99)
    book_of(tmp_path / "in", {(1,): two_configs(0.5), (2,): two_configs(0.5)})
    res = invoke("merge", tmp_path / "in", "-o", tmp_path / "out", ok=False)
    assert "(1 keys)" in res.output and "(2 keys)" not in res.output, res.output
    assert "upgrade tunebook" in res.output and "permissions" not in res.output


@pytest.mark.parametrize(
    ("older", "newer"),
    [("0.9.0", "0.10.0"), ("0.9", "0.9.1"), ("1.0.0rc1", "1.0.0"), ("1.0rc1", "1.5"), ("1.0", "1.0.0.post1")],
)
def test_merge_keeps_the_later_tunebook_version_by_number(tmp_path: Path, older: str, newer: str) -> None:
    for first, second in ((older, newer), (newer, older)):
        book_of(tmp_path / first / "a", {(1,): two_configs()}, version=first)
        book_of(tmp_path / first / "b", {(1,): two_configs()}, version=second)
        invoke("merge", tmp_path / first / "a", tmp_path / first / "b", "-o", tmp_path / first / "m")
        (page,) = [p for p in (tmp_path / first / "m").iterdir() if p.is_dir()]
        (merged,) = key_files(page)
        assert json.loads(merged.read_text())["tunebook"] == newer  # "0.9.0" won as text


# -------------------------------------------------------------------------- odd directories


def test_an_unreadable_page_directory_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under mode 000 the page was "page.json unreadable ... its 0 key file(s) are intact", with
    # advice to call the kernel. Tests run as root here, so the permission is refused by hand.
    page = book_of(tmp_path / "book", {(1,): two_configs()})
    book_of(tmp_path / "book", {(2,): two_configs()}, version="0.2.0")
    from tunebook.cli import _load

    real = os.access
    monkeypatch.setattr(_load.os, "access", lambda p, mode: Path(p) != page and real(p, mode))
    output = invoke("show", tmp_path / "book", ok=False).output
    assert "the page directory cannot be read (permission denied)" in output and "chmod" in output
    assert "intact" not in output


def test_a_dangling_link_to_a_page_is_said(tmp_path: Path) -> None:
    book_of(tmp_path / "book", {(1,): two_configs()})
    link = tmp_path / "book" / f"gone--{'1' * 16}--cpu--{'2' * 16}"
    link.symlink_to(tmp_path / "elsewhere")
    output = invoke("show", tmp_path / "book").output
    assert f"{link}: a link to {tmp_path / 'elsewhere'}, which does not exist" in output


def test_explain_reads_no_keys_of_other_kernels_pages(book_dir: Path, tmp_path: Path) -> None:
    # It read every key of every page (3.1 s for one 10k-key page of another kernel).
    page = book_of(book_dir, {(1,): two_configs(), (2,): two_configs()})
    edit(key_files(page)[0], key=None)  # read, this would be a skipped line
    tune_add()
    module_file(tmp_path)
    res = invoke("explain", f"{tmp_path / 'mykernels.py'}:add", ok=None)
    assert res.exit_code == 0 and "'key' must be a list" not in res.output, res.output


def test_merging_a_book_into_itself_rewrites_no_key_file(tmp_path: Path) -> None:
    # Every key file was replaced (a temp file, an fsync and a rename each): 42 s for two
    # 10,000-key books, most of them unchanged. A file that already holds its text stays.
    page = book_of(tmp_path / "book", {(n,): two_configs() for n in range(1, 6)})
    before = {p.name: os.stat(p).st_ino for p in key_files(page)}
    invoke("merge", tmp_path / "book", "-o", tmp_path / "book")
    assert {p.name: os.stat(p).st_ino for p in key_files(page)} == before
    book_of(tmp_path / "news", {(1,): two_configs(0.5)})  # one key changes: its file alone
    invoke("merge", tmp_path / "news", "-o", tmp_path / "book")
    after = {p.name: os.stat(p).st_ino for p in key_files(page)}
    assert [name for name in after if after[name] != before[name]] == [key_files(page)[0].name]
