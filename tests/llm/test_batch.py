"""A batch of prompts on /v1/completions (``prompt`` a list of strings or of token-id lists,
as OpenAI's legacy completions, vLLM and lm-evaluation-harness's ``local-completions`` send
it): a choice per prompt in prompt order, each what the prompt alone is answered, the usage
summed; whole and streamed; refusals before anything is queued; one prompt's failure and a
client gone end them all. The app in this process (test_app.py's ASGI calls)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import pytest
import torch

from tunebook.demo.llm.batch import MAX_PROMPTS
from tunebook.demo.llm.ops import TorchOps
from tunebook.demo.llm.server import create_app

from .test_app import events, post, run, tiny_engine, until

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once

STRINGS = ["Hi", "abc!", "é x"]
IDS = [[72, 105], [5, 6, 7, 8], [195, 169, 33]]


def choices_by_index(stream: list[Any]) -> dict[int, list[Any]]:
    """A stream's chunks of each prompt, by index, in the order they came."""
    out: dict[int, list[Any]] = defaultdict(list)
    for chunk in stream:
        for choice in chunk["choices"]:
            out[choice["index"]].append(choice)
    return out


@pytest.mark.parametrize("prompts", [STRINGS, IDS], ids=["strings", "token-ids"])
def test_a_batch_is_answered_as_each_of_its_prompts_alone(prompts: list[Any]) -> None:
    """A batch of 3 with echo and logprobs, whole and streamed: ``choices`` in prompt order,
    each the text, tokens and logprobs of its prompt answered alone, ``finish_reason`` its
    own; ``usage`` summed; the three prefilled in one step. Streamed: each prompt's echo
    first for its index, its finish last, the usage once after all, ``[DONE]`` once. It
    was a 400: one prompt per request."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    ask = {"max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}

    async def test() -> None:
        alone = []
        for prompt in prompts:
            status, raw = await post(app, "/v1/completions", {**ask, "prompt": prompt})
            assert status == 200, raw
            alone.append(json.loads(raw))
        prefills = engine.steps["prefill"]
        status, raw = await post(app, "/v1/completions", {**ask, "prompt": prompts})
        assert status == 200, raw
        assert engine.steps["prefill"] == prefills + 1  # queued together: one prefill of three
        batch = json.loads(raw)
        assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
        for choice, one in zip(batch["choices"], alone):
            [expected] = one["choices"]
            assert choice["text"] == expected["text"] and choice["finish_reason"] == "length"
            lp, want = choice["logprobs"], expected["logprobs"]
            assert lp["tokens"] == want["tokens"] and lp["text_offset"] == want["text_offset"]
            assert lp["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert batch["usage"][field] == sum(one["usage"][field] for one in alone), field
        if isinstance(prompts[0], str):
            assert [c["text"][: len(p)] for p, c in zip(prompts, batch["choices"])] == prompts

        streamed = {**ask, "prompt": prompts, "stream": True, "stream_options": {"include_usage": True}}
        status, raw = await post(app, "/v1/completions", streamed)
        assert status == 200 and raw.count(b"data: [DONE]") == 1
        chunks = events(raw)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == batch["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])  # the usage once, at the end
        by_index = choices_by_index(chunks[:-1])
        assert sorted(by_index) == [0, 1, 2]
        for i, choice in enumerate(batch["choices"]):
            mine = by_index[i]
            prompt_tokens = alone[i]["usage"]["prompt_tokens"]
            assert mine[0]["logprobs"]["tokens"] == choice["logprobs"]["tokens"][:prompt_tokens]  # echo first
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
            joined = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
            assert joined == choice["logprobs"]["tokens"]

    engine.start()
    try:
        run(test)
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("prompts", "extra", "words"),
    [
        (["a", "", "b"], {}, "'prompt[1]' is empty"),
        ([[1, 2], [], [3]], {}, "'prompt[1]' is empty"),
        ([[1, 2], [1, "x"], [3]], {}, "'prompt[1]' must be a list of token ids"),
        ([[1, 2], [1, 512], [3]], {}, "prompt[1]: prompt token ids must be in [0, 512)"),
        ([[1, 2], [1] * 128, [3]], {}, "prompt[1]: This model's maximum context length is 128"),
        (["a", "b" * 200, "c"], {}, "prompt[1]: This model's maximum context length is 128"),
        ([[1] * 10, [1] * 120, [3]], {"max_tokens": 10}, "prompt[1]: This model's maximum context length"),
        (["a", "\ud800", "c"], {}, "'prompt[1]' holds an unpaired surrogate"),
    ],
)
def test_a_bad_prompt_of_a_batch_is_refused_by_its_index_and_none_is_queued(
    prompts: list[Any], extra: dict[str, Any], words: str
) -> None:
    """Every prompt is checked before any is queued: a 400 naming the prompt at fault by its
    index, and the engine's scheduler saw none of them (the prompt before it neither)."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    queued: list[Any] = []
    add_all = engine.scheduler.add_all
    engine.scheduler.add_all = lambda requests: (queued.append(requests), add_all(requests))  # type: ignore[method-assign]
    status, raw = asyncio.run(post(app, "/v1/completions", {"prompt": prompts, **extra}))
    error = json.loads(raw)["error"]
    assert status == 400 and words in error["message"], error
    assert not queued and not engine.scheduler.waiting and not engine.scheduler.running


