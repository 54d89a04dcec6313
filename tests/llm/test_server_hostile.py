"""The HTTP server against concurrent and hostile clients (found by a review): oversized
bodies, integers of thousands of digits, fields OpenAI refuses, clients that go away
mid-upload, and shutdowns (SIGINT, SIGTERM) with answers in flight while the engine is in
a step of minutes.

A real uvicorn process on the tiny random model (``--model tiny --random``), as in
test_server.py; most tests here only send requests the server refuses before any step,
so they are quick. A slow step is a server process whose engine sleeps in its steps
(SLOW_STEP below): what a long prefill on the interpreter does to a shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_server import MODEL, Server, start_server

# The LLM demo's HTTP front: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once

MAX_BODY_MB = 12  # the server's default (server.DEFAULT_MAX_BODY_MB)

# ``python -c SLOW_STEP serve ...``: the server, its engine asleep for 600 s in every step
# after the first prefill (a step of minutes on the interpreter, without the minutes of CPU).
SLOW_STEP = """
import sys, time
from tunebook.demo.llm import engine
from tunebook.demo.llm.__main__ import main
step = engine.Engine.step
def slow_step(self):
    if self.scheduler.has_work() and self.steps["prefill"] >= 1:
        time.sleep(600)
    return step(self)
engine.Engine.step = slow_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    for server in start_server(tmp, "--model", "tiny", "--random"):
        yield server, tmp / "server.log"


@pytest.fixture
def server(served: tuple[Server, Path]) -> Server:
    return served[0]


