"""The shared fleet book wired into the autotuner, on a REAL redis-server.

Hosts are played by processes with their own TUNEBOOK_DIR and one TUNEBOOK_REDIS_URL;
kernels are real (tests/small_kernels.py) and run in the CPU interpreter, with a replaying
``do_bench`` so that a tuning costs milliseconds and its winner is known in advance.
The ``server`` fixture comes from tests/redis_fixture.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import tunebook
from conftest import book_files, only_entry, run_python
from helpers_reliability import RedisServer
from redis_fixture import PATIENT, Clock, redis_server  # noqa: F401  (the `server` fixture)
from redis_fixture import tunebook_warnings as _warnings
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import (
    Book,
    BookWarning,
    Document,
    Entry,
    KernelIdentity,
    Result,
    read_document,
    redis_store,
)
from tunebook._book.redis_store import RedisStore

# The fleet book in Redis: JSON in a Redis server, reached by the autotuner through the
# same Page as a directory book (test_persistence.py, test_book_files.py: every Triton).
# Last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once

TABLE = {16: 0.3, 32: 0.2, 64: 0.25, 128: 0.4, 256: 0.5, 512: 0.6}
WINNER = 32  # the fastest block in TABLE

CHILD = """
import json, os
import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import redis_store
from tunebook._book.redis_store import RedisStore

if os.environ.get("PATIENT_REDIS") == "1":
    # Several interpreters on a small CPU can keep a local Redis from answering within
    # the default 50 ms; this test is about merging, not about timeouts.
    url = os.environ["TUNEBOOK_REDIS_URL"]
    redis_store._shared_stores[(os.getpid(), url)] = RedisStore(url, connect_timeout=5.0, read_timeout=5.0)

table = {int(k): v for k, v in json.loads(os.environ["TABLE"]).items()}
replay = Replay(table)
blocks = json.loads(os.environ["BLOCKS"])
tuner = tunebook.autotune(block_configs(*blocks), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
    add_kernel
)
right = True
for n in json.loads(os.environ["NS"]):
    x, y, out = vectors(n, seed=n)
    tuner[grid_1d(n)](x, y, out, n)
    right = right and bool((out == x + y).all())
print(json.dumps({**tunebook.stats(), "right": right, "measured": replay.measured,
                  "best": tuner.best_config.kwargs["BLOCK"], "file": tuner.page().file_name}))