def test_more_prompts_than_the_limit_and_a_mixed_batch_are_refused() -> None:
    """Over MAX_PROMPTS prompts is a 400 naming the limit; a list mixing strings and token-id
    lists is a 400, as OpenAI refuses it (this server does not guess which was meant)."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    for prompts, words in (
        ([[1]] * (MAX_PROMPTS + 1), f"{MAX_PROMPTS + 1} prompts; this server takes at most {MAX_PROMPTS}"),
        (["a"] * (MAX_PROMPTS + 1), f"at most {MAX_PROMPTS}"),
        (["a", [1, 2]], "mixes strings and token-id lists"),
        ([[1, 2], "a"], "mixes strings and token-id lists"),
        # A long list of ids with one stray value is a malformed prompt, not a batch of 1000.
        ([1] * 999 + [True], "must be a non-empty string, a list of token ids, or a batch"),
    ):
        status, raw = asyncio.run(post(app, "/v1/completions", {"prompt": prompts}))
        error = json.loads(raw)["error"]
        assert status == 400 and words in error["message"] and error["param"] == "prompt", error
    assert not engine.scheduler.waiting
    engine.start()  # the limit is not the engine's max_batch (4): the others wait their turn
    try:
        status, raw = asyncio.run(post(app, "/v1/completions", {"prompt": [[1]] * 6, "max_tokens": 1}))
    finally:
        engine.stop()
    assert status == 200 and [c["index"] for c in json.loads(raw)["choices"]] == list(range(6)), raw


class FailsForFive(TorchOps):
    """A prefill of 5 tokens fails (one prompt alone), and so does the pack of the batch."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] in (5, 10):
            raise RuntimeError(f"a prefill of {x.shape[0]} tokens (injected)")
        return super().silu_and_mul(x)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_one_prompt_failing_in_the_engine_fails_the_batch_by_its_index(stream: bool) -> None:
    """The pack of three fails, then the middle prompt alone: the answer is a 500 (a stream's
    error event, then ``[DONE]``) naming prompt[1] and its error; the other two, which ran,
    are aborted at the next step."""
    engine = tiny_engine(FailsForFive())
    app = create_app(engine, "tiny-random")
    body = {"prompt": [[1, 2], [3, 4, 5, 6, 7], [8, 9, 10]], "max_tokens": 50, "stream": stream}

    async def test() -> None:
        answer = asyncio.ensure_future(post(app, "/v1/completions", body))
        await until(lambda: len(engine.scheduler.waiting) == 3, "the batch queued")
        with pytest.raises(RuntimeError, match="10 tokens"):  # the pack's; prompt[1] alone fails too
            engine.step()
        others = list(engine.scheduler.running)
        assert len(others) == 2
        status, raw = await answer
        if stream:
            error = events(raw)[-1]["error"]
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        else:
            error = json.loads(raw)["error"]
            assert status == 500
        assert "prompt[1]: " in error["message"] and "a prefill of 5 tokens" in error["message"], error
        await until(lambda: len(engine.scheduler._aborted) == 2, "the others aborted")
        engine.step()
        assert [r.finish_reason for r in others] == ["abort", "abort"] and not engine.scheduler.running

    run(test)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_gone_aborts_every_prompt_of_its_batch(stream: bool) -> None:
    """A client that disconnects before its answer is complete (a whole answer: while its
    prompts wait; a stream: after their first tokens came) has all three requests aborted
    and their cache freed at the next step."""
    engine = tiny_engine()
    app = create_app(engine, "tiny-random")
    body = {"prompt": ["ab", "cde", "f"], "max_tokens": 50, "stream": stream}

    async def test() -> None:
        leave = asyncio.Event()
        answer = asyncio.ensure_future(post(app, "/v1/completions", body, leave))
        await until(lambda: len(engine.scheduler.waiting) == 3, "the batch queued")
        requests = list(engine.scheduler.waiting)
        if stream:
            engine.step()  # the prefill: a first token each, streamed
            await until(lambda: all(r.output for r in requests), "first tokens")
            await asyncio.sleep(0.05)
        leave.set()
        await answer
        await until(lambda: len(engine.scheduler._aborted) == 3, "every prompt aborted")
        engine.step()
        assert [r.finish_reason for r in requests] == ["abort"] * 3
        assert not engine.scheduler.running and not engine.scheduler.waiting
        assert engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1

    run(test)
