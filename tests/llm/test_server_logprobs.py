"""Sampled-token logprobs through the real ``openai`` client, against a real server process
(``--model tiny --random`` on the pack's kernels in the interpreter, as test_server.py
starts it): a few tokens, about ten seconds with the server's start."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .test_server import MODEL, Server, start_server

# The LLM demo's HTTP front: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import openai

    server: Server
    for server in start_server(tmp_path_factory.mktemp("logprobs"), "--model", "tiny", "--random"):
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def first_token_log_softmax(prompt: list[int]) -> Any:
    """The reference: ``log_softmax`` of the logits the server's model (``--model tiny
    --random``: the same seeded weights) gives the token after ``prompt``, by the engine's
    forward on PyTorch ops (the server runs the pack's kernels)."""
    import torch

    from tunebook.demo.llm.decoder import prefill_batch
    from tunebook.demo.llm.engine import Engine
    from tunebook.demo.llm.loading import load_model

    model = load_model("tiny", random=True, dtype=torch.float32, device="cpu")
    engine = Engine(model.weights, model.tokenizer, ops="torch", max_batch=1, max_model_len=64)
    blocks = engine.cache.allocator.allocate(1)
    assert blocks is not None
    with torch.inference_mode():
        logits = engine.decoder.prefill(prefill_batch([prompt], [blocks], engine.cache.block_size, "cpu"))
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_logprobs_through_the_openai_client(client: Any) -> None:
    """Sampled-token logprobs as the openai client reads them, on both endpoints, whole and
    streamed: every one at most 0; greedy, the sampled token is the top alternative; the
    first token's equal PyTorch's log_softmax of the model's logits."""
    import openai

    prompt = [72, 105, 33]
    reference = first_token_log_softmax(prompt)
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=3
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 2
    assert all(p <= 0 for p in lp.token_logprobs) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 4 and top[token] == logprob == max(top.values())
    values, ids = reference.topk(3)
    assert lp.token_logprobs[0] == pytest.approx(values[0].item(), abs=1e-4)
    expected = {tokenizer_text(int(i)): v for i, v in zip(ids, values.tolist())}
    assert lp.top_logprobs[0] == pytest.approx(expected, abs=1e-4)

    asked = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, temperature=0)
    asked.update(logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(**asked)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 2
    for c in content:
        assert c.logprob <= 0 and c.top_logprobs[0].logprob == c.logprob
        assert c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 2
    chunks = list(client.chat.completions.create(**asked, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(c.token, c.logprob) for c in content]
    with pytest.raises(openai.BadRequestError, match=r"in \[0, 20\]"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21
        )


def test_a_texts_log_likelihood_as_lm_evaluation_harness_asks_for_it(client: Any) -> None:
    """lm-evaluation-harness's ``local-completions`` scores a text with ``echo: true``,
    ``logprobs: 1`` and ``max_tokens`` 1 (or 0) and reads ``token_logprobs`` past the
    context: through the openai client, the prompt's tokens come first (the first with no
    logprob), and their sum is the text's log-likelihood under the model."""
    import torch

    prompt = [72, 105, 33, 32, 65]
    for max_tokens in (1, 0):
        completion = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True
        )
        lp = completion.choices[0].logprobs
        assert completion.choices[0].text.startswith("Hi! A")
        assert len(lp.tokens) == len(prompt) + max_tokens and lp.token_logprobs[0] is None
        assert completion.usage.completion_tokens == max_tokens
    reference = [first_token_log_softmax(prompt[:i])[prompt[i]].item() for i in range(1, len(prompt))]
    assert lp.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    assert sum(lp.token_logprobs[1:]) == pytest.approx(float(torch.tensor(reference).sum()), abs=1e-3)


def test_a_batch_of_token_id_prompts_scored_as_lm_evaluation_harness_sends_it(client: Any) -> None:
    """lm-evaluation-harness's ``local-completions`` with ``batch_size`` over 1 sends ``prompt``
    as a list of token-id lists (``echo``, ``logprobs: 1``, ``max_tokens: 1``) and reads the
    choices by ``index``: through the openai client, a choice per prompt in prompt order,
    each the text and logprobs of its prompt scored alone; the usage summed. It was a 400."""
    prompts = [[72, 105, 33, 32, 65], [66, 67], [1, 2, 3, 4]]
    asked = dict(model=MODEL, max_tokens=1, temperature=0, logprobs=1, echo=True)
    batch = client.completions.create(prompt=prompts, **asked)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch.choices):
        [alone] = client.completions.create(prompt=prompt, **asked).choices
        assert choice.text == alone.text and choice.logprobs.tokens == alone.logprobs.tokens
        assert len(choice.logprobs.tokens) == len(prompt) + 1 and choice.logprobs.token_logprobs[0] is None
        scores, expected = choice.logprobs.token_logprobs[1:], alone.logprobs.token_logprobs[1:]
        assert scores == pytest.approx(expected, abs=1e-4)
    assert batch.usage.prompt_tokens == sum(map(len, prompts)) and batch.usage.completion_tokens == 3


def tokenizer_text(token: int) -> str:
    """A token's name in logprobs (``bytes:\\xNN`` for part of a character)."""
    from tunebook.demo.llm.logprob_texts import token_text
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    return token_text(ByteTokenizer().token_bytes(token))
