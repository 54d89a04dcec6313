"""``echo`` on /v1/completions: the prompt's text and its tokens' logprobs before the
answer's, as lm-evaluation-harness reads a text's log-likelihood (``echo: true``,
``logprobs``, ``max_tokens`` 1 or 0). The app in this process (test_app.py's ASGI calls),
values against PyTorch's ``log_softmax`` of the same model's logits at every prompt row."""

from __future__ import annotations

import json

import pytest
import torch

from tunebook.demo.llm import sampling
from tunebook.demo.llm.decoder import prefill_batch
from tunebook.demo.llm.sampling import SamplingParams
from tunebook.demo.llm.server import create_app

from .test_app import events, post, run, tiny_engine

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once

PROMPT = [72, 105, 33, 32, 195, 169, 10]  # "Hi! é\n": a character of two byte tokens


def every_row_log_softmax(prompt: list[int]) -> torch.Tensor:
    """The reference: ``log_softmax`` of the logits of every prompt row, by one prefill of
    the prompt alone on PyTorch ops (the same seeded weights as tiny_engine's)."""
    engine = tiny_engine()
    blocks = engine.cache.allocator.allocate(1)
    assert blocks is not None
    batch = prefill_batch([prompt], [blocks], engine.cache.block_size, "cpu")
    with torch.inference_mode():
        states = engine.decoder.prefill_states(batch, torch.arange(len(prompt)))
        return torch.log_softmax(engine.decoder.head(states).float(), dim=-1)


