"""Faults of the fleet book found by a review on REAL redis-server processes: what is no
outage must not turn the fleet book off, and what an outage held back must still arrive.

* a listing of a page of more than NAME_BUDGET large entries read their values too and ran
  past the reply's byte budget, which was filed as an outage;
* results tuned during a short outage reached Redis only at the process's next tuning miss
  (never, for a process that only served hits afterwards);
* writers of one page that kept colliding ran out of the single request's time and were
  logged as "unreachable";
* a Redis farther away than ~50 ms could not be used, and a timeout said "unreachable".

The ``server`` fixture comes from tests/redis_fixture.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import run_python
from helpers_reliability import RedisServer
from redis_fixture import PATIENT, Clock, redis_server  # noqa: F401  (the `server` fixture)
from redis_fixture import tunebook_warnings as _warnings
from store_contract import FILE
from store_contract import doc as _doc
from tunebook import _settings
from tunebook._book import redis_store
from tunebook._book.pages import NAME_BUDGET
from tunebook._book.redis_store import KEY_PREFIX, RedisStore
from tunebook._errors import BookWarning, ConfigurationError

# JSON in a Redis server and the store's own logic; the autotuner only in children of the
# CPU interpreter. Last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once


def _raw(server: RedisServer) -> Any:
    import redis

    return redis.Redis.from_url(server.url)


def _fill(server: RedisServer, keys: range, value: bytes) -> None:
    raw = _raw(server)
    pipe = raw.pipeline(transaction=False)
    for i in keys:
        pipe.hset(KEY_PREFIX + FILE, json.dumps([i, "torch.float32"]), value)
        if i % 500 == 0:
            pipe.execute()
    pipe.execute()


# --------------------------------------------------------------------------- 1. listings


def test_a_listing_of_a_page_of_large_entries_reads_names_only(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # 2,100 entries of 4 KB each (8 MB) under a 4 MiB reply budget: the nearest-key listing
    # asks for NAME_BUDGET names, and HSCAN without NOVALUES sent 2,048 values with them.
    caplog.set_level(logging.INFO, logger="tunebook")
    store = RedisStore(server.url, max_reply_bytes=4 << 20, **PATIENT)
    assert store.merge(FILE, _doc(1, {16: 1.0})) is not None
    big = json.dumps({"padding": "x" * 4096}).encode()
    _fill(server, range(1000, 3100), big)
    listed = store.fetch(FILE, (), max_names=NAME_BUDGET)
    assert listed is not None and listed.index is not None and len(listed.index) == NAME_BUDGET
    assert store.available, "a listing was filed as an outage"
    again = RedisStore(server.url, max_reply_bytes=4 << 20, **PATIENT).fetch(FILE, (), max_names=NAME_BUDGET)
    assert again is not None and again.index == listed.index  # every client samples the same names
    assert _warnings(caplog) == []


def test_a_reply_past_the_byte_budget_fails_that_request_not_the_store(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunebook")
    store = RedisStore(server.url, max_reply_bytes=1 << 20, **PATIENT)
    assert store.merge(FILE, _doc(64, {16: 1.0})) is not None
    huge = json.dumps([128, "torch.float32"])
    _raw(server).hset(KEY_PREFIX + FILE, huge, b"x" * (2 << 20))
    assert store.fetch(FILE) is None  # the whole page: one reply, past the budget
    assert store.available, "a large reply opened the breaker"
    fetched = store.fetch(FILE, [json.dumps([64, "torch.float32"])])  # the rest of the book is in use
    assert fetched is not None and len(fetched.entries) == 1
    messages = _warnings(caplog)
    assert len(messages) == 1 and "ran past" in messages[0] and "unreachable" not in messages[0]


# --------------------------------------------------------------------------- 2. held results


def test_a_merge_held_by_an_outage_is_sent_by_the_next_request_after_the_retry_interval(
    server: RedisServer,
) -> None:
    clock = Clock()
    store = RedisStore(server.url, retry_after_s=5.0, clock=clock, **PATIENT)
    server.stop()
    assert store.merge(FILE, _doc(64, {16: 1.0})) is None
    assert store.unsent(FILE) == {json.dumps([64, "torch.float32"])}
    server.start()
    clock.now += 5.1
    assert store.fetch(FILE, [json.dumps([32, "torch.float32"])]) is None  # another key: nothing there
    assert store.unsent() == frozenset()
    stored = RedisStore(server.url, **PATIENT).fetch(FILE)
    assert stored is not None and list(stored.entries) == [json.dumps([64, "torch.float32"])]


HOST = """
import json, os, sys, time
from pathlib import Path
import tunebook
from small_kernels import Replay, add_kernel, block_configs, grid_1d, vectors
from tunebook._book import redis_store
from tunebook._book.redis_store import RedisStore

