"""The engine on the CPU interpreter: the Triton decoder against Hugging Face's Llama, and
continuous batching, stop conditions and sampling on a tiny random model."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import pytest
import torch

from tunebook.demo.llm.config import TINY
from tunebook.demo.llm.engine import Engine
from tunebook.demo.llm.loading import random_weights, weights_from_state_dict
from tunebook.demo.llm.reference import hf_greedy, hf_model
from tunebook.demo.llm.sampling import SamplingParams
from tunebook.demo.llm.tokenizer import ByteTokenizer, Tokenizer

from .conftest import REAL_LAYERS

# The LLM demo, built on the pack's kernels (each checked against PyTorch on every Triton,
# tests/pack) and tunebook's serve mode: last Triton only (tests/conftest.py).
pytestmark = pytest.mark.once

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "2 + 2 =",
    "List three colors:",
]


def tiny_engine(ops: Any = "torch", **kwargs: Any) -> Engine:
    """The tiny random model; PyTorch ops where a test is about the engine, not the kernels
    (the interpreter's kernels take a second a step even here)."""
    weights = random_weights(TINY, torch.float32, "cpu", seed=1)
    return Engine(weights, ByteTokenizer(), ops=ops, **{"max_batch": 4, "max_model_len": 128, **kwargs})


def chat_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.chat_prompt([{"role": "user", "content": text}]))


# ------------------------------------------------------------------ against transformers


@pytest.mark.slow
def test_triton_engine_matches_hf_llama_on_smollm2_cut_to_two_layers(smollm2: Any) -> None:
    """Four chat prompts batched together, greedy, 4 tokens each: the same tokens as HF's
    LlamaForCausalLM (eager, fp32) with the same dequantized weights, and first-token
    logits within 2e-3 (fp32; the kernels sum in another order than PyTorch's matmul). On
    the interpreter each step reads the 49152 x 576 output projection element by element
    (seconds), hence two layers and four tokens; the full model is compared on a GPU by
    benchmarks/decoder.py --check."""
    config = smollm2.config.cut(REAL_LAYERS)
    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    weights = weights_from_state_dict(config, smollm2.state_dict, torch.float32, "cpu")
    engine = Engine(weights, tokenizer, max_batch=4, max_model_len=256)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    logits: dict[int, torch.Tensor] = {}
    decode = engine.decoder.prefill

    def keep(batch: Any) -> torch.Tensor:
        out = decode(batch)
        logits.update(enumerate(out))
        return out

    engine.decoder.prefill = keep  # type: ignore[method-assign]
    results = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    reference = hf_model(config, smollm2.state_dict)
    for i, (prompt, request) in enumerate(zip(prompts, results)):
        tokens, first = hf_greedy(reference, prompt, 4)
        assert request.output == tokens, f"prompt {i}: {request.output} != HF {tokens}"
        torch.testing.assert_close(logits[i], first, atol=2e-3, rtol=0)
    assert engine.steps == {"prefill": 1, "decode": 3}


@pytest.mark.slow
def test_engine_on_the_full_smollm2_writes_what_hf_writes_for_32_tokens(smollm2: Any) -> None:
    """The whole model (30 layers), 4 prompts x 32 greedy tokens, batched with paging and
    continuous batching, equals HF token for token. PyTorch ops stand in for the kernels
    (``ops="torch"``): the interpreter would take hours; this checks the engine, the loader
    and the tokenizer on the real model, the test above the kernels."""
    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    weights = weights_from_state_dict(smollm2.config, smollm2.state_dict, torch.float32, "cpu")
    engine = Engine(weights, tokenizer, ops="torch", max_batch=4, max_model_len=256)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    results = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    reference = hf_model(smollm2.config, smollm2.state_dict)
    for prompt, request in zip(prompts, results):
        assert request.output == hf_greedy(reference, prompt, 32)[0]
    # Coherent text: the model answers the first question.
    assert "Paris" in tokenizer.decode(results[0].output)


