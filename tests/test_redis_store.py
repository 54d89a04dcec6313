"""The shared fleet book on a REAL redis-server: merges, fall-back, recovery, concurrency.

The ``server`` fixture (tests/redis_fixture.py) starts ``redis-server`` on a free port of
127.0.0.1 without persistence. When redis-server or redis-py is missing the tests FAIL with
the fix, unless TUNEBOOK_SKIP_REDIS=1 says to skip them (CI installs both: see
docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import TESTS
from helpers_reliability import RedisServer
from redis_fixture import PATIENT, Clock, redis_server  # noqa: F401  (the `server` fixture)
from redis_fixture import tunebook_warnings as _warnings
from tunebook._book import Document, Entry, Result, config_id, config_record
from tunebook._book.redis_store import INSTALL_HINT, KEY_PREFIX, RedisStore

FILE = "add_kernel--0123456789abcdef--cpu--fedcba9876543210.json"


def _doc(
    key: int, timings: dict[int, float], seconds: float = 1.0, stamp: str = "2026-11-21T05:00:00Z"
) -> Document:
    results = {}
    for block, ms in timings.items():
        record = config_record({"BLOCK": block}, {"num_warps": 4})
        results[config_id(record)] = Result(record, (ms, ms, ms), None, stamp)
    entry = Entry((key, "torch.float32"), results, seconds, stamp, stamp, "0.1.0")
    return Document(
        {"name": "add_kernel", "hash": "abc", "key": ["n"]},
        {"backend": "cpu", "id": "p"},
        {json.dumps([key, "torch.float32"]): entry},
    )


# --------------------------------------------------------------------------- the extra


def test_import_is_lazy_and_a_missing_extra_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, tunebook._book.redis_store; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError) as err:
        RedisStore("redis://127.0.0.1:1/0")
    assert INSTALL_HINT in str(err.value).splitlines()[-1]


def test_a_malformed_url_leaves_the_store_off(caplog: pytest.LogCaptureFixture) -> None:
    import redis  # noqa: F401 - tunebook[redis], part of tunebook[test]: missing is a failure

    caplog.set_level(logging.WARNING, logger="tunebook")
    store = RedisStore("nonsense://where")
    assert store.fetch(FILE) is None
    assert store.merge(FILE, _doc(64, {16: 1.0})) is None
    assert len(_warnings(caplog)) == 1


# --------------------------------------------------------------------------- merging


def test_merge_then_fetch(server: RedisServer) -> None:
    store = RedisStore(server.url, **PATIENT)
    assert store.fetch(FILE) is None
    doc = _doc(64, {16: 1.0, 32: 0.5})
    merged = store.merge(FILE, doc)
    assert merged is not None and merged.dumps() == doc.dumps()
    fetched = store.fetch(FILE)
    assert fetched is not None and fetched.dumps() == doc.dumps()


def test_what_is_stored_stands_as_in_a_book_file(server: RedisServer) -> None:
    store = RedisStore(server.url, **PATIENT)
    first = _doc(64, {16: 1.0}, seconds=2.0, stamp="2026-11-21T05:00:00Z")
    later = _doc(64, {16: 9.0, 32: 0.5}, seconds=3.0, stamp="2026-11-22T05:00:00Z")
    other_key = _doc(128, {16: 0.7})
    store.merge(FILE, first)
    store.merge(FILE, later)
    store.merge(FILE, other_key)
    expected = other_key.merged_over(later.merged_over(first))  # the rule files.merge_write follows
    fetched = store.fetch(FILE)
    assert fetched is not None and fetched.dumps() == expected.dumps()
    (entry,) = [e for e in fetched.entries.values() if e.key[0] == 64]
    assert entry.best() is not None and entry.results[entry.best()].median == 0.5
    assert [r.median for r in entry.results.values() if r.config["kwargs"]["BLOCK"] == 16] == [1.0]


def test_an_unreadable_stored_book_is_skipped_then_kept_aside(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    caplog.set_level(logging.WARNING, logger="tunebook")
    raw = redis.Redis.from_url(server.url)
    raw.hset(KEY_PREFIX + FILE, mapping={"meta": "{not json", "[64]": "[]"})
    store = RedisStore(server.url, **PATIENT)
    assert store.fetch(FILE) is None
    doc = _doc(64, {16: 1.0})
    merged = store.merge(FILE, doc)
    assert merged is not None and merged.dumps() == doc.dumps()
    fetched = store.fetch(FILE)
    assert fetched is not None and fetched.dumps() == doc.dumps()
    assert len(raw.keys(KEY_PREFIX + FILE + ":corrupt-*")) == 1
    assert len(_warnings(caplog)) == 1


def test_a_key_of_another_type_fails_the_call_not_the_store(server: RedisServer) -> None:
    import redis

    redis.Redis.from_url(server.url).set(KEY_PREFIX + FILE, "a string, not a hash")
    store = RedisStore(server.url, **PATIENT)
    assert store.fetch(FILE) is None
    assert store.available  # the server answered: no outage, no breaker


# --------------------------------------------------------------------------- outages


def _store_with_one_entry(server: RedisServer, caplog: pytest.LogCaptureFixture) -> tuple[RedisStore, Clock]:
    """A store on a hand-moved clock, its book holding key 64, logs captured from INFO up."""
    caplog.set_level(logging.INFO, logger="tunebook")
    clock = Clock()
    store = RedisStore(server.url, retry_after_s=5.0, clock=clock, **PATIENT)
    assert store.merge(FILE, _doc(64, {16: 1.0})) is not None
    return store, clock


def test_falls_back_while_redis_is_down_and_resumes_after_it_returns(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = _store_with_one_entry(server, caplog)
    doc = _doc(64, {16: 1.0})

    server.stop()
    assert store.fetch(FILE) is None  # connection refused: no exception
    assert store.merge(FILE, doc) is None
    assert store.fetch(FILE) is None
    assert not store.available
    assert len(_warnings(caplog)) == 1, _warnings(caplog)

    server.start()  # empty: no persistence
    assert RedisStore(server.url, **PATIENT).merge(FILE, doc) is not None  # another process writes meanwhile
    clock.now += 4.9
    assert store.fetch(FILE) is None  # the breaker is still open: the network is not touched

    clock.now += 0.2
    fetched = store.fetch(FILE)
    assert fetched is not None and fetched.dumps() == doc.dumps()
    assert store.merge(FILE, _doc(128, {16: 1.0})) is not None
    assert len(_warnings(caplog)) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_a_hung_server_times_out_instead_of_stalling(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = _store_with_one_entry(server, caplog)
    server.freeze()
    try:
        assert store.fetch(FILE) is None  # read timeout
        assert store.merge(FILE, _doc(96, {16: 1.0})) is None  # breaker open
    finally:
        server.thaw()
    clock.now += 5.0
    fetched = store.fetch(FILE)
    assert fetched is not None and len(fetched.entries) == 1
    assert len(_warnings(caplog)) == 1


# --------------------------------------------------------------------------- concurrency

CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_redis_store import _doc, FILE
from tunebook._book.redis_store import RedisStore

me, merges, url = {me}, {merges}, {url!r}
store = RedisStore(url, read_timeout=2.0, connect_timeout=2.0)
print("ready", flush=True)
sys.stdin.readline()
shared = []
for i in range(merges):
    doc = _doc(10_000 * (me + 1) + i, {{16: 1.0 + me}})          # a key only this process tunes
    doc = _doc(64, {{16: float(me + 1), 2 ** (me + 6): 0.5}}).merged_over(doc)  # one all tune
    merged = store.merge(FILE, doc)
    assert merged is not None
    (entry,) = [e for e in merged.entries.values() if e.key[0] == 64]
    shared.append([r.median for r in entry.results.values() if r.config["kwargs"]["BLOCK"] == 16][0])
print(json.dumps({{"shared": sorted(set(shared)), "conflicts": store.conflicts}}))
"""


def test_concurrent_merges_from_processes_lose_nothing(server: RedisServer) -> None:
    processes, merges = 4, 40
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD.format(tests=str(TESTS), me=me, merges=merges, url=server.url)],
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
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    fetched = RedisStore(server.url, **PATIENT).fetch(FILE)
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
    print(
        f"\nREDIS concurrent merges: {processes} processes x {merges}, "
        f"{sum(r['conflicts'] for r in reports)} optimistic retries, 0 lost"
    )
