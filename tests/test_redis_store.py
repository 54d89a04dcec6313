"""The shared fleet book on a REAL redis-server: merges, fall-back, recovery, concurrency.

The ``server`` fixture (tests/redis_fixture.py) starts ``redis-server`` on a free port of
127.0.0.1 without persistence. When redis-server or redis-py is missing the tests FAIL with
the fix, unless TUNEBOOK_SKIP_REDIS=1 says to skip them (CI installs both: see
docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest

import tunebook
from helpers_reliability import RedisServer
from redis_fixture import PATIENT, Clock, redis_server  # noqa: F401  (the `server` fixture)
from redis_fixture import tunebook_warnings as _warnings
from store_contract import FILE
from store_contract import doc as _doc
from tunebook._book.redis_store import INSTALL_HINT, KEY_PREFIX, RedisStore

# The Redis store: JSON in a Redis server, no kernel runs. Last Triton only
# (tests/conftest.py).
pytestmark = pytest.mark.once

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
    # visible without logging set up (it was only logged: a typo left the fleet book off unseen)
    with pytest.warns(
        tunebook.BookWarning, match=r"ignoring the Redis book at 'nonsense://where'.*Fix the URL"
    ):
        store = RedisStore("nonsense://where")
    assert store.fetch(FILE) is None
    assert store.merge(FILE, _doc(64, {16: 1.0})) is None
    assert len(_warnings(caplog)) == 1


def test_wrong_credentials_or_database_are_warnings_that_never_show_the_password(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a misuse review: the password was printed in every message; a wrong one was
    logged as an outage only (no BookWarning: unseen without logging set up); database 99
    was logged only; database "abc" was database 0, silently."""
    import redis

    caplog.set_level(logging.DEBUG, logger="tunebook")
    base = f"127.0.0.1:{server.port}"
    redis.Redis.from_url(server.url).config_set("requirepass", "right-one")
    try:
        store = RedisStore(f"redis://:S3cretPw@{base}/0", **PATIENT)
        with pytest.warns(tunebook.BookWarning, match="refused tunebook's credentials") as caught:
            assert store.fetch(FILE) is None
        assert "redis://:***@" in str(caught[0].message) and "S3cretPw" not in str(caught[0].message)
        assert "S3cretPw" not in repr(store) and "S3cretPw" not in caplog.text
        with pytest.warns(tunebook.BookWarning, match="Fix"):
            RedisStore(server.url, **PATIENT).fetch(FILE)  # no password at all
    finally:
        redis.Redis.from_url(f"redis://:right-one@{base}/0").config_set("requirepass", "")
    with pytest.warns(tunebook.BookWarning, match="the database 'abc' is not a number"):
        assert RedisStore(f"redis://{base}/abc", **PATIENT).fetch(FILE) is None
    with pytest.warns(tunebook.BookWarning, match="DB index is out of range.*Fix TUNEBOOK_REDIS_URL"):
        assert RedisStore(f"redis://{base}/99", **PATIENT).fetch(FILE) is None


# --------------------------------------------------------------------------- merging