def raw(port: int, head: bytes, body: bytes = b"", timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """Send ``head`` and ``body`` as they are; the response's status, headers and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, dict(response.getheaders()), json.loads(response.read())


def post(server: Server, path: str, body: bytes) -> tuple[int, Any]:
    status, _, answer = raw(
        server.port,
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (path.encode(), len(body)),
        body,
    )
    return status, answer


def test_a_body_over_the_limit_gets_413_before_it_is_read(server: Server) -> None:
    """A 170 MB body blocked the event loop for 12 s and left the server at 3 GB."""
    # Announced: refused at once, before the client has sent it.
    status, _, body = raw(
        server.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200000000\r\n\r\n",
        b'{"messages": [',
        timeout=20,
    )
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert f"--max-body-mb {MAX_BODY_MB}" in body["error"]["message"]
    # Chunked, with no length: refused once it passes the limit, before its end.
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY_MB * 16 + 1))
    status, _, body = raw(
        server.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        chunks,
        timeout=20,
    )
    assert status == 413 and body["error"]["type"] == "invalid_request_error", body
    status, body = post(server, "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 1}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 1  # and under it, served


def test_messages_that_cannot_fit_are_refused_before_the_template_renders_them(server: Server) -> None:
    many = json.dumps({"messages": [{"role": "user", "content": "a"}] * 20000}).encode()
    status, body = post(server, "/v1/chat/completions", many)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "holds 20000 messages" in body["error"]["message"]


def test_integers_of_thousands_of_digits_are_400s_with_short_messages(server: Server) -> None:
    """Python refuses to read (and to print) an integer of more than 4300 digits: a 500."""
    for digits in (5000, 4300):  # past the parser's limit; within it, but the message's sum is not
        status, body = post(
            server, "/v1/completions", b'{"prompt": "Hi", "max_tokens": %s}' % (b"9" * digits)
        )
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (digits, body)
        assert len(body["error"]["message"]) < 400, body
    status, body = post(server, "/v1/completions", b'{"prompt": [%s], "max_tokens": 1}' % (b"9" * 4000))
    assert status == 400 and body["error"]["param"] == "prompt", body
    assert len(body["error"]["message"]) < 400, body


def test_max_tokens_is_checked_beside_max_completion_tokens(server: Server) -> None:
    body = {"prompt": "Hi", "max_completion_tokens": 1, "max_tokens": "x"}
    status, answer = post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == "max_tokens", answer
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1, "max_tokens": -1}
    status, answer = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == "max_tokens", answer


def test_stream_options_without_stream_is_refused_as_openai_refuses_it(server: Server) -> None:
    options = {"stream_options": {"include_usage": True}, "max_tokens": 1}
    for path, body in (
        ("/v1/completions", {"prompt": "Hi", **options}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], **options}),
        ("/v1/completions", {"prompt": "Hi", "stream": False, **options}),
    ):
        status, answer = post(server, path, json.dumps(body).encode())
        assert status == 400 and answer["error"]["param"] == "stream_options", (path, answer)


def test_a_405_says_which_methods_are_allowed(server: Server) -> None:
    status, headers, body = raw(server.port, b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "method GET is not allowed" in body["error"]["message"]
    assert {k.lower(): v for k, v in headers.items()}["allow"] == "POST"


def test_a_client_gone_mid_upload_is_not_an_error(served: tuple[Server, Path]) -> None:
    server, log = served
    before = len(log.read_text())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"prompt": "aaa'
        )
        time.sleep(0.5)
    assert server.get("/v1/models")["data"][0]["id"] == MODEL  # still serving
    # The traceback came within milliseconds of the disconnect: watch the log a while for it.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        text = log.read_text()[before:]
        assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
        time.sleep(0.1)


# ------------------------------------------------------------------ shutting down


def _in_flight(server: Server) -> dict[str, Any]:
    """A stream (its first chunk read) and a whole answer, both waiting on a slow step;
    what each reads until the server closes its connection, as it comes."""
    out: dict[str, Any] = {}

    def ask(name: str, stream: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": stream}
        conn.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        out[f"{name} sent"] = True  # connected, and the whole request written
        response = conn.getresponse()
        out[name] = (response.status, b"")
        if stream:
            first = response.readline()
            assert first.startswith(b"data: ")
            out["streaming"] = True
        try:
            out[name] = (response.status, response.read())
        except (http.client.HTTPException, OSError) as exc:  # cut without a proper end
            out[name] = (response.status, repr(exc).encode())

    threads = [threading.Thread(target=ask, args=("stream", True), daemon=True)]
    threads[0].start()
    deadline = time.monotonic() + 60
    while "streaming" not in out:
        assert time.monotonic() < deadline and threads[0].is_alive(), out
        time.sleep(0.1)
    threads.append(threading.Thread(target=ask, args=("plain", False), daemon=True))
    threads[1].start()
    while "plain sent" not in out:
        assert time.monotonic() < deadline and threads[1].is_alive(), out
        time.sleep(0.05)
    time.sleep(0.5)  # and read by the server, queued behind the engine's slow step
    out["threads"] = threads
    return out


def _exits_within(server: Server, seconds: float) -> float:
    begun = time.monotonic()
    try:
        server.process.wait(timeout=seconds)
    except Exception:
        server.process.kill()
        raise AssertionError(f"the server was still running {seconds} s after the signal") from None
    return time.monotonic() - begun


def _ended_as_openai_clients_expect(out: dict[str, Any], log: Path) -> None:
    for t in out["threads"]:
        t.join(10)
    status, plain = out["plain"]
    assert status == 503, (status, plain)
    error = json.loads(plain)["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error", error
    status, stream = out["stream"]
    events = [line for line in stream.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", stream
    assert "shutting down" in json.loads(events[-2][len("data: ") :])["error"]["message"], stream
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


@pytest.mark.slow  # the shutdown's grace period, 10 s
def test_a_shutdown_during_a_long_step_ends_its_requests_and_exits_within_its_bounds(tmp_path: Path) -> None:
    """Ctrl-C while the engine was in a step of minutes: the lifespan joined the engine's
    thread on the event loop, with no timeout, and the server hung until the step ended;
    requests in flight got uvicorn's text 500 with a traceback, streams were cut."""
    from tunebook.demo.llm.server import ENGINE_STOP_S, GRACEFUL_SHUTDOWN_S

    for server in start_server(tmp_path, "--model", "tiny", "--random", launch=("-c", SLOW_STEP)):
        out = _in_flight(server)
        server.process.send_signal(signal.SIGINT)
        took = _exits_within(server, GRACEFUL_SHUTDOWN_S + ENGINE_STOP_S + 10)
        assert took > GRACEFUL_SHUTDOWN_S - 1  # the answers in flight had their grace period
        _ended_as_openai_clients_expect(out, tmp_path / "server.log")


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    for server in start_server(tmp_path, "--model", "tiny", "--random", launch=("-c", SLOW_STEP)):
        out = _in_flight(server)
        server.process.send_signal(signal.SIGINT)
        time.sleep(1)
        server.process.send_signal(signal.SIGINT)
        _exits_within(server, 6)
        _ended_as_openai_clients_expect(out, tmp_path / "server.log")
