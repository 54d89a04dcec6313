"""The server's reading of request bodies, without a server: every refusal names its field."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tunebook.demo.llm.request_fields import BadRequest, chat_messages, sampling_params
from tunebook.demo.llm.server import Front

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 2**64}, "seed"),  # any 64-bit integer is a seed (OpenAI takes negative ones)
        ({"n": 2}, "n"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"logprobs": 21}, "logprobs"),  # past MAX_LOGPROBS
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),  # a count on /v1/completions, not chat's flag
        ({"logprobs": 2.5}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # chat's field: here 'logprobs' is the count
        ({"echo": 1}, "echo"),  # true or false
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"best_of": 4}, "best_of"),
    ],
)
def test_out_of_range_and_unsupported_fields_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as err:
        sampling_params(body, 8)
    assert err.value.param == field and err.value.status == 400 and field in err.value.message


def test_defaults_and_edges() -> None:
    params = sampling_params({"logprobs": None, "echo": False, "tools": [], "best_of": 1, "stop": "END"}, 8)
    assert (params.max_tokens, params.temperature, params.top_p, params.stop) == (8, 1.0, 1.0, ("END",))
    assert 0 < sampling_params({"top_p": 0}, 8).top_p < 1e-6  # 0: the top token alone
    assert sampling_params({"logprobs": False}, 8).logprobs is None  # no count at all
    assert sampling_params({}, 8).logprobs is None
    assert sampling_params({"logprobs": 0, "top_logprobs": 0}, 8, chat=True).logprobs is None  # false


def test_echo_scores_the_prompt_where_logprobs_are_asked() -> None:
    """``echo`` on /v1/completions: the prompt's logprobs with the answer's where ``logprobs``
    is asked, and max_tokens may be 0 (lm-evaluation-harness's log-likelihood: the prompt
    scored alone); chat has no ``echo``."""
    assert sampling_params({"echo": True, "logprobs": 3}, 8).prompt_logprobs == 3
    assert sampling_params({"echo": True}, 8).prompt_logprobs is None  # the text alone
    assert sampling_params({"echo": True}, 0).max_tokens == 0  # a prefill alone, nothing scored
    assert sampling_params({"echo": False, "logprobs": 3}, 8).prompt_logprobs is None
    with pytest.raises(BadRequest) as err:
        sampling_params({"echo": True}, 8, chat=True)
    assert err.value.param == "echo"


def test_logprobs_fields() -> None:
    """/v1/completions' ``logprobs`` is a count of alternatives (0: the sampled token's own
    logprob alone); chat's is a flag, ``top_logprobs`` the count; MAX_LOGPROBS at most."""
    from tunebook.demo.llm.request_fields import MAX_LOGPROBS

    assert MAX_LOGPROBS == 20
    assert [sampling_params({"logprobs": n}, 8).logprobs for n in (0, 5, 20)] == [0, 5, 20]
    chat = [
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
        ({"logprobs": 1, "top_logprobs": 3}, 3),
        ({"logprobs": False, "top_logprobs": 0}, None),
        ({"top_logprobs": None}, None),
    ]
    assert [sampling_params(body, 8, chat=True).logprobs for body, _ in chat] == [n for _, n in chat]
    refused = [
        ({"logprobs": 21}, "'logprobs' must be an integer in [0, 20]", False),
        ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer in [0, 20]", True),
        ({"top_logprobs": 3}, "needs 'logprobs': true", True),
        ({"logprobs": False, "top_logprobs": 1}, "needs 'logprobs': true", True),
        ({"logprobs": 2}, "'logprobs' must be true or false", True),
        ({"logprobs": "yes"}, "'logprobs' must be true or false", True),
    ]
    for body, words, is_chat in refused:
        with pytest.raises(BadRequest) as err:
            sampling_params(body, 8, chat=is_chat)
        assert words in err.value.message and err.value.status == 400, (body, err.value.message)


def test_messages_text_parts_and_roles() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat_messages({"messages": [{"role": "developer", "content": parts}]}) == [
        {"role": "system", "content": "a\nb"}  # joined as vLLM joins them
    ]
    assert chat_messages({"messages": [{"role": "assistant", "content": None}]}) == [
        {"role": "assistant", "content": ""}
    ]
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": None}],
                [{"role": "user", "content": [{"type": "text", "text": None}]}],
                [{"role": "user", "content": [{"type": "image_url"}]}]):  # fmt: skip
        with pytest.raises(BadRequest) as err:
            chat_messages({"messages": bad})
        assert err.value.param == "messages"


