"""The HTTP server, as clients meet it: a real uvicorn process on a free port, answered
through the ``openai`` Python client (and raw HTTP where a client would not misbehave).

The server runs the tiny random model on the pack's Triton kernels in the interpreter
(``--model tiny --random``; a step takes about a second); one test serves SmolLM2 cut to
one layer, for the real tokenizer and chat template. Every test here waits on
generation: the module is slow."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# The LLM demo's HTTP front: last Triton only (test_engine.py says why).
pytestmark = [pytest.mark.slow, pytest.mark.once]

MODEL = "tiny-random"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, port: int, process: subprocess.Popen[str]) -> None:
        self.port, self.process = port, process

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())


def start_server(
    tmp: Path, *args: str, launch: Sequence[str] = ("-m", "tunebook.demo.llm")
) -> Iterator[Server]:
    """A server process (``python LAUNCH serve --port P ARGS``) answering on a free port; its
    log in ``tmp/server.log``."""
    port = free_port()
    env = {**os.environ, "TUNEBOOK_DIR": str(tmp / "book"), "TUNEBOOK_MODE": "serve", "TRITON_INTERPRET": "1"}
    log = open(tmp / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, *launch, "serve", "--port", str(port), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(port, process)
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the server exited {process.returncode}:\n{(tmp / 'server.log').read_text()}"
                )
            try:
                server.get("/v1/models")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer in 180 s:\n{(tmp / 'server.log').read_text()}") from None
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("server"), "--model", "tiny", "--random")


@pytest.fixture
def client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_completion_and_chat(server: Server, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3 and completion.usage.prompt_tokens == 2
    again = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert again.choices[0].text == completion.choices[0].text  # greedy: the same text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 2
    stats = server.get("/stats")
    assert stats["tunebook"]["benchmarked"] == 0  # serve mode: nothing is ever tuned in a request
    assert stats["engine"]["failures"] == {"steps": 0, "recovered_steps": 0, "requests": 0}


def test_streaming_chat_and_completion(client: Any) -> None:
    params = {"model": MODEL, "max_tokens": 3, "temperature": 0}
    whole = client.completions.create(prompt="abc", **params).choices[0].text
    chunks = list(client.completions.create(prompt="abc", stream=True, **params))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    events = list(
        client.chat.completions.create(messages=[{"role": "user", "content": "x"}], stream=True, **params)
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert events[-1].choices[0].finish_reason == "length"


def test_two_concurrent_requests_share_decode_steps(server: Server, client: Any) -> None:
    before = server.get("/stats")["engine"]["decode_batches"]
    texts: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=4, temperature=0)
        texts[i] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(texts) == 2
    after = server.get("/stats")["engine"]["decode_batches"]
    assert after.get("2", 0) > before.get("2", 0), after  # decode steps with both requests


def test_bad_requests_get_400_with_a_message(server: Server, client: Any) -> None:
    import openai

    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": "high"}, "top_p"),
        ({"n": 3}, "'n'"),
        ({"max_tokens": 10**6}, "ask for at most"),
        ({"stop": [1, 2]}, "stop"),
    ]
    for fields, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="x", **fields)
        assert words in str(err.value), (fields, str(err.value))
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-9", prompt="x")
    status, body = server.post("/v1/completions", b"{not json")
    assert status == 400 and "does not parse" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert server.get("/v1/models")["data"][0]["id"] == MODEL  # still serving


def test_a_client_that_disconnects_mid_stream_is_aborted(server: Server, client: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True, "temperature": 0}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # gone, 399 tokens early
    conn.close()
    deadline = time.monotonic() + 60
    engine = server.get("/stats")["engine"]
    while engine["running"] or engine["free_blocks"] != engine["cache_blocks"] - 1:
        assert time.monotonic() < deadline, f"the request was not aborted: {engine}"
        time.sleep(0.5)
        engine = server.get("/stats")["engine"]
    reply = client.completions.create(model=MODEL, prompt="ok", max_tokens=1)
    assert reply.choices[0].finish_reason == "length"  # and the server goes on


def _wait_until_idle(server: Server) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    engine = server.get("/stats")["engine"]
    while engine["running"] or engine["waiting"] or engine["free_blocks"] != engine["cache_blocks"] - 1:
        assert time.monotonic() < deadline, f"a request was not aborted: {engine}"
        time.sleep(0.5)
        engine = server.get("/stats")["engine"]
    return engine


def test_a_client_that_disconnects_before_a_whole_answer_is_aborted_too(server: Server, client: Any) -> None:
    """Not streamed: nothing writes to the client until the end, so only watching the
    connection notices it has gone (the request used to run to max_tokens, holding a slot)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "temperature": 0}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 60
    while not server.get("/stats")["engine"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_until_idle(server)
    assert (
        client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices[0].finish_reason == "length"
    )


def test_what_openai_allows_is_served_or_refused_in_openais_shape(server: Server, client: Any) -> None:
    import openai

    # a tiny temperature is greedy (dividing by it overflowed and failed the whole batch)
    tiny = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=1e-40)
    greedy = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text
    assert (
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, seed=-1).usage.completion_tokens
        == 1
    )
    refused = [
        ({"seed": 2**64}, "'seed' must be in"),
        ({"presence_penalty": 1.5}, "'presence_penalty' is not supported"),
        ({"logprobs": 21}, "'logprobs' must be an integer in [0, 20]"),  # the limit, named
        ({"response_format": {"type": "json_object"}}, "'response_format' is not supported"),
    ]
    for fields, words in refused:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=MODEL, prompt="x", extra_body=fields
            )  # as any client may send them
        assert words in str(err.value), (fields, str(err.value))
    # the usage chunk a client asks for, before [DONE]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(c.usage is None for c in chunks[:-1]) and chunks[0].id.startswith("chatcmpl-")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-9")
    for method, path, status in (("GET", "/v1/embeddings", 404), ("GET", "/v1/completions", 405)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(method, path)
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == status and path in error["message"], (path, error)
    status, body = server.post(
        "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}'
    )  # JSON allows it
    assert status == 400 and "unpaired surrogate" in body["error"]["message"], body
    deep = b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, body = server.post("/v1/completions", deep)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    _wait_until_idle(server)


def test_what_clients_and_probes_send_is_answered_as_vllm_answers_it(server: Server, client: Any) -> None:
    """Found by a misuse review: text parts were glued without a separator and a null text
    became the word None; an assistant turn with null content was refused; a context overflow
    lacked the code client libraries match; no /health; a browser's CORS preflight got 405."""
    import openai

    def prompt_tokens(content: Any) -> int:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1
        )
        return int(answer.usage.prompt_tokens)

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert prompt_tokens(parts) == prompt_tokens("Hello\nworld")
    with pytest.raises(openai.BadRequestError, match="'text' must be a string"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": None}]}],
            max_tokens=1,
        )
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "x"},
    ]
    assert (
        client.chat.completions.create(model=MODEL, messages=history, max_tokens=1).usage.completion_tokens
        == 1
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
    assert err.value.code == "context_length_exceeded"
    assert "This model's maximum context length is" in str(err.value)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    conn.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") in (
        "*",
        "http://localhost:3000",
    )
    _wait_until_idle(server)


