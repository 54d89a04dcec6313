"""Books for the report's tests: pages with every kind of key a section shows (failed
configs, a first config that failed or is not recorded, recorded misses, keys whose names
are hashed), written in format 1 or format 2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from test_cli import entry, result, write_doc
from tunebook._book import Document, Entry, config_id
from tunebook._jsonio import key_text
from tunebook.cli._common import write_document
from tunebook.cli._load import canonical_file_name

PLATFORM = {"backend": "cuda", "device": "NVIDIA H200", "arch": "90", "triton": "3.6.0", "timer": "events"}
BLOCKS = (32, 64, 128, 256)


def varied_entry(i: int) -> Entry:
    """Key ``i`` of a varied page; which kinds of key appear depends on ``i`` only."""
    key = [16 * (i + 1), "torch.float16"] if i % 17 != 3 else [i, "x" * 240]  # hashed file name
    if i % 13 == 7:
        return replace(entry(key, []), misses=3)  # a recorded miss
    results = [
        result({"BLOCK": b}, None, "OutOfResources: smem")
        if (i + b) % 7 == 0
        else result({"BLOCK": b}, (1 + (i * 3 + b) % 10 / 4) * (i + 1) / 100)
        for b in BLOCKS
    ]
    first = "" if i % 5 == 1 else config_id(results[0].config)  # not recorded for some keys
    return replace(entry(key, results), first=first)


def varied_doc(keys: int, name: str = "varied") -> Document:
    entries = {key_text(list(e.key)): e for e in map(varied_entry, range(keys))}
    kernel = {"name": name, "hash": (name.encode().hex() * 32)[:64], "key": ["n"]}
    return Document(kernel, PLATFORM, entries)


def write_book(directory: Path, docs: list[Document], fmt: int) -> None:
    """``docs`` as a book directory of format ``fmt`` (1: a file per page, 2: a directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        if fmt == 1:
            write_doc(directory, doc)
        else:
            write_document(directory / canonical_file_name(doc), doc)
