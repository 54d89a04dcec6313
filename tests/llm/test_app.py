"""The server's app in this process, called as uvicorn calls it (ASGI), on an engine a test
steps by hand (the app's lifespan, which starts the engine's thread, does not run): what
the HTTP answers hold when the steps come in an order a test chooses."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from tunebook.demo.llm.config import TINY
from tunebook.demo.llm.engine import Engine
from tunebook.demo.llm.loading import random_weights
from tunebook.demo.llm.ops import TorchOps
from tunebook.demo.llm.server import create_app
from tunebook.demo.llm.tokenizer import ByteTokenizer

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once


def tiny_engine(ops: Any = "torch") -> Engine:
    weights = random_weights(TINY, torch.float32, "cpu")  # the server's --model tiny --random
    return Engine(weights, ByteTokenizer(), ops=ops, max_batch=4, max_model_len=128)


async def post(
    app: Any, path: str, body: dict[str, Any], leave: asyncio.Event | None = None
) -> tuple[int, bytes]:
    """POST ``body`` to ``app`` as uvicorn would; the status and the whole response body.
    The client stays until its answer is complete, or disconnects once ``leave`` is set."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    answered = asyncio.Event()
    sent = False
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await (answered if leave is None else leave).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 10 s")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_a_500_names_its_own_requests_failure_not_the_engines_latest() -> None:
    """Two prompts prefilled in one pack, each failing alone with its own error: each
    client's 500 names its own. It named the engine's latest error, the other request's
    (the server read ``engine.error`` as it answered, after both had failed)."""

    class Fails(TorchOps):
        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(f"a prefill of {x.shape[0]} tokens (injected)")

    engine = tiny_engine(Fails())
    app = create_app(engine, "tiny-random")

    async def test() -> None:
        answers = [
            asyncio.ensure_future(post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 2}))
            for prompt in ([1, 2], [3, 4, 5])
        ]
        await until(lambda: len(engine.scheduler.waiting) == 2, "both queued")
        with pytest.raises(RuntimeError, match="5 tokens"):  # the pack's; then each alone fails
            engine.step()  # on the event loop: both have failed before either is answered
        for (status, body), tokens in zip(await asyncio.gather(*answers), (2, 3)):
            message = json.loads(body)["error"]["message"]
            assert status == 500 and f"a prefill of {tokens} tokens" in message, message

    run(test)