def test_text_stream_equals_decoding_everything_and_cutting_at_the_first_stop() -> None:
    """Incremental detokenization with held-back stop prefixes, against the naive rule, on
    random UTF-8 split at random token boundaries."""
    import random

    from tunebook.demo.llm.tokenizer import ByteTokenizer, TextStream

    rng = random.Random(0)
    alphabet = ["a", "b", "E", "N", "D", "é", "漢", " "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stops = rng.choice([[], ["END"], ["ab", "漢a"], ["é"]])
        data = list(text.encode())
        stream, out, i = TextStream(ByteTokenizer(), stops), "", 0
        while i < len(data) and not stream.stopped:
            n = rng.randrange(1, 4)
            out += stream.push(data[i : i + n])
            i += n
        out += stream.finish()
        cut = min([text.find(s) for s in stops if s in text] or [len(text)])
        assert out == text[:cut], (text, stops, out)
        assert stream.stopped == (cut < len(text))


def test_a_prompt_past_the_context_whatever_its_tokens_is_refused_before_it_is_tokenized(
    smollm2: Any,
) -> None:
    """Found by a misuse review: a 19.5 MB prompt was tokenized (seconds of CPU) only to be
    refused for its length. The bound the refusal rests on is never above the real count."""
    from tunebook.demo.llm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    longest = max(vocab, key=lambda t: len(t.encode()))
    texts = ["Hello world", " " * 5000, "<|im_start|>" * 50, "ééé 123456 " * 100, "\n" * 999, "日本語" * 300]
    texts.append(tokenizer.backend.decode([vocab[longest]]))
    for text in texts:
        assert 0 < tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text)), text[:20]

    class Counting:
        calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def encode(self, text: str) -> list[int]:
            Counting.calls += 1
            return tokenizer.encode(text)

    front = Front(SimpleNamespace(tokenizer=Counting(), max_model_len=2048), "m")  # type: ignore[arg-type]
    with pytest.raises(BadRequest) as err:
        front.completion_prompts({"prompt": "word " * 2_000_000})
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    assert "maximum context length is 2048 tokens" in err.value.message and "at least" in err.value.message
    assert Counting.calls == 0
    [(ids, sent)] = front.completion_prompts({"prompt": "word " * 100})
    assert len(ids) >= 100 and sent == "word " * 100 and Counting.calls == 1


def test_of_several_stop_strings_the_earliest_in_the_text_ends_it() -> None:
    """The first stop string of the list that occurred won, not the one that came first."""
    from tunebook.demo.llm.tokenizer import ByteTokenizer, TextStream

    for stops, pushes, text in (
        (["b", "a"], [b"xab"], "x"),
        (["of France", "France"], [b"capital of France is"], "capital "),
        (["ital of", "capital"], [b"the cap", b"ital of"], "the "),  # across pushes
    ):
        stream = TextStream(ByteTokenizer(), stops)
        out = "".join(stream.push(list(p)) for p in pushes) + stream.finish()
        assert out == text and stream.stopped, (stops, out)


def test_a_token_id_of_thousands_of_digits_is_quoted_short() -> None:
    import torch

    from tunebook.demo.llm.config import TINY
    from tunebook.demo.llm.engine import Engine
    from tunebook.demo.llm.loading import random_weights
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    engine = Engine(
        random_weights(TINY, torch.float32, "cpu"), ByteTokenizer(), ops="torch", max_model_len=64
    )
    for prompt in ([10**5000], [int("9" * 4000), 1, 2**70]):
        with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, ") as err:
            engine.submit(prompt, sampling_params({}, 1))
        assert len(str(err.value)) < 300, str(err.value)


def test_messages_past_the_context_are_refused_before_they_are_read_or_rendered() -> None:
    from tunebook.demo.llm.tokenizer import ByteTokenizer

    with pytest.raises(BadRequest) as err:
        chat_messages({"messages": [{"role": "user", "content": "a"}] * 600}, 512)
    assert err.value.code == "context_length_exceeded" and "600 messages" in err.value.message
    front = Front(SimpleNamespace(tokenizer=ByteTokenizer(), max_model_len=512), "m")  # type: ignore[arg-type]
    front.check_messages([{"role": "user", "content": "a" * 300}])  # 300 bytes may fit 512 tokens
    with pytest.raises(BadRequest) as err:
        front.check_messages([{"role": "user", "content": "a" * 300}, {"role": "user", "content": "b" * 300}])
    assert err.value.code == "context_length_exceeded" and "at least 600" in err.value.message