def test_an_unreadable_meta_hides_the_book_only_from_a_reader_that_expects_no_identity(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The meta field goes bad (another tool's write, a hand edit) while every key is intact:
    # a reader that says which kernel and platform it asked for (the autotuner) still reads
    # the keys, and the next merge rewrites meta (the bad value kept aside) and keeps the
    # fleet's other keys, where the whole hash was once renamed aside and the fleet re-tuned.
    import redis

    caplog.set_level(logging.WARNING, logger="tunebook")
    store = RedisStore(server.url, **PATIENT)
    kept = _doc(128, {16: 2.0})
    assert store.merge(FILE, kept) is not None
    raw = redis.Redis.from_url(server.url)
    raw.hset(KEY_PREFIX + FILE, mapping={"meta": "{not json", "[64]": "[]"})
    assert store.fetch(FILE) is None
    identity = {"kernel": kept.kernel, "platform": kept.platform}
    fetched = store.fetch(FILE, list(kept.entries), expected=identity)
    assert fetched is not None and fetched.dumps() == kept.dumps()
    doc = _doc(64, {16: 1.0})
    merged = store.merge(FILE, doc)
    assert merged is not None and merged.dumps() == doc.dumps()
    fetched = store.fetch(FILE, [*kept.entries, *doc.entries])  # meta is readable again
    assert fetched is not None and fetched.dumps() == doc.merged_over(kept).dumps()
    assert raw.hvals(KEY_PREFIX + FILE + ":corrupt-keys") == [b"{not json"]
    assert len(_warnings(caplog)) == 1


def test_one_unreadable_key_is_skipped_then_replaced_never_the_fleets_other_keys(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # One key's field goes bad (a newer tunebook's entry, a hand edit): reads skip that key
    # only, and the next merge of the key keeps the bad value aside and writes over it. The
    # fleet's other keys stay where they are (the whole hash was once renamed aside for it).
    import redis

    caplog.set_level(logging.WARNING, logger="tunebook")
    store = RedisStore(server.url, **PATIENT)
    good, spoiled = _doc(64, {16: 1.0}), _doc(128, {16: 2.0})
    assert store.merge(FILE, good) is not None and store.merge(FILE, spoiled) is not None
    raw = redis.Redis.from_url(server.url)
    (bad_key,) = spoiled.entries
    raw.hset(KEY_PREFIX + FILE, bad_key, "{not json")
    fetched = store.fetch(FILE, [*good.entries, bad_key])
    assert fetched is not None and list(fetched.entries) == list(good.entries)
    assert store.merge(FILE, _doc(128, {32: 3.0})) is not None
    everything = store.fetch(FILE)
    assert everything is not None and sorted(everything.entries) == sorted([*good.entries, bad_key])
    assert (
        everything.entries[bad_key].best(list(everything.entries[bad_key].results)) == "BLOCK=32|num_warps=4"
    )
    assert raw.hvals(KEY_PREFIX + FILE + ":corrupt-keys") == [b"{not json"]
    assert raw.keys(KEY_PREFIX + FILE + ":corrupt-2*") == []  # the hash itself was not renamed
    assert len(_warnings(caplog)) == 1


def test_two_unreadable_metas_kept_aside_in_one_second_are_both_kept(server: RedisServer) -> None:
    import redis

    raw = redis.Redis.from_url(server.url)
    store = RedisStore(server.url, **PATIENT)
    for bad in ("{not json", "[]"):
        raw.hset(KEY_PREFIX + FILE, mapping={"meta": bad, "[64]": "[]"})
        assert store.merge(FILE, _doc(64, {16: 1.0})) is not None
        raw.delete(KEY_PREFIX + FILE)
    assert sorted(raw.hvals(KEY_PREFIX + FILE + ":corrupt-keys")) == [b"[]", b"{not json"]


def test_a_key_of_another_type_fails_the_call_not_the_store(server: RedisServer) -> None:
    import redis

    redis.Redis.from_url(server.url).set(KEY_PREFIX + FILE, "a string, not a hash")
    store = RedisStore(server.url, **PATIENT)
    assert store.fetch(FILE) is None
    assert store.available  # the server answered: no outage, no breaker


@pytest.mark.parametrize("planted", ["a string", "another kernel's hash"])
def test_a_value_that_is_no_page_of_this_kernel_is_kept_aside_by_the_next_merge(
    server: RedisServer, planted: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Another tool's string under our name, or a hash whose meta names another kernel version
    # (two versions whose short ids collide; a copied hash): every host skipped it, tuned the
    # key again and wrote into it, and the fleet never shared that kernel. The next merge
    # keeps it aside whole and starts the hash again, so the fleet reads what it writes.
    import redis

    caplog.set_level(logging.WARNING, logger="tunebook")
    raw = redis.Redis.from_url(server.url)
    key = KEY_PREFIX + FILE
    if planted == "a string":
        raw.set(key, "a string, not a hash")
    else:
        other = _doc(32, {16: 9.0})
        raw.hset(key, mapping={"meta": '{"kernel": {"hash": "another"}, "platform": {}}'})
        raw.hset(key, mapping={k: json.dumps(e.to_json()) for k, e in other.entries.items()})
    before = raw.dump(key)
    store = RedisStore(server.url, **PATIENT)
    doc = _doc(64, {16: 1.0})
    assert store.merge(FILE, doc) is not None
    fetched = store.fetch(FILE)
    assert fetched is not None and fetched.dumps() == doc.dumps()
    (aside,) = raw.keys(key + ":foreign-*")
    assert raw.dump(aside) == before  # kept as it was, for a person to look at
    assert not raw.exists(key + ":corrupt-keys")  # its meta is in the copy, not copied again
    assert any("aside" in r.getMessage() for r in caplog.records)


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


# --------------------------------------------------------------------------- hostile peers


class _FloodingPeer:
    """A TCP peer that answers every connection with one reply that never ends: a bulk string
    announced as 1 GB, sent as fast as possible (``pace_s`` = 0) or steadily, a chunk every
    ``pace_s`` seconds (so that no single socket read ever times out)."""

    def __init__(self, pace_s: float, chunk: int) -> None:
        import socket
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        self.pace_s, self.chunk, self.stop = pace_s, chunk, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn: Any) -> None:
        import time

        with conn:
            try:
                conn.sendall(b"$1073741824\r\n")
                while not self.stop.is_set():
                    conn.sendall(b"x" * self.chunk)
                    if self.pace_s:
                        time.sleep(self.pace_s)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.mark.parametrize("pace_s, chunk", [(0.0, 1 << 20), (0.01, 4096)], ids=["endless", "steady"])
def test_a_peer_that_keeps_sending_costs_a_bounded_wait_and_bounded_memory(pace_s: float, chunk: int) -> None:
    import resource
    import time

    peer = _FloodingPeer(pace_s, chunk)
    try:
        store = RedisStore(peer.url, max_reply_bytes=8 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for call in (lambda: store.fetch(FILE), lambda: store.merge(FILE, _doc(64, {16: 1.0}))):
            t0 = time.monotonic()
            assert call() is None
            assert time.monotonic() - t0 < 1.0
            store._open_until = None  # close the breaker: the next call meets the peer again
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 100, f"the process grew by {grown_mb:.0f} MB"
    finally:
        peer.close()