def test_an_echoed_prompt_comes_first_with_its_tokens_logprobs() -> None:
    """Whole and streamed: the text is the prompt's then the answer's; ``tokens`` list the
    prompt's tokens first, the first with ``null`` logprob and alternatives (nothing comes
    before it), each other's logprob that of the model after the tokens before it; the
    answer's ``text_offset`` continue after the prompt's text."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    reference = every_row_log_softmax(PROMPT)
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True}

    async def test() -> None:
        status, raw = await post(app, "/v1/completions", body)
        assert status == 200, raw
        [choice] = json.loads(raw)["choices"]
        lp, prompt_text = choice["logprobs"], bytes(PROMPT).decode()
        n = len(PROMPT)
        assert choice["text"].startswith(prompt_text) and len(lp["tokens"]) == n + 2
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, n):
            expected = reference[i - 1, PROMPT[i]].item()
            assert lp["token_logprobs"][i] == pytest.approx(expected, abs=1e-4), i
            assert len(lp["top_logprobs"][i]) <= 3 and max(lp["top_logprobs"][i].values()) == pytest.approx(
                reference[i - 1].max().item(), abs=1e-4
            )
        # The two byte tokens of "é" both start where "é" does; the answer's after the prompt.
        assert lp["text_offset"][:n] == [0, 1, 2, 3, 4, 4, 5]
        assert lp["text_offset"][n] == len(prompt_text)
        # The answer's part is what the same request without echo answers.
        status, raw = await post(app, "/v1/completions", {**body, "echo": False})
        plain = json.loads(raw)["choices"][0]
        assert choice["text"] == prompt_text + plain["text"]
        assert lp["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]
        assert lp["text_offset"][n:] == [o + len(prompt_text) for o in plain["logprobs"]["text_offset"]]

        status, raw = await post(app, "/v1/completions", {**body, "stream": True})
        chunks = [e["choices"][0] for e in events(raw)]
        assert chunks[0]["text"] == prompt_text  # the prompt first, in a chunk of its own
        assert "".join(c["text"] for c in chunks) == choice["text"]
        joined = {f: [x for c in chunks if c["logprobs"] for x in c["logprobs"][f]] for f in lp}
        assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
        assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-6)

        status, raw = await post(app, "/v1/completions", {**body, "logprobs": None})
        choice = json.loads(raw)["choices"][0]
        assert choice["text"] == prompt_text + plain["text"] and choice["logprobs"] is None

    engine.start()
    try:
        run(test)
    finally:
        engine.stop()


def test_max_tokens_0_scores_the_prompt_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-evaluation-harness's shape with nothing generated: the prompt's text and logprobs,
    no completion tokens, ``length``; a prompt of the whole context fits (nothing is added
    to it), one more token does not; without ``echo``, max_tokens 0 is still refused. The
    prompt's logits are made PROMPT_ROWS rows at a time (here 2: the head sees no more than
    2 rows at once), with the same values; echo without logprobs runs no head over the
    prompt (one row: its last, as any prefill)."""
    monkeypatch.setattr(sampling, "PROMPT_ROWS", 2)
    engine = tiny_engine()  # max_model_len 128
    rows: list[int] = []
    head = engine.decoder.head

    def counted(states: torch.Tensor) -> torch.Tensor:
        rows.append(states.shape[0])
        return head(states)

    monkeypatch.setattr(engine.decoder, "head", counted)
    app = create_app(engine, "tiny-random")
    reference = every_row_log_softmax(PROMPT)

    async def test() -> None:
        body = {"prompt": PROMPT, "max_tokens": 0, "logprobs": 0, "echo": True}
        status, raw = await post(app, "/v1/completions", body)
        assert status == 200, raw
        answer = json.loads(raw)
        [choice] = answer["choices"]
        assert choice["text"] == bytes(PROMPT).decode() and choice["finish_reason"] == "length"
        assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
        expected = [None] + [reference[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert rows == [2, 2, 2, 1]  # 6 rows scored, 2 at a time, then the last row's logits
        rows.clear()
        status, raw = await post(app, "/v1/completions", {**body, "logprobs": None})
        assert status == 200 and json.loads(raw)["choices"][0]["logprobs"] is None and rows == [1]

        whole_context = {"prompt": [65] * 128, "max_tokens": 0, "echo": True}
        status, raw = await post(app, "/v1/completions", whole_context)
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "A" * 128, raw
        status, raw = await post(app, "/v1/completions", {**whole_context, "prompt": [65] * 129})
        assert (
            status == 400
            and "shorten the prompt to at most 128 tokens" in json.loads(raw)["error"]["message"]
        )
        for refused, field in (
            ({**body, "echo": False}, "max_tokens"),
            ({**body, "max_tokens": [5]}, "max_tokens"),  # a list: a 400 naming it, not a 500
            ({**body, "echo": 1}, "echo"),
        ):
            status, raw = await post(app, "/v1/completions", refused)
            assert status == 400 and json.loads(raw)["error"]["param"] == field, raw
        for echo in (True, 0):
            status, raw = await post(
                app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": echo}
            )
            assert status == 400 and json.loads(raw)["error"]["param"] == "echo", raw

    engine.start()
    try:
        run(test)
    finally:
        engine.stop()


def test_a_string_prompt_comes_back_as_sent_and_lone_bytes_as_replacement_characters() -> None:
    """A string prompt is echoed as sent (OpenAI's and vLLM's echo; its tokens' decoding
    would drop special tokens). A prompt of ids that never form a character (lone UTF-8
    lead bytes, which a client may send) is decoded once, each byte's offset where its
    replacement character starts."""
    from tunebook.demo.llm.logprob_texts import Echo
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    engine = tiny_engine()
    app = create_app(engine, "tiny-random")

    async def test() -> None:
        status, raw = await post(app, "/v1/completions", {"prompt": "Hi é", "max_tokens": 0, "echo": True})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "Hi é", raw

    engine.start()
    try:
        run(test)
    finally:
        engine.stop()
    lone = Echo.of(ByteTokenizer(), [0xE2, 0xE2, 65, 0xC3, 0xA9, 0xE2], [])
    assert lone.text == "\ufffd\ufffdAé\ufffd" and lone.offsets == [0, 1, 2, 3, 3, 4]


def test_a_scored_prompt_in_a_prefill_changes_no_other_requests_tokens() -> None:
    """One packed prefill of a scored prompt (every row's logits kept) beside two that are
    not: theirs are the tokens they get without it, and the scored one's logprobs are its
    own prompt's, not its neighbours'."""
    prompts = [[1, 2, 3], PROMPT, [9, 8, 7, 6]]
    alone = tiny_engine().generate([prompts[0], prompts[2]], SamplingParams(max_tokens=3))
    engine = tiny_engine()
    params = [
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=1, prompt_logprobs=1),
        SamplingParams(max_tokens=3),
    ]
    requests = [engine.submit(p, q) for p, q in zip(prompts, params)]
    while engine.step():
        pass
    assert engine.steps["prefill"] == 1  # one pack
    assert [requests[0].output, requests[2].output] == [r.output for r in alone]
    reference = every_row_log_softmax(PROMPT)
    scored = requests[1].prompt_logprobs.entries()
    assert [e.token for e in scored] == PROMPT[1:]
    assert [e.logprob for e in scored] == pytest.approx(
        [reference[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))], abs=1e-4
    )
    assert requests[0].prompt_logprobs is None and requests[2].prompt_logprobs is None


def test_sampling_params_take_max_tokens_0_only_where_the_prompt_is_echoed() -> None:
    assert SamplingParams(max_tokens=0, echo=True).max_tokens == 0
    with pytest.raises(ValueError, match="max_tokens must be at least 1; found 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs must be at least 0"):
        SamplingParams(prompt_logprobs=-1)
