"""The book-store contract (``tunebook._book.BookStore``), run against every store.

Each test runs on the directory store and on the Redis store against a real redis-server
(tests/redis_fixture.py); read-only directories are the directory store with
``writable=False``. See store_contract.py for how each kind is made, broken and planted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TESTS
from helpers_reliability import RedisServer
from redis_fixture import redis_server  # noqa: F401  (the `server` fixture)
from store_contract import FILE, StoreKind, directory_kind, doc, redis_kind, snapshot
from tunebook._book import BookStore, DirectoryStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["directory", "redis"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreKind]:
    if request.param == "directory":
        yield directory_kind(tmp_path)
    else:
        server: RedisServer = request.getfixturevalue("server")
        yield redis_kind(server.url, f"redis://127.0.0.1:{_free_port()}/0")


def test_every_store_is_a_book_store(kind: StoreKind) -> None:
    assert isinstance(kind.make(), BookStore)


def test_fetch_of_a_document_never_stored_is_none(kind: StoreKind) -> None:
    assert kind.make().fetch(FILE) is None


def test_merge_answers_with_what_is_stored_and_fetch_returns_it(kind: StoreKind) -> None:
    store = kind.make()
    news = doc(64, {16: 1.0, 32: 0.5})
    merged = store.merge(FILE, news)
    assert merged is not None and merged.dumps() == news.dumps()
    again = kind.make().fetch(FILE)  # a second store of the same place: another process's view
    assert again is not None and again.dumps() == news.dumps()


def test_what_is_stored_stands_per_key_and_config(kind: StoreKind) -> None:
    store = kind.make()
    first = doc(64, {16: 1.0}, seconds=2.0, stamp="2026-11-21T05:00:00Z")
    later = doc(64, {16: 9.0, 32: 0.5}, seconds=3.0, stamp="2026-11-22T05:00:00Z")
    other_key = doc(128, {16: 0.7})
    for news in (first, later, other_key):
        assert store.merge(FILE, news) is not None
    expected = other_key.merged_over(later.merged_over(first))
    fetched = kind.make().fetch(FILE)
    assert fetched is not None and fetched.dumps() == expected.dumps()
    (entry,) = [e for e in fetched.entries.values() if e.key[0] == 64]
    assert sorted(r.median for r in entry.results.values()) == [0.5, 1.0]  # BLOCK=16 kept its 1.0


@pytest.mark.filterwarnings("ignore::tunebook.BookWarning")
@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b'{"format": "tunebook-book", "version": 1}'])
def test_an_unusable_stored_document_is_skipped_and_replaced_never_raised(
    kind: StoreKind, garbage: bytes
) -> None:
    kind.plant(garbage)
    store = kind.make()
    assert store.fetch(FILE) is None
    news = doc(64, {16: 1.0})
    merged = store.merge(FILE, news)
    assert merged is not None and merged.dumps() == news.dumps()


@pytest.mark.filterwarnings("ignore::tunebook.BookWarning")
def test_keys_stand_past_a_damaged_identity_record_for_a_caller_that_names_the_identity(
    kind: StoreKind,
) -> None:
    # page.json (a Redis hash's meta) goes bad while the keys are intact: a caller that says
    # which kernel and platform it asked for (the autotuner) reads the keys anyway, and the
    # next write rewrites the record without losing a key; a caller that does not, reads nothing.
    kept = doc(64, {16: 1.0})
    assert kind.make().merge(FILE, kept) is not None
    kind.plant(b"{not json")
    store = kind.make()
    assert store.fetch(FILE) is None
    identity = {"kernel": kept.kernel, "platform": kept.platform}
    fetched = store.fetch(FILE, list(kept.entries), expected=identity)
    assert fetched is not None and fetched.dumps() == kept.dumps()
    index = store.fetch(FILE, (), expected=identity)
    assert index is not None and index.index is not None and set(kept.entries) <= index.index
    news = doc(128, {16: 0.7})
    assert store.merge(FILE, news) is not None
    everything = kind.make().fetch(FILE, [*kept.entries, *news.entries])  # the record is readable again
    assert everything is not None and everything.dumps() == news.merged_over(kept).dumps()


@pytest.mark.filterwarnings("ignore::tunebook.BookWarning")
def test_a_store_that_cannot_write_returns_none_and_raises_nothing(kind: StoreKind) -> None:
    store = kind.broken()
    assert store.merge(FILE, doc(64, {16: 1.0})) is None
    assert store.fetch(FILE) is None


def test_a_read_only_directory_reads_what_is_there_and_writes_nothing(tmp_path: Path) -> None:
    news = doc(64, {16: 1.0})
    assert DirectoryStore(tmp_path).merge(FILE, news) is not None
    before = snapshot(tmp_path)
    shipped = DirectoryStore(tmp_path, writable=False)
    fetched = shipped.fetch(FILE)
    assert fetched is not None and fetched.dumps() == news.dumps()
    assert shipped.merge(FILE, doc(128, {16: 1.0})) is None
    assert snapshot(tmp_path) == before


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from store_contract import doc, FILE
{make}
me, merges = {me}, {merges}
print("ready", flush=True)
sys.stdin.readline()
shared = []
for i in range(merges):
    news = doc(10_000 * (me + 1) + i, {{16: 1.0 + me}})                      # a key only this process has
    news = doc(64, {{16: float(me + 1), 2 ** (me + 6): 0.5}}).merged_over(news)  # one every process has
    merged = store.merge(FILE, news)
    assert merged is not None
    (entry,) = [e for e in merged.entries.values() if e.key[0] == 64]
    shared.append([r.median for r in entry.results.values() if r.config["kwargs"]["BLOCK"] == 16][0])
print(json.dumps({{"shared": sorted(set(shared))}}))
"""


def test_concurrent_merges_from_processes_lose_nothing(kind: StoreKind) -> None:
    processes, merges = 4, 25
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    make = textwrap.dedent(kind.child.format(spec=kind.spec))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD.format(tests=str(TESTS), make=make, me=me, merges=merges)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me in range(processes)
    ]
    for child in children:  # everybody imported and connected: start together
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=180) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    fetched = kind.make().fetch(FILE)
    assert fetched is not None
    keys = {e.key[0] for e in fetched.entries.values()}
    assert keys == {64} | {10_000 * (me + 1) + i for me in range(processes) for i in range(merges)}
    (shared,) = [e for e in fetched.entries.values() if e.key[0] == 64]
    assert {r.config["kwargs"]["BLOCK"] for r in shared.results.values()} == {16} | {
        2 ** (me + 6) for me in range(processes)
    }
    # The first measurement of (key 64, BLOCK=16) stood: every process saw that one value only.
    first = next(r.median for r in shared.results.values() if r.config["kwargs"]["BLOCK"] == 16)
    assert all(report["shared"] == [first] for report in reports), reports