@pytest.mark.slow
def test_gguf_weights_equal_transformers_gguf_loader(smollm2: Any) -> None:
    """The dequantized, unpermuted weights equal what transformers' own GGUF loader makes
    of the file: an independent check of the names and of undoing llama.cpp's q/k row
    permutation (a wrong permutation still generates, only worse)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tunebook.demo.llm.loading import gguf_path

    path = str(gguf_path())
    parsed = load_gguf_checkpoint(path, return_tensors=False)["config"]
    fields = {
        k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path", "architectures")
    }
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**fields))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    for name in ("model.embed_tokens.weight", "model.norm.weight", *(n for n in theirs if ".layers.0." in n)):
        assert torch.equal(smollm2.state_dict[name], theirs[name].float()), name


@pytest.mark.slow  # reading the GGUF file takes ~5 s
def test_tokenizer_and_chat_template_from_gguf_metadata(smollm2: Any) -> None:
    tokenizer = Tokenizer.from_gguf(smollm2.metadata)
    # Ids from transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(gguf_file=...)).
    text = "Hello world 12345, what's up?"
    assert tokenizer.encode(text) == [19556, 905, 216, 33, 34, 35, 36, 37, 28, 732, 506, 614, 47]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt)
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>: one token each
    assert tokenizer.eos_ids == {0, 2}


# ------------------------------------------------------------------ the engine's behaviour


@pytest.mark.slow  # ~5 s: every kernel of the pack in the interpreter, a few steps
def test_triton_and_torch_engines_agree_on_the_tiny_model() -> None:
    """Prefill and decode steps through every kernel of the pack, batched, ragged."""
    prompts = [[5, 6, 7], [9] * 20, [1, 2]]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    triton_out = [r.output for r in tiny_engine("triton").generate(prompts, params)]
    torch_out = [r.output for r in tiny_engine("torch").generate(prompts, params)]
    assert triton_out == torch_out


@pytest.mark.slow
def test_a_cache_of_8_token_blocks_writes_what_16_token_blocks_write() -> None:
    """``block_size`` (the server's ``--block-size``) reaches the cache, the scheduler and
    every kernel that addresses the cache: the Triton engine on 8-token blocks, prompts
    crossing several, writes what the PyTorch one on 16-token blocks writes."""
    prompts = [[5, 6, 7], [9] * 20, [1, 2] * 6]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine = tiny_engine("triton", block_size=8)
    assert engine.cache.block_size == 8
    eights = [r.output for r in engine.generate(prompts, params)]
    sixteens = [r.output for r in tiny_engine("torch").generate(prompts, params)]
    assert eights == sixteens


def test_requests_join_and_leave_between_steps() -> None:
    """A request that arrives while another decodes joins the next steps' batch, leaves
    when done, and gets the tokens it gets alone."""
    alone = {tuple(p): tiny_engine().generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].output
             for p, n in (([3, 4, 5], 6), ([7, 8], 2))}  # fmt: skip
    engine = tiny_engine()
    first = engine.submit([3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()
    second = engine.submit([7, 8], SamplingParams(max_tokens=2, ignore_eos=True))
    while not first.finished:
        engine.step()
    assert first.output == alone[(3, 4, 5)] and second.output == alone[(7, 8)]
    assert engine.decode_batches[2] >= 1 and engine.decode_batches[1] >= 1
    assert engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1  # all given back


def test_stop_tokens_max_tokens_and_max_model_len() -> None:
    engine = tiny_engine()
    [free] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))
    stop_at = free.output[2]
    engine.tokenizer.eos_ids = frozenset({stop_at})  # type: ignore[misc]
    [stopped] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
    assert stopped.output == free.output[: free.output.index(stop_at) + 1] and stopped.finish_reason == "stop"
    [long] = engine.generate([[1] * 120], SamplingParams(max_tokens=100, ignore_eos=True))
    assert long.finish_reason == "length" and long.context == 128  # max_model_len


def test_stop_strings_end_the_text() -> None:
    engine = tiny_engine()
    [free] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))
    stop = free.text[2:4]
    [stopped] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, stop=(stop,), ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy() -> None:
    engine = tiny_engine()
    greedy = engine.generate([[4, 5]], SamplingParams(max_tokens=6, ignore_eos=True))[0].output
    nucleus = engine.generate(
        [[4, 5]], SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, ignore_eos=True)
    )
    assert nucleus[0].output == greedy
    hot = SamplingParams(max_tokens=6, temperature=2.0, seed=7, ignore_eos=True)
    a, b = engine.generate([[4, 5], [4, 5]], hot)
    assert a.output == b.output != greedy


def test_a_request_waits_for_cache_and_abort_frees_it() -> None:
    engine = tiny_engine(cache_tokens=128)  # 8 blocks of 16 tokens
    big = engine.submit([1] * 10, SamplingParams(max_tokens=110, ignore_eos=True))  # 120 tokens: 8 blocks
    small = engine.submit([2] * 3, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.scheduler.running == [big] and list(engine.scheduler.waiting) == [small]
    engine.abort(big.id)
    engine.step()  # the abort frees big's blocks; small is admitted and prefilled
    assert big.finish_reason == "abort" and small.output and engine.scheduler.running == [small]
    with pytest.raises(ValueError, match="max_model_len"):
        engine.submit([1] * 128, SamplingParams(max_tokens=1))


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_goes_on() -> None:
    from tunebook.demo.llm.ops import TorchOps

    class Flaky(TorchOps):
        fail = True

        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("injected")
            return super().silu_and_mul(x)

    engine = tiny_engine(Flaky())  # type: ignore[arg-type]
    engine.start()
    try:
        failed = engine.submit([1, 2], SamplingParams(max_tokens=2))
        deadline = time.monotonic() + 30
        while not failed.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert failed.finish_reason == "error" and "injected" in repr(engine.error)
        later = engine.submit([1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
        while not later.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert later.finish_reason == "length" and len(later.output) == 2
    finally:
        engine.stop()


def test_a_failed_prefill_fails_only_the_prompt_that_cannot_run() -> None:
    """A prefill that raises (here: any of over 50 tokens, as a long pack that runs out of
    memory) is run again one request at a time: the prompt that cannot run ends with an
    error, its batch-mates start; a request that was decoding and one waiting for room in
    the batch are not touched, and every request then writes what it writes alone."""
    from tunebook.demo.llm.ops import TorchOps

    class LongPrefillFails(TorchOps):
        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 50:
                raise RuntimeError("out of memory (injected)")
            return super().silu_and_mul(x)

    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = {"decoding": [3, 4, 5], "mate": [7, 8], "other mate": [5, 6, 7], "waiting": [4]}
    alone = {name: tiny_engine().generate([p], params)[0].output for name, p in prompts.items()}
    engine = tiny_engine(LongPrefillFails())  # type: ignore[arg-type]
    decoding = engine.submit(prompts["decoding"], params)
    engine.step()
    engine.step()
    bad = engine.submit([9] * 60, params)
    mates = [engine.submit(prompts[name], params) for name in ("mate", "other mate")]
    waiting = engine.submit(prompts["waiting"], params)  # max_batch is 4: it waits for room
    engine.start()  # as the server runs it: the next step is the prefill of bad + mates
    try:
        requests = {"decoding": decoding, "mate": mates[0], "other mate": mates[1], "waiting": waiting}
        deadline = time.monotonic() + 30
        while not all(r.finished for r in [bad, *requests.values()]) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert bad.finish_reason == "error" and "injected" in repr(engine.error)
    assert {name: (r.finish_reason, r.output) for name, r in requests.items()} == {
        name: ("length", alone[name]) for name in prompts
    }
    assert engine.steps["prefill"] == 4  # decoding's, the pack's two alone (bad's failed), waiting's
    assert engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1  # bad's came back too


def test_a_failed_prefill_whose_requests_all_run_alone_is_no_failure() -> None:
    """A pack that fails once (a transient error, memory for the pack alone) and whose
    requests then all run alone: the step succeeded. It used to raise the pack's error
    anyway (the server's loop logged a failed step; a caller of ``step`` saw an exception
    though no request failed) and to leave it as :attr:`Engine.error`."""
    from tunebook.demo.llm.ops import TorchOps

    class PackFailsOnce(TorchOps):
        failed = False

        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if not self.failed and x.shape[0] > 3:  # the pack's 5 tokens; alone, 2 and 3
                self.failed = True
                raise RuntimeError("out of memory (injected)")
            return super().silu_and_mul(x)

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = [[1, 2], [3, 4, 5]]
    alone = [tiny_engine().generate([p], params)[0].output for p in prompts]
    ops = PackFailsOnce()
    engine = tiny_engine(ops)  # type: ignore[arg-type]
    requests = [engine.submit(p, params) for p in prompts]
    assert engine.step() is True  # the pack failed, each prompt then ran alone: no exception
    assert ops.failed and engine.error is None
    assert [(r.finish_reason, r.error, len(r.output)) for r in requests] == [(None, None, 1)] * 2
    while engine.step():
        pass
    assert [(r.finish_reason, r.output) for r in requests] == [("length", out) for out in alone]
    assert engine.steps["prefill"] == 2 and engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1
    assert engine.failures == {"steps": 0, "recovered_steps": 1, "requests": 0}  # /stats shows it


def test_a_recovered_prefill_logs_the_failures_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A pack that fails and whose requests all run alone is logged as a warning with the
    failure's traceback: nothing else tells of it (a kernel that fails only in a pack). The
    warning held the error's repr alone."""
    from tunebook.demo.llm.ops import TorchOps

    class PackFailsOnce(TorchOps):
        failed = False

        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if not self.failed and x.shape[0] > 3:
                self.failed = True
                raise RuntimeError("a kernel that fails in a pack (injected)")
            return super().silu_and_mul(x)

    engine = tiny_engine(PackFailsOnce())  # type: ignore[arg-type]
    for prompt in ([1, 2], [3, 4, 5]):
        engine.submit(prompt, SamplingParams(max_tokens=2))
    with caplog.at_level(logging.WARNING, logger="tunebook.demo.llm"):
        assert engine.step() is True
    [record] = [r for r in caplog.records if "ran alone" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert "a kernel that fails in a pack" in str(record.exc_info[1])
    assert "silu_and_mul" in caplog.text  # the traceback, to the failing frame


def test_a_request_aborted_while_its_pack_failed_is_not_prefilled_again() -> None:
    """A client that goes away while its pack's prefill fails: its request ends with
    "abort" before the retry, and only the others run again alone. It was prefilled again
    alone (a long prompt's prefill, maybe the memory that failed), then aborted."""
    from tunebook.demo.llm.ops import TorchOps

    class PackFails(TorchOps):
        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 3:  # the pack's 5 tokens; alone, 2 and 3
                engine.abort(gone.id)  # its client disconnects meanwhile
                raise RuntimeError("out of memory (injected)")
            return super().silu_and_mul(x)

    engine = tiny_engine(PackFails())  # type: ignore[arg-type]
    told: list[tuple[str, str | None]] = []
    gone, kept = (
        engine.submit(p, SamplingParams(max_tokens=2), lambda r, t, d: told.append((r.id, r.finish_reason)))
        for p in ([1, 2], [3, 4, 5])
    )
    assert engine.step() is True
    assert (gone.finish_reason, gone.output, gone.error) == ("abort", [], None)
    assert (kept.finish_reason, len(kept.output)) == (None, 1)
    assert engine.steps["prefill"] == 1  # kept's alone: gone's never ran again
    assert (gone.id, "abort") in told and engine.error is None
    while engine.step():
        pass
    assert kept.finish_reason == "length"
    assert engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1


def test_each_failed_request_keeps_its_own_error() -> None:
    """A pack of two whose prompts both fail alone, each with its own error: each request
    holds the error that ended it (the server's 500 names it), not the engine's latest."""
    from tunebook.demo.llm.ops import TorchOps

    class Fails(TorchOps):
        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(f"a prefill of {x.shape[0]} tokens (injected)")

    engine = tiny_engine(Fails())  # type: ignore[arg-type]
    short, long = engine.submit([1, 2], SamplingParams()), engine.submit([3, 4, 5], SamplingParams())
    with pytest.raises(RuntimeError, match="5 tokens"):  # the pack's
        engine.step()
    assert (short.finish_reason, long.finish_reason) == ("error", "error")
    assert "2 tokens" in repr(short.error) and "3 tokens" in repr(long.error)
    assert engine.error is long.error  # the latest
    assert engine.failures == {"steps": 1, "recovered_steps": 0, "requests": 2}


def test_a_failed_decode_fails_its_batch_and_not_the_requests_waiting() -> None:
    from tunebook.demo.llm.ops import TorchOps

    class Failing(TorchOps):
        fail = False

        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise RuntimeError("injected")
            return super().silu_and_mul(x)

    ops = Failing()
    engine = tiny_engine(ops, max_batch=2)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    batch = [engine.submit([1, 2], params), engine.submit([3], params)]
    waiting = engine.submit([4, 5], params)
    engine.step()
    ops.fail = True
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()  # a decode of the batch: the waiting request has no room yet
    assert [r.finish_reason for r in batch] == ["error", "error"] and not waiting.finished
    ops.fail = False
    while engine.step():
        pass
    assert waiting.finish_reason == "length" and len(waiting.output) == 3
    assert engine.cache.allocator.free_blocks == engine.cache.num_blocks - 1


def test_logprobs_are_the_raw_log_softmax_of_each_steps_logits_for_the_rows_that_asked() -> None:
    """A request with ``logprobs`` gets, per token, the log-probability of the sampled token
    and of the most likely ones: ``log_softmax`` of the step's logits (prefill and decode),
    before temperature; the request beside it that did not ask gets none, and asking
    changes no token."""
    engine = tiny_engine()
    steps: list[torch.Tensor] = []
    prefill, decode = engine.decoder.prefill, engine.runner.step

    def keep(run: Any) -> Any:
        def kept(*args: Any) -> torch.Tensor:
            logits = run(*args)
            steps.append(logits.clone())
            return logits

        return kept

    engine.decoder.prefill, engine.runner.step = keep(prefill), keep(decode)  # type: ignore[method-assign]
    greedy = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=4)
    hot = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=0, temperature=1.5, seed=3)
    plain = SamplingParams(max_tokens=3, ignore_eos=True)
    asked, sampled, silent = (
        engine.submit([3, 4, 5], greedy),
        engine.submit([6, 7], hot),
        engine.submit([8], plain),
    )
    while engine.step():
        pass
    assert len(steps) == 3 and not silent.logprobs  # a prefill, two decodes
    for row, request in enumerate((asked, sampled)):
        assert [e.token for e in request.logprobs] == request.output
        for logits, entry in zip(steps, request.logprobs):
            reference = torch.log_softmax(logits[row].float(), dim=-1)  # no temperature
            assert (
                entry.logprob == pytest.approx(reference[entry.token].item(), abs=1e-5) and entry.logprob <= 0
            )
            values, ids = reference.topk(request.params.logprobs or 0)
            assert [i for i, _ in entry.top] == ids.tolist()
            assert [p for _, p in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert all(e.top[0] == (e.token, e.logprob) for e in asked.logprobs)  # greedy: the top one
    again = tiny_engine().generate([[3, 4, 5], [6, 7]], dataclasses.replace(greedy, logprobs=None))
    assert again[0].output == asked.output
    [alone] = tiny_engine().generate([[6, 7]], dataclasses.replace(hot, logprobs=None))
    assert alone.output == sampled.output  # the same seed draws the same tokens


def test_new_requests_at_every_step_do_not_stall_a_running_one() -> None:
    """Prefills go first, but a request arriving before every step (each ending at its
    prefill: max_tokens 1, as a classifier's traffic) stalls no running request: it gets a
    token at least every second step, and each new one is prefilled after at most one
    decode step."""
    engine = tiny_engine()
    running = engine.submit([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    waits, steps_without_token, idle = [], [], 0
    for _ in range(20):
        new = engine.submit([7, 8, 9], SamplingParams(max_tokens=1))
        steps = 0
        while not new.finished:
            tokens = len(running.output)
            engine.step()
            steps += 1
            idle = 0 if len(running.output) > tokens else idle + 1
            steps_without_token.append(idle)
        waits.append(steps)
    assert max(steps_without_token) == 1 and len(running.output) == 20
    assert max(waits) == 2


@pytest.mark.parametrize(("max_model_len", "block_size"), [(100, 16), (100, 8), (128, 16)])
def test_the_default_cache_runs_max_batch_requests_of_max_model_len_at_once(
    max_model_len: int, block_size: int
) -> None:
    """Each request reserves whole blocks: where the block size does not divide
    max_model_len, a cache of max_batch x max_model_len tokens held one request fewer."""
    engine = tiny_engine(max_model_len=max_model_len, block_size=block_size)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    requests = [engine.submit([3] * (max_model_len - 2), params) for _ in range(4)]
    engine.step()
    assert len(engine.scheduler.running) == 4 and not engine.scheduler.waiting
    while engine.step():
        pass
    assert all(r.finish_reason == "length" for r in requests) and engine.decode_batches == {4: 1}


def test_a_stop_string_in_the_last_token_ends_with_stop_though_the_token_ends_in_half_a_character() -> None:
    """The stream holds back the text of a token ending in half a character; when that token
    completes a stop string and is the last one allowed (max_tokens, max_model_len), the
    text ends at the stop string, and so does the finish reason."""

    class HalfCharacters(ByteTokenizer):
        def decode(self, ids: Any) -> str:  # every token: "ok Q: " and 2 of the 3 bytes of "€"
            return (b"ok Q: \xe2\x82" * len(ids)).decode(errors="replace")

    engine = tiny_engine()
    engine.tokenizer = HalfCharacters()
    stop = SamplingParams(max_tokens=1, stop=("Q: ",))
    [plain] = engine.generate([[1, 2]], SamplingParams(max_tokens=1))
    [by_max_tokens] = engine.generate([[1, 2]], stop)
    [by_max_model_len] = engine.generate([[1] * 127], dataclasses.replace(stop, max_tokens=5))
    assert (plain.text, plain.finish_reason) == ("ok Q: \ufffd", "length")
    assert (by_max_tokens.text, by_max_tokens.finish_reason) == ("ok ", "stop")
    assert (by_max_model_len.text, by_max_model_len.finish_reason) == ("ok ", "stop")


def test_greedys_token_is_the_top_alternative_when_logits_tie() -> None:
    """Two ids of one logit: greedy's argmax and topk may pick different ones; the sampled
    token is listed first among the ids of its value, so a client reads it as the top one."""
    from tunebook.demo.llm.sampling import token_logprobs

    logits = torch.zeros(1, 64)
    logits[0, 40] = logits[0, 7] = 5.0
    for chosen in (7, 40):
        [entry] = token_logprobs(logits, torch.tensor([chosen]), [3])
        assert entry is not None and entry.top[0] == (chosen, entry.logprob)
        assert {t for t, _ in entry.top[:2]} == {7, 40} and len(entry.top) == 3