def test_a_shutdown_cuts_a_long_stream_after_its_grace_period(tmp_path: Path) -> None:
    """SIGTERM while a long answer streams: the server exits within its grace period
    (uvicorn's default waited for the stream: minutes on the interpreter, an hour for a CPU
    answer of 512 tokens)."""
    from tunebook.demo.llm.server import GRACEFUL_SHUTDOWN_S

    for server in start_server(tmp_path, "--model", "tiny", "--random"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "stream": True}
        conn.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # streaming
        begun = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=GRACEFUL_SHUTDOWN_S + 30)
        assert time.monotonic() - begun < GRACEFUL_SHUTDOWN_S + 30


def test_the_real_model_chats_through_its_template(tmp_path: Path, smollm2: Any) -> None:
    """SmolLM2 (one layer: the interpreter reads its 49152-wide output projection each step)
    behind the openai client: the GGUF tokenizer, the chat template; the first token's
    logprobs equal the log_softmax of transformers' logits with the same weights."""
    import openai
    import torch

    from tunebook.demo.llm.reference import hf_greedy, hf_model
    from tunebook.demo.llm.tokenizer import Tokenizer

    for server in start_server(tmp_path, "--layers", "1"):
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        [model] = client.models.list().data
        assert model.id == "smollm2-135m-instruct-1-layers"
        messages = [{"role": "user", "content": "Hi"}]
        reply = client.chat.completions.create(
            model=model.id, messages=messages, max_tokens=2, temperature=0, logprobs=True, top_logprobs=3
        )
        assert reply.usage.prompt_tokens == 31 and reply.usage.completion_tokens == 2
    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    prompt = tokenizer.encode(tokenizer.chat_prompt(messages))
    first = torch.log_softmax(
        hf_greedy(hf_model(smollm2.config.cut(1), smollm2.state_dict), prompt, 1)[1], -1
    )
    values, ids = first.topk(3)
    [token, *_] = reply.choices[0].logprobs.content
    assert token.logprob == pytest.approx(values[0].item(), abs=5e-3)  # the kernels' fp32 sums vs torch's
    assert [bytes(t.bytes) for t in token.top_logprobs] == [tokenizer.token_bytes(int(i)) for i in ids]
    assert [t.logprob for t in token.top_logprobs] == pytest.approx(values.tolist(), abs=5e-3)
