"""A real ``redis-server`` for tests, and the helpers every Redis test module needs.

Import the fixture into a test module (``from redis_fixture import redis_server``) and
take ``server`` as an argument (the fixture's name; the import is under another name so
that the argument does not shadow it): each test gets a fresh server on a free port of 127.0.0.1,
without persistence, stopped afterwards. When redis-server or redis-py is missing the test
FAILS with the fix, unless TUNEBOOK_SKIP_REDIS=1 says to skip it (CI installs both: see
docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from helpers_reliability import SKIP_REDIS_ENV, RedisServer
from tunebook._book.redis_store import INSTALL_HINT


def require(what: str, fix: str) -> None:
    """Fail (or skip, with TUNEBOOK_SKIP_REDIS=1) because ``what`` is missing; name the fix."""
    if os.environ.get(SKIP_REDIS_ENV) == "1":
        pytest.skip(f"{what} is missing and {SKIP_REDIS_ENV}=1")
    pytest.fail(f"{what} is missing: {fix}, or set {SKIP_REDIS_ENV}=1 to skip the Redis tests", pytrace=False)


@pytest.fixture(name="server")
def redis_server() -> Iterator[RedisServer]:
    try:
        import redis  # noqa: F401
    except ImportError:
        require("redis-py", INSTALL_HINT)
    if RedisServer.executable() is None:
        require("redis-server", "apt-get install -y redis-server")
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()
    from tunebook._book import redis_store

    for store in list(redis_store._live):  # held for a server that is gone: not for the exit to send
        store.outbox.clear()


class Clock:
    """A monotonic clock the test moves by hand, so the breaker is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tunebook_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages the "tunebook" logger issued at WARNING or above."""
    return [r.getMessage() for r in caplog.records if r.name == "tunebook" and r.levelno >= logging.WARNING]


# Timeouts for test stores: these tests are about merging and falling back, not about the
# 50 ms production default, which a loaded 2-core CI machine can miss on a local server.
PATIENT = {"connect_timeout": 2.0, "read_timeout": 2.0}