"""


def _host(book: Path, url: str, ns: list[int], blocks: list[int] | None = None, **env: str) -> dict:
    """One process with its own local book, tuning or serving the keys ``ns``."""
    return run_python(
        CHILD,
        env={
            "TUNEBOOK_DIR": str(book),
            "TUNEBOOK_REDIS_URL": url,
            "TABLE": json.dumps(TABLE),
            "BLOCKS": json.dumps(blocks or [16, 32, 64]),
            "NS": json.dumps(ns),
            "PATIENT_REDIS": "1",
            **env,
        },
    )


def _stored_keys(url: str, file_name: str) -> dict[int, set[int]]:
    """Key n -> the blocks measured for it, as the Redis book holds them."""
    doc = RedisStore(url, connect_timeout=2.0, read_timeout=2.0).fetch(file_name)
    assert doc is not None, f"nothing stored in Redis for {file_name}"
    return {e.key[0]: {r.config["kwargs"]["BLOCK"] for r in e.results.values()} for e in doc.entries.values()}


def _local_keys(directory: Path) -> set[int]:
    keys: set[int] = set()
    for path in book_files(directory):
        doc = read_document(path)
        assert doc is not None, f"{path} does not parse"
        keys |= {e.key[0] for e in doc.entries.values() if e.results}
    return keys


# --------------------------------------------------------------------------- across hosts


@pytest.mark.slow
def test_a_key_tuned_on_one_host_is_served_by_another(server: RedisServer, tmp_path: Path) -> None:
    first = _host(tmp_path / "host-a", server.url, [500])
    assert first["right"] and sorted(first["measured"]) == [16, 32, 64] and first["best"] == WINNER
    assert _stored_keys(server.url, first["file"]) == {500: {16, 32, 64}}

    second = _host(tmp_path / "host-b", server.url, [500])
    assert second["right"] and second["best"] == WINNER
    assert second["measured"] == [] and second["benchmarked"] == 0 and second["book_hits"] == 1
    # Cached locally: host b now serves the key without Redis.
    assert _local_keys(tmp_path / "host-b") == {500}
    third = _host(tmp_path / "host-b", "redis://127.0.0.1:1/0", [500])  # nothing listens on port 1
    assert third["benchmarked"] == 0 and third["best"] == WINNER


@pytest.mark.slow
def test_a_host_measures_only_the_configs_the_fleet_lacks(server: RedisServer, tmp_path: Path) -> None:
    _host(tmp_path / "host-a", server.url, [500], blocks=[16, 32, 64])
    grown = _host(tmp_path / "host-b", server.url, [500], blocks=[16, 32, 64, 128])
    assert grown["measured"] == [128] and grown["best"] == WINNER
    assert _stored_keys(server.url, grown["file"]) == {500: {16, 32, 64, 128}}


@pytest.mark.slow
def test_writes_from_many_hosts_all_reach_redis(server: RedisServer, tmp_path: Path) -> None:
    hosts = 4
    shared_blocks = {i: [16, 32, 2 ** (i + 6)] for i in range(hosts)}  # 64, 128, 256, 512

    def one(i: int) -> dict:
        # Every host tunes one key all of them tune, with its own config list, and 2 of its own.
        ns = [1000, 100 + i, 200 + i]
        return _host(tmp_path / f"host-{i}", server.url, ns, shared_blocks[i])

    with ThreadPoolExecutor(hosts) as pool:
        reports = list(pool.map(one, range(hosts)))
    assert all(r["right"] for r in reports)
    stored = _stored_keys(server.url, reports[0]["file"])
    own = {100 + i for i in range(hosts)} | {200 + i for i in range(hosts)}
    assert set(stored) == {1000} | own
    assert stored[1000] == {16, 32, 64, 128, 256, 512}  # the union of every host's configs
    for i in range(hosts):
        assert stored[100 + i] == stored[200 + i] == set(shared_blocks[i])
        assert {1000, 100 + i, 200 + i} <= _local_keys(tmp_path / f"host-{i}")


@pytest.mark.slow
def test_a_miss_fetches_what_another_host_tuned_meanwhile(
    server: RedisServer, fleet: tuple[RedisStore, Clock], tmp_path: Path, book_dir: Path
) -> None:
    tuner, replay = _tuner()
    _call(tuner, 100)  # this page is open now; key 500 is tuned elsewhere afterwards
    other = _host(tmp_path / "host-b", server.url, [500])
    assert sorted(other["measured"]) == [16, 32, 64]
    replay.measured.clear()
    _call(tuner, 500)
    assert replay.measured == [] and tuner.best_config.kwargs["BLOCK"] == WINNER
    assert _local_keys(book_dir) == {100, 500}


# --------------------------------------------------------------------------- outages


class Spy:
    """Counts the calls a RedisStore gets, so a test can tell which paths reach it."""

    def __init__(self, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("fetch", "merge"):
            real = getattr(store, name)

            def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                self.calls.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(store, name, counted)


@pytest.fixture
def fleet(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RedisStore, Clock]]:
    """TUNEBOOK_REDIS_URL set, and this process's store for it on a hand-moved clock."""
    clock = Clock()
    store = RedisStore(server.url, retry_after_s=5.0, clock=clock, **PATIENT)
    monkeypatch.setenv("TUNEBOOK_REDIS_URL", server.url)
    monkeypatch.setitem(redis_store._shared_stores, (os.getpid(), server.url), store)
    yield store, clock


def _tuner(blocks: tuple[int, ...] = (16, 32, 64)) -> tuple[Any, Replay]:
    replay = Replay(TABLE)
    tuner = tunebook.autotune(block_configs(*blocks), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
        add_kernel
    )
    return tuner, replay


def _call(tuner: Any, n: int) -> None:
    x, y, out = vectors(n, seed=n)
    tuner[grid_1d(n)](x, y, out, n)
    assert bool((out == x + y).all()), "the kernel call returned a wrong answer"