def events(body: bytes) -> list[Any]:
    """A stream's server-sent events, parsed, up to ``[DONE]``."""
    datas = [line[len(b"data: ") :] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert datas[-1] == b"[DONE]"
    return [json.loads(d) for d in datas[:-1]]


def test_logprobs_in_whole_and_streamed_answers_of_both_endpoints() -> None:
    """The shapes OpenAI's clients read: /v1/completions' ``logprobs`` (``tokens``,
    ``token_logprobs``, ``top_logprobs`` with the sampled token among up to N + 1,
    ``text_offset``) and chat's ``logprobs.content``; streamed, each chunk carries its own
    tokens' and together they are the whole answer's."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    prompt, n = [5, 6, 7], 3

    async def test() -> None:
        status, body = await post(
            app, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 2}
        )
        assert status == 200, body
        [choice] = json.loads(body)["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
        assert "".join(lp["tokens"]) == choice["text"]  # ByteTokenizer: every token has its text
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert logprob <= 0 and 1 <= len(top) <= 3 and top[token] == logprob
            assert logprob == max(top.values())  # greedy: the sampled token is the most likely

        status, body = await post(
            app,
            "/v1/completions",
            {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 2, "stream": True},
        )
        chunks = [c["choices"][0] for c in events(body)]
        streamed = [c["logprobs"] for c in chunks if c["logprobs"] is not None]
        for field in ("tokens", "text_offset", "token_logprobs"):
            assert [x for s in streamed for x in s[field]] == lp[field], field
        assert chunks[-1]["finish_reason"] == "length"

        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0}
        status, body = await post(app, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2})
        assert status == 200, body
        [choice] = json.loads(body)["choices"]
        content = choice["logprobs"]["content"]
        assert len(content) == n and "".join(c["token"] for c in content) == choice["message"]["content"]
        for c in content:
            assert c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode())
            assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"]
            assert c["top_logprobs"][0]["token"] == c["token"]  # greedy
        status, body = await post(app, "/v1/chat/completions", {**chat, "logprobs": True, "stream": True})
        deltas = [e["choices"][0] for e in events(body)]
        assert deltas[0]["logprobs"] is None and deltas[-1]["logprobs"] is None  # the role, the finish
        streamed_content = [c for d in deltas[1:-1] for c in d["logprobs"]["content"]]
        assert [c["token"] for c in streamed_content] == [c["token"] for c in content]
        assert all(c["top_logprobs"] == [] for c in streamed_content)  # top_logprobs left out: 0

        status, body = await post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert json.loads(body)["choices"][0]["logprobs"] is None  # not asked

    engine.start()
    try:
        run(test)
    finally:
        engine.stop()


def forcing(monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
    """Every token the engine samples is the next of ``tokens``, in turn (over and over):
    the model's logits still make the logprobs. For one request at a time."""
    from tunebook.demo.llm import engine as engine_module

    script = itertools.cycle(tokens)

    def sample(logits: torch.Tensor, params: Any, *rest: Any) -> torch.Tensor:
        return torch.tensor([next(script) for _ in params])

    monkeypatch.setattr(engine_module, "sample", sample)


Logprobs = dict[str, Any]


def completion_logprobs(app: Any, body: dict[str, Any]) -> Awaitable[tuple[str, Logprobs, Logprobs]]:
    """The text and ``logprobs`` of a whole /v1/completions answer, and its streamed
    chunks' logprobs joined."""

    async def both() -> tuple[str, Logprobs, Logprobs]:
        status, raw = await post(app, "/v1/completions", body)
        assert status == 200, raw
        [choice] = json.loads(raw)["choices"]
        status, raw = await post(app, "/v1/completions", {**body, "stream": True})
        chunks = [e["choices"][0]["logprobs"] for e in events(raw) if e["choices"][0]["logprobs"]]
        streamed = {field: [x for c in chunks for x in c[field]] for field in choice["logprobs"]}
        return choice["text"], choice["logprobs"], streamed

    return both()


def test_text_offsets_and_names_of_tokens_cutting_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte tokens cutting characters in parts: each ``text_offset`` is where the token's
    character starts in the answer, streamed as whole; a token that is part of a character
    is named ``bytes:\\xNN`` (OpenAI's completions' name), so alternatives stay apart. The
    offsets added up the tokens' texts, in which each part showed as a whole U+FFFD (the
    answer's 6 characters ran to 12); every part was "\\ufffd", and 5 alternatives
    collapsed into fewer."""
    answer = "aé€b😀!"
    ids = list(answer.encode())
    forcing(monkeypatch, ids)
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    body = {"prompt": [5, 6, 7], "max_tokens": len(ids), "logprobs": 5}
    engine.start()
    try:
        text, lp, streamed = asyncio.run(completion_logprobs(app, body))
        _, raw = asyncio.run(
            post(
                app,
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": len(ids),
                    "logprobs": True,
                    "top_logprobs": 2,
                },
            )
        )
    finally:
        engine.stop()
    assert text == answer
    assert lp["text_offset"] == [0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5]
    parts = {"é": [r"bytes:\xc3", r"bytes:\xa9"], "€": [r"bytes:\xe2", r"bytes:\x82", r"bytes:\xac"]}
    parts["😀"] = [r"bytes:\xf0", r"bytes:\x9f", r"bytes:\x98", r"bytes:\x80"]
    assert lp["tokens"] == [name for c in answer for name in parts.get(c, [c])]
    assert all(len(top) >= 5 for top in lp["top_logprobs"])  # 5 distinct ids: 5 distinct names
    assert streamed == lp
    content = json.loads(raw)["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["bytes"]) for c in content] == [(t, [b]) for t, b in zip(lp["tokens"], ids)]


def test_the_sampled_token_never_overwrites_a_likelier_alternative_of_the_same_name() -> None:
    """Completions' ``top_logprobs`` is a dict keyed by a token's name: an alternative keeps
    its value where the sampled token (or a less likely alternative) has the same name. The
    sampled token's -5.0 replaced the likeliest alternative's -0.007 under one key."""
    from tunebook.demo.llm.logprob_texts import TokenTexts
    from tunebook.demo.llm.sampling import TokenLogprobs

    class Twins(ByteTokenizer):  # ids 300 and 301: the same bytes (a token added as text)
        def token_bytes(self, token: int) -> bytes:
            return b"same" if token in (300, 301) else super().token_bytes(token)

    texts = TokenTexts(Twins())
    top = ((300, -0.007), (200, -4.0), (201, -4.5))
    [dict_] = texts.completion([TokenLogprobs(301, -5.0, top)])["top_logprobs"]
    assert dict_ == {"same": -0.007, r"bytes:\xc8": -4.0, r"bytes:\xc9": -4.5}
    [dict_] = texts.completion([TokenLogprobs(202, -6.0, top)])["top_logprobs"]
    assert dict_ == {"same": -0.007, r"bytes:\xc8": -4.0, r"bytes:\xc9": -4.5, r"bytes:\xca": -6.0}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_whole_answers_logprobs_are_built_and_serialised_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Megabytes of logprobs (8000 tokens of 20 alternatives took 0.7 s) would stall every
    stream the event loop serves: a whole answer's are built and rendered as JSON on a
    worker thread. They were on the event loop's."""
    from starlette.responses import JSONResponse

    from tunebook.demo.llm.logprob_texts import TokenTexts

    threads: dict[str, set[str]] = {"built": set(), "rendered": set()}
    for name in ("completion", "chat"):
        real = getattr(TokenTexts, name)

        def built(self: Any, *args: Any, _real: Any = real) -> Any:
            threads["built"].add(threading.current_thread().name)
            return _real(self, *args)

        monkeypatch.setattr(TokenTexts, name, built)
    render = JSONResponse.render

    def rendered(self: Any, content: Any) -> bytes:
        if "choices" in content and content["choices"][0]["logprobs"] is not None:
            threads["rendered"].add(threading.current_thread().name)
        return render(self, content)

    monkeypatch.setattr(JSONResponse, "render", rendered)
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    ask = (
        {"prompt": [5, 6], "logprobs": 20}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 20}
    )
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs here
    engine.start()
    try:
        status, raw = asyncio.run(post(app, path, {**ask, "max_tokens": 3}))
    finally:
        engine.stop()
    assert status == 200 and json.loads(raw)["choices"][0]["logprobs"], raw
    assert threads["built"] and threads["rendered"]
    assert loop_thread not in threads["built"] | threads["rendered"]