url = os.environ["TUNEBOOK_REDIS_URL"]
redis_store._shared_stores[(os.getpid(), url)] = RedisStore(
    url, connect_timeout=2.0, read_timeout=2.0, retry_after_s=float(os.environ["RETRY_S"])
)
signals = Path(os.environ["SIGNALS"])
replay = Replay({16: 0.3, 32: 0.2, 64: 0.25})
tuner = tunebook.autotune(block_configs(16, 32, 64), key=["n"], do_bench=replay, pre_hook=replay.pre_hook)(
    add_kernel
)
x, y, out = vectors(100, seed=1)
tuner[grid_1d(100)](x, y, out, 100)  # Redis is down: tuned, held for the fleet
(signals / "tuned").write_text(tuner.page().file_name)
while not (signals / os.environ["UNTIL"]).exists():  # hits only: they never ask the book
    tuner[grid_1d(100)](x, y, out, 100)
    time.sleep(0.05)
print(json.dumps({"measured": len(replay.measured), "hits": tunebook.stats()["hits"]}))
"""


@pytest.fixture
def signals(tmp_path: Path) -> Path:
    path = tmp_path / "signals"
    path.mkdir()
    return path


def _host_tuning_in_an_outage(
    server: RedisServer, book: Path, signals: Path, retry_s: float, until: str
) -> tuple[Any, str]:
    """A host process that tunes key 100 while Redis is down, then serves hits only until the
    file ``until`` appears in ``signals``; (its future, the page's file name)."""
    server.stop()
    env = {
        "TUNEBOOK_DIR": str(book),
        "TUNEBOOK_REDIS_URL": server.url,
        "SIGNALS": str(signals),
        "RETRY_S": str(retry_s),
        "UNTIL": until,
    }
    future = ThreadPoolExecutor(1).submit(run_python, HOST, env=env, timeout=120)
    deadline = time.monotonic() + 90
    while not (signals / "tuned").exists():
        assert time.monotonic() < deadline and not future.done(), future.result() if future.done() else ""
        time.sleep(0.05)
    return future, (signals / "tuned").read_text()


def _fleet_keys(server: RedisServer, file_name: str) -> set[int]:
    doc = RedisStore(server.url, **PATIENT).fetch(file_name)
    return set() if doc is None else {e.key[0] for e in doc.entries.values() if e.results}


def test_a_host_that_only_serves_after_an_outage_sends_its_results_while_it_runs(
    server: RedisServer, tmp_path: Path, signals: Path
) -> None:
    future, file_name = _host_tuning_in_an_outage(
        server, tmp_path / "book", signals, retry_s=0.5, until="done"
    )
    try:
        server.start()
        deadline = time.monotonic() + 15
        while _fleet_keys(server, file_name) != {100}:
            assert time.monotonic() < deadline, "the result tuned during the outage never reached Redis"
            time.sleep(0.1)
    finally:
        (signals / "done").write_text("")
    out = future.result()
    assert out["measured"] == 3 and out["hits"] > 0
    assert "did not reach" not in out["_stderr"]


def test_a_host_that_exits_sends_what_it_holds_or_says_how_to(
    server: RedisServer, tmp_path: Path, signals: Path
) -> None:
    # The retry interval is longer than the test: only the exit sends.
    future, file_name = _host_tuning_in_an_outage(server, tmp_path / "a", signals, retry_s=600, until="done")
    server.start()
    (signals / "done").write_text("")
    out = future.result()
    assert _fleet_keys(server, file_name) == {100}
    assert "did not reach" not in out["_stderr"]

    # Redis down until the end: the exit tries once, briefly, and says what to run.
    (signals / "tuned").unlink()  # another host (its own local book), "done" at once
    future, file_name = _host_tuning_in_an_outage(server, tmp_path / "b", signals, retry_s=600, until="done")
    t0 = time.monotonic()
    out = future.result()
    assert time.monotonic() - t0 < 30
    assert "3 results tuned by this process did not reach the Redis book" in out["_stderr"]
    assert "tunebook push" in out["_stderr"]


# --------------------------------------------------------------------------- 3. contention


@pytest.fixture
def meddler(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Until the event is set, another writer changes the page between every merge's read
    and its write (each try meets a WatchError)."""
    stop = threading.Event()
    raw = _raw(server)
    real = RedisStore._fields

    def fields(self: RedisStore, client: Any, key: str, keys: Any, **how: Any) -> dict[bytes, bytes]:
        got = real(self, client, key, keys, **how)
        if not stop.is_set():
            raw.hset(key, "[999999]", json.dumps(str(time.monotonic())))
        return got

    monkeypatch.setattr(RedisStore, "_fields", fields)
    yield stop
    stop.set()


def test_contention_is_no_outage(
    server: RedisServer, meddler: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tunebook")
    store = RedisStore(server.url, connect_timeout=0.25, read_timeout=0.25, request_timeout=0.25)
    # Other writers for longer than one request's time budget: the merge outlasts them.
    threading.Timer(0.6, meddler.set).start()
    assert store.merge(FILE, _doc(64, {16: 1.0})) is not None
    assert store.available and store.conflicts > 0
    assert _warnings(caplog) == []


def test_endless_contention_holds_the_result_without_opening_the_breaker(
    server: RedisServer, meddler: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunebook")
    clock = Clock()
    store = RedisStore(server.url, clock=clock, retry_after_s=5.0, **PATIENT)
    t0 = time.monotonic()
    assert store.merge(FILE, _doc(64, {16: 1.0})) is None
    assert time.monotonic() - t0 < redis_store._CONFLICT_S + 1.0
    assert store.available, "contention opened the breaker"
    assert store.unsent(FILE) == {json.dumps([64, "torch.float32"])}
    assert not any("unreachable" in m or "answer" in m for m in _warnings(caplog))
    meddler.set()
    clock.now += 5.1
    assert store.fetch(FILE, ["[1]"]) is None  # a later request sends what was held
    fetched = store.fetch(FILE, [json.dumps([64, "torch.float32"])])
    assert fetched is not None and len(fetched.entries) == 1 and store.unsent() == frozenset()


# --------------------------------------------------------------------------- 4. timeouts


class _DelayProxy:
    """A TCP proxy to ``port`` that delays every chunk by ``delay_s``: a distant server."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def pump(reader: Any, writer: Any) -> None:
            try:
                while data := await reader.read(65536):
                    await asyncio.sleep(delay_s)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone with the test
                    writer.close()

        async def handle(client_r: Any, client_w: Any) -> None:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):  # close() ends serve_forever so
                await self.server.serve_forever()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


def test_a_distant_redis_is_usable_with_a_longer_timeout_and_a_timeout_says_so(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunebook")
    proxy = _DelayProxy(server.port, 0.08)  # 160 ms a round trip
    url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        monkeypatch.setattr(redis_store, "_shared_stores", {})
        near = redis_store.shared_store(url)  # the default: 0.25 s a request, 50 ms to connect
        assert near is not None and near.merge(FILE, _doc(64, {16: 1.0})) is None
        messages = _warnings(caplog)
        assert len(messages) == 1 and "did not answer within 0.25 s (TUNEBOOK_REDIS_TIMEOUT_S)" in messages[0]

        monkeypatch.setattr(redis_store, "_shared_stores", {})
        monkeypatch.setenv("TUNEBOOK_REDIS_TIMEOUT_S", "3")
        far = redis_store.shared_store(url)
        assert far is not None and far.request_timeout == 3.0
        assert far.merge(FILE, _doc(64, {16: 1.0})) is not None
        fetched = far.fetch(FILE)
        assert fetched is not None and len(fetched.entries) == 1
        near.outbox.clear()  # held for a server this test made up: not for the exit to send
    finally:
        proxy.close()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_bad_timeout_setting_is_an_error_that_names_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TUNEBOOK_REDIS_TIMEOUT_S", value)
    with pytest.raises(ConfigurationError, match="TUNEBOOK_REDIS_TIMEOUT_S"):
        _settings.redis_timeout_s()
    monkeypatch.setenv("TUNEBOOK_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="TUNEBOOK_REDIS_TIMEOUT_S"):
        _settings.check()
    monkeypatch.delenv("TUNEBOOK_REDIS_TIMEOUT_S")
    assert _settings.redis_timeout_s() == 0.25
    assert os.environ.get("TUNEBOOK_REDIS_TIMEOUT_S") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_a_thread_holds_the_store_lock_can_use_the_store(server: RedisServer) -> None:
    """The outbox's sending thread (or any thread of the parent) may hold the store's locks at a fork;
    the child has no such thread, and its first merge waited for that lock for ever."""
    store = RedisStore(server.url)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._lock, store.outbox._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: one merge, within the time a healthy one takes
        code = 1
        try:
            done = threading.Event()
            threading.Thread(
                target=lambda: (store.merge(FILE, _doc(1, {64: 1.0})), done.set()), daemon=True
            ).start()
            code = 0 if done.wait(5) else 3
        finally:
            os._exit(code)
    release.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's merge waited for its parent's thread"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_holds_and_sends_its_own_news_not_its_parents(server: RedisServer) -> None:
    """A pre-fork server's worker inherits its parent's store: what the worker could not send
    during an outage was held as "the parent's" and never sent, with nothing said at exit."""
    store = RedisStore(server.url, **PATIENT)
    server.stop()
    assert store.merge(FILE, _doc(1, {16: 1.0})) is None  # the parent's news, held
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            held_at_fork = store.unsent_results()  # the parent's: not the child's to send
            assert store.merge(FILE, _doc(2, {16: 1.0})) is None  # the child's own, held
            server.start()
            left = store.send_unsent(probe=True)
            stored = RedisStore(server.url, **PATIENT).fetch(FILE)
            keys = sorted(stored.entries) if stored is not None else []
            code = 0 if (held_at_fork, left, keys) == (0, 0, [json.dumps([2, "torch.float32"])]) else 2
        finally:
            server.stop()  # the server this child started
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.unsent_results() == 1  # the parent still holds its own
    store.outbox.clear()


@pytest.mark.parametrize(
    ("setup", "said"),
    [
        ({"maxmemory": "1", "maxmemory-policy": "noeviction"}, "raise its maxmemory"),
        ({"replicaof": ("127.0.0.1", "1")}, "point TUNEBOOK_REDIS_URL at the primary"),
    ],
    ids=["full", "read-only replica"],
)
def test_a_server_that_cannot_hold_the_book_is_a_book_warning_with_the_fix(
    server: RedisServer, setup: dict[str, Any], said: str
) -> None:
    """A full Redis (maxmemory, no eviction) or a read-only replica failed every write with
    one log line (which nobody sees by default) while every result stayed local."""
    raw = _raw(server)
    for name, value in setup.items():
        if name == "replicaof":
            raw.execute_command("REPLICAOF", *value)
        else:
            raw.config_set(name, value)
    store = RedisStore(server.url, keeps_unsent=False, **PATIENT)
    try:
        with pytest.warns(BookWarning, match=said):
            assert store.merge(FILE, _doc(1, {16: 1.0})) is None
    finally:
        raw.execute_command("REPLICAOF", "NO", "ONE")
        raw.config_set("maxmemory", "0")


def test_an_entry_larger_than_a_reply_may_carry_is_left_unread_and_replaced(server: RedisServer) -> None:
    """One field past the reply's byte budget (a bug's or a hand's write) failed every read of
    its key, and every merge into it (which read it first), for good: the key was never served
    from the fleet again, and what each host tuned for it waited to be sent for ever."""
    store = RedisStore(server.url, max_reply_bytes=1 << 20, **PATIENT)
    one, two = json.dumps([1, "torch.float32"]), json.dumps([2, "torch.float32"])
    assert store.merge(FILE, _doc(2, {16: 1.0})) is not None
    _raw(server).hset(KEY_PREFIX + FILE, one, b"x" * (2 << 20))
    with pytest.warns(BookWarning, match="more than a reply may carry"):
        fetched = store.fetch(FILE, [one, two])
    assert fetched is not None and list(fetched.entries) == [two] and store.available
    assert store.merge(FILE, _doc(1, {16: 2.0})) is not None  # the news replaces it
    again = store.fetch(FILE, [one, two])
    assert again is not None and sorted(again.entries) == [one, two]
    store.outbox.clear()