def test_redis_going_down_and_coming_back(
    server: RedisServer,
    fleet: tuple[RedisStore, Clock],
    book_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, clock = fleet
    caplog.set_level(logging.INFO, logger="tunebook")
    tuner, replay = _tuner()
    _call(tuner, 100)
    file_name = tuner.page().file_name
    assert _stored_keys(server.url, file_name) == {100: {16, 32, 64}}
    spy = Spy(store, monkeypatch)

    for _ in range(3):  # hits, Redis up
        _call(tuner, 100)
    assert spy.calls == []

    server.stop()
    for _ in range(3):  # hits, Redis down
        _call(tuner, 100)
    assert spy.calls == []

    replay.measured.clear()
    _call(tuner, 200)  # a miss: Redis fails (one warning), tuning goes on locally
    _call(tuner, 300)  # the breaker is open: no network
    assert sorted(replay.measured) == [16, 16, 32, 32, 64, 64]
    assert _local_keys(book_dir) == {100, 200, 300}
    assert not store.available
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    for n in (100, 200, 300):
        _call(tuner, n)

    server.start()  # an empty Redis (no persistence): as after a failover to a fresh replica
    clock.now += 5.1
    spy.calls.clear()
    _call(tuner, 400)  # the next miss fetches, sends what was kept back, then records its own
    assert spy.calls and store.available
    assert _stored_keys(server.url, file_name) == {n: {16, 32, 64} for n in (200, 300, 400)}
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert len(_warnings(caplog)) == 1


def test_hits_from_the_book_with_redis_down(server: RedisServer, fleet: tuple[RedisStore, Clock]) -> None:
    first, _ = _tuner()
    _call(first, 100)
    server.stop()
    # A new autotuner (as in a restarted worker) opens its page while Redis is down, and
    # serves the key from the local book alone.
    second, replay = _tuner()
    _call(second, 100)
    assert replay.measured == [] and tunebook.stats()["book_hits"] == 1


# --------------------------------------------------------------------------- local layer missing


def test_an_unusable_local_directory_still_shares_through_redis(
    fleet: tuple[RedisStore, Clock],
    server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recwarn: pytest.WarningsRecorder,
) -> None:
    tuner, _ = _tuner()
    _call(tuner, 100)  # tuned into a good local book and into Redis
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TUNEBOOK_DIR", str(blocker / "book"))  # cannot be created: its parent is a file

    served, replay = _tuner()
    _call(served, 100)
    assert replay.measured == []  # from Redis, kept in memory
    _call(served, 200)
    assert sorted(replay.measured) == [16, 32, 64]
    assert _stored_keys(server.url, served.page().file_name) == {100: {16, 32, 64}, 200: {16, 32, 64}}
    assert len([w for w in recwarn if issubclass(w.category, BookWarning)]) == 1

    again, replay = _tuner()
    for n in (100, 200):
        _call(again, n)
    assert replay.measured == []


def _entry(n: int, blocks: dict[int, float]) -> tuple[str, Entry]:
    from tunebook._book import config_id, config_record

    results = {}
    for block, ms in blocks.items():
        record = config_record({"BLOCK": block}, {"num_warps": 4})
        results[config_id(record)] = Result(record, (ms, ms, ms), None, "2026-11-21T05:00:00Z")
    return json.dumps([n]), Entry((n,), results, 1.0, "2026-11-21T05:00:00Z", "2026-11-21T05:00:00Z")


def test_a_page_with_no_writable_directory(server: RedisServer) -> None:
    kernel = KernelIdentity("k", "hash-1", ("n",))
    store = RedisStore(server.url, **PATIENT)
    one = Book(None, shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1")
    key, entry = _entry(64, {16: 1.0})
    assert one.record(key, entry).results == entry.results
    two = Book(None, shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1")
    stored = two.get(key)
    assert stored is not None and stored.results == entry.results


def test_the_local_book_stands_over_redis_and_redis_over_shipped_books(
    server: RedisServer, tmp_path: Path
) -> None:
    kernel = KernelIdentity("k", "hash-1", ("n",))
    store = RedisStore(server.url, **PATIENT)
    local, shipped = tmp_path / "local", tmp_path / "shipped"
    key, _ = _entry(64, {})
    for where, ms in ((local, 1.0), (shipped, 3.0)):
        Book(where).open(kernel, {"backend": "cpu"}, "cpu", "p1").record(key, _entry(64, {16: ms, 32: ms})[1])
    Book(None, shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1").record(
        key, _entry(64, {16: 2.0, 32: 2.0, 64: 2.0})[1]
    )
    page = Book(local, [shipped], shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1")
    entry = page.get(key)
    assert entry is not None
    assert sorted(r.median for r in entry.results.values()) == [1.0, 1.0, 2.0]
    # What the page fetched is now in the local file; what was there stood.
    (path,) = book_files(local)
    doc = read_document(path)
    assert doc is not None and sorted(r.median for r in doc.entries[key].results.values()) == [1.0, 1.0, 2.0]


def test_a_stored_book_of_another_kernel_version_is_ignored(
    server: RedisServer, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    store = RedisStore(server.url, **PATIENT)
    kernel = KernelIdentity("k", "hash-1", ("n",))
    page = Book(tmp_path / "a", shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1")
    key, entry = _entry(64, {16: 1.0})
    foreign = Document({"name": "k", "hash": "hash-2", "key": ["n"]}, {"backend": "cpu"}, {key: entry})
    assert store.merge(page.file_name, foreign) is not None
    reopened = Book(tmp_path / "a", shared=store).open(kernel, {"backend": "cpu"}, "cpu", "p1")
    assert reopened.get(key) is None and book_files(tmp_path / "a") == []
    assert len([w for w in recwarn if issubclass(w.category, BookWarning)]) == 1


def test_without_redis_py_the_book_warns_once_and_carries_on(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    url = "redis://127.0.0.1:1/0"
    monkeypatch.setenv("TUNEBOOK_REDIS_URL", url)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(redis_store._shared_stores, (os.getpid(), url), raising=False)
    try:
        assert Book.from_env().shared is None
        assert Book.from_env().shared is None
        (warning,) = [w for w in recwarn if issubclass(w.category, BookWarning)]
        message = str(warning.message)
        assert message.startswith(
            "tunebook: TUNEBOOK_REDIS_URL is set but the shared book cannot be used; carrying on with "
            "the local book only. "
        ), message
        assert message.splitlines()[-1].strip() == "pip install 'tunebook[redis]'", message  # copied whole
        tuner, replay = _tuner()
        _call(tuner, 100)
        assert sorted(replay.measured) == [16, 32, 64]
    finally:
        redis_store._shared_stores.pop((os.getpid(), url), None)


def test_no_url_no_shared_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEBOOK_REDIS_URL", raising=False)
    assert Book.from_env().shared is None


def test_only_declared_configs_are_copied_from_the_fleet_into_the_local_book(
    server: RedisServer, fleet: tuple[RedisStore, Clock], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with a longer config list put BLOCK=128 into the fleet's key; a host that does
    not declare it serves the key from Redis and keeps only its own configs' results locally
    (issue 10 item 11)."""
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "wide-host"))
    _call(_tuner((16, 32, 64, 128))[0], 300)
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path / "narrow-host"))
    tuner, replay = _tuner()
    _call(tuner, 300)
    assert replay.measured == []  # served from the fleet's book
    entry = only_entry(tmp_path / "narrow-host")
    assert sorted(r.config["kwargs"]["BLOCK"] for r in entry.results.values()) == [16, 32, 64]


# --------------------------------------------------------------------------- tunebook push


def _push(*args: object, ok: bool = True) -> Any:
    """``tunebook push ARGS`` in a new process (the command line as a person runs it)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "tunebook", "push", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "TUNEBOOK_REDIS_URL": ""},
        timeout=120,
    )
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_keys_tuned_while_redis_was_down_reach_the_fleet_through_push(
    server: RedisServer, tmp_path: Path
) -> None:
    # Host a tunes with its Redis down (nothing listens on port 1): its keys stay in its local
    # book, and before `push` no other host could have them.
    alone = _host(tmp_path / "host-a", "redis://127.0.0.1:1/0", [500, 700])
    assert alone["measured"] and alone["best"] == WINNER
    shown = _push(tmp_path / "host-a", "--redis", server.url)
    assert "2 keys, 2 new to the fleet" in shown.stdout, shown.stdout
    assert _stored_keys(server.url, alone["file"]) == {500: {16, 32, 64}, 700: {16, 32, 64}}
    served = _host(tmp_path / "host-b", server.url, [500, 700])
    assert served["right"] and served["best"] == WINNER
    assert served["measured"] == [] and served["benchmarked"] == 0
    again = _push(tmp_path / "host-a", "--redis", server.url)  # idempotent: nothing new the second time
    assert "2 keys, 0 new to the fleet" in again.stdout, again.stdout


def test_a_push_never_replaces_what_the_fleet_holds_and_counts_misses_once(
    server: RedisServer, tmp_path: Path
) -> None:
    # The fleet measured BLOCK=16 at 1 ms for key 64; a host's book says 5 ms for it and adds
    # BLOCK=32 and key 128. The fleet's result stands, as any host's write would leave it.
    # A recorded miss (key 256, 3 serving processes) pushed twice is counted once: Redis adds
    # up what it is sent, and each push sent the whole count again (3, 6, 9).
    from dataclasses import replace as changed

    from store_contract import doc as page_doc
    from tunebook.cli._common import write_document
    from tunebook.cli._load import canonical_file_name

    fleet = RedisStore(server.url, **PATIENT)
    name = canonical_file_name(page_doc(64, {16: 1.0}))
    assert fleet.merge(name, page_doc(64, {16: 1.0})) is not None
    book = tmp_path / "book"
    missed = page_doc(256, {})
    missed = changed(missed, entries={k: changed(e, misses=3) for k, e in missed.entries.items()})
    local = page_doc(64, {16: 5.0, 32: 2.0}).merged_over(page_doc(128, {16: 3.0})).merged_over(missed)
    write_document(book / name, local)
    _push(book, "--redis", server.url)
    again = _push(book, "--redis", server.url)
    assert "3 keys, 0 new to the fleet" in again.stdout, again.stdout
    stored = fleet.fetch(name)
    assert stored is not None
    (miss,) = [e for e in stored.entries.values() if e.key[0] == 256]
    assert miss.misses == 3 and not miss.results
    timings = {
        e.key[0]: {r.config["kwargs"]["BLOCK"]: r.median for r in e.results.values()}
        for e in stored.entries.values()
    }
    assert timings == {64: {16: 1.0, 32: 2.0}, 128: {16: 3.0}, 256: {}}


def test_a_page_of_many_keys_is_sent_in_parts(server: RedisServer, tmp_path: Path) -> None:
    from store_contract import doc as page_doc
    from tunebook.cli._common import write_document
    from tunebook.cli._load import canonical_file_name
    from tunebook.cli.push import _KEYS_A_REQUEST

    keys = range(1, 2 * _KEYS_A_REQUEST + 10)
    whole = page_doc(keys[0], {16: 1.0})
    for n in keys[1:]:
        whole = whole.merged_over(page_doc(n, {16: float(n)}))
    name = canonical_file_name(whole)
    write_document(tmp_path / "book" / name, whole)
    shown = _push(tmp_path / "book", "--redis", server.url)
    assert f"{len(keys)} keys, {len(keys)} new to the fleet" in shown.stdout
    stored = RedisStore(server.url, **PATIENT).fetch(name)
    assert stored is not None and stored.dumps() == whole.dumps()


def test_push_says_what_is_wrong_and_sends_nothing_on_a_dry_run(server: RedisServer, tmp_path: Path) -> None:
    from store_contract import doc as page_doc
    from tunebook.cli._common import write_document
    from tunebook.cli._load import canonical_file_name

    name = canonical_file_name(page_doc(64, {16: 1.0}))
    write_document(tmp_path / "book" / name, page_doc(64, {16: 1.0}))
    no_url = _push(tmp_path / "book", ok=False)
    assert no_url.returncode == 2 and "TUNEBOOK_REDIS_URL" in no_url.stderr
    down = _push(tmp_path / "book", "--redis", "redis://127.0.0.1:1/0", ok=False)
    assert down.returncode == 1 and "unreachable" in down.stderr and "again" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr
    malformed = _push(tmp_path / "book", "--redis", "redis://host:6379/abc", ok=False)
    assert "not a number" in malformed.stderr and "Traceback" not in malformed.stderr
    no_url = _push(tmp_path / "book", "--redis", "notaurl", ok=False)
    (line,) = no_url.stderr.strip().splitlines()  # one line, not the store's warning twice first
    assert line.startswith("Error: cannot use the Redis book at notaurl") and "redis://book-host" in line
    dry = _push(tmp_path / "book", "--redis", server.url, "--dry-run")
    assert f"would send {name} (1 keys)" in dry.stdout
    assert RedisStore(server.url, **PATIENT).fetch(name) is None