def test_a_stream_takes_its_tokens_logprobs_from_the_request_as_it_sends_them() -> None:
    """A streamed request holds no logprobs once its chunks have carried them (a long
    request kept 15 MiB of them to its end); a whole answer keeps them until it is built."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    requests = []
    queue = engine.queue

    def kept(queued: list[Any]) -> None:
        requests.extend(queued)
        queue(queued)

    engine.queue = kept  # type: ignore[method-assign]
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 3, "temperature": 0}
    engine.start()
    try:
        _, lp, streamed = asyncio.run(completion_logprobs(app, body))
    finally:
        engine.stop()
    assert streamed == lp and len(lp["tokens"]) == 4
    whole, stream = requests
    assert len(whole.logprobs) == 4 and stream.finished and stream.logprobs == []


def test_text_offsets_of_smollm2s_tokens_are_where_their_text_starts(
    smollm2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2's own tokens of an answer with emoji, an accent and CJK (one layer on PyTorch
    ops; the forced tokens are the answer's): each token whose bytes begin a character is
    found at its ``text_offset``, one holding the rest of a character sits where that
    character starts; streamed as whole. 15 of 16 offsets were wrong, the last 25 in a
    text of 19 characters."""
    from tunebook.demo.llm.loading import weights_from_state_dict
    from tunebook.demo.llm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    answer = "I ❤️ 🙂 naïve 日本語 ok"
    ids = tokenizer.encode(answer)
    forcing(monkeypatch, ids)
    weights = weights_from_state_dict(smollm2.config.cut(1), smollm2.state_dict, torch.float32, "cpu")
    engine = Engine(weights, tokenizer, ops="torch", max_batch=1, max_model_len=64)
    app = create_app(engine, "smollm2")
    engine.start()
    try:
        text, lp, streamed = asyncio.run(
            completion_logprobs(app, {"prompt": [57], "max_tokens": len(ids), "logprobs": 1})
        )
    finally:
        engine.stop()
    assert text == answer and streamed == lp
    assert lp["text_offset"] == [0, 1, 2, 2, 3, 4, 6, 9, 12, 13, 13, 14, 15, 15, 15, 16]
    assert lp["tokens"][1:4] == [r"bytes: \xe2", r"bytes:\x9d", r"bytes:\xa4"]  # ❤ in three
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert token.startswith("bytes:") or answer[offset:].startswith(token), (token, offset)
