"""The engine: a decoder, its KV cache, a scheduler and sampling, stepped in a loop.

:meth:`Engine.step` runs one scheduled step (a packed prefill of newly admitted requests,
or a decode of every running one), samples a token per sequence, turns tokens into text,
ends requests (an end-of-text token, a stop string, ``max_tokens``, ``max_model_len``, an
abort) and tells each request's ``on_update``. :meth:`Engine.generate` drives it for a
list of prompts; :meth:`Engine.start` runs it on a background thread for the server,
where requests arrive and leave between steps.

Defaults follow the device: on a GPU bfloat16 and CUDA graphs for decode steps; on a CPU
(Triton's interpreter) float32 and eager steps.

>>> import dataclasses
>>> import torch
>>> from .config import SMOLLM2_135M
>>> from .loading import random_weights
>>> from .tokenizer import ByteTokenizer
>>> tiny = dataclasses.replace(SMOLLM2_135M, layers=1, hidden=64, n_q_heads=2, n_kv_heads=1,
...                            head_size=32, intermediate=64, vocab=300)
>>> engine = Engine(random_weights(tiny, torch.float32, "cpu"), ByteTokenizer(), ops="torch")
>>> [r] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
>>> len(r.output), r.finish_reason
(4, 'length')
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..._compat import interpreting
from .decoder import Decoder, PrefillBatch, prefill_batch
from .graphs import DecodeRunner
from .kv_cache import KVCache, blocks_for
from .loading import Weights
from .ops import Ops, make_ops
from .sampling import SamplingParams, TokenLogprobs, prompt_token_logprobs, sample, token_logprobs
from .scheduler import Request, Scheduler, new_id
from .tokenizer import TextStream, TokenizerLike

log = logging.getLogger("tunebook.demo.llm")

# What a request calls after each step that changed it: (request, new token ids, new text).
OnUpdate = Callable[[Request, list[int], str], None]

__all__ = ["Engine", "default_device", "default_dtype"]


def shown(value: Any, most: int = 200) -> str:
    """``value`` as an error message quotes it: at most ``most`` characters of its repr, an
    integer too long for repr (Python refuses more than 4300 digits; a client may send them)
    by its size, in a list too."""

    def part(v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 4 * most:
            return f"<an integer of about {int(v.bit_length() * 0.30103)} digits>"
        return repr(v)

    try:
        text = f"[{', '.join(map(part, value))}]" if isinstance(value, list) else part(value)
    except ValueError:  # such an integer deeper in a container
        return f"a {type(value).__name__} holding an integer too long to show"
    return text if len(text) <= most else text[:most] + f"... ({len(text)} characters)"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


class Engine:
    """Continuous-batching generation over one model (module docstring)."""

    def __init__(
        self,
        weights: Weights,
        tokenizer: TokenizerLike,
        *,
        ops: str | Ops = "triton",
        max_batch: int = 64,
        max_model_len: int = 2048,
        block_size: int = 16,
        cache_tokens: int | None = None,
        cuda_graphs: bool | None = None,
        max_prefill_tokens: int = 8192,
        seed: int = 0,
    ) -> None:
        config = weights.config
        for name, value in (
            ("max_batch", max_batch),
            ("max_model_len", max_model_len),
            ("block_size", block_size),
        ):
            if value < 1:  # an engine that could never schedule a request would wait forever
                raise ValueError(f"{name} must be at least 1; found {value}")
        if max_model_len > config.max_position:
            raise ValueError(
                f"max_model_len={max_model_len} is more than {config.name}'s {config.max_position} positions"
            )
        self.weights = weights
        self.tokenizer = tokenizer
        self.ops = make_ops(ops) if isinstance(ops, str) else ops
        self.device = weights.device
        on_gpu = self.device.type == "cuda"
        self.cuda_graphs = on_gpu if cuda_graphs is None else bool(cuda_graphs and on_gpu)
        self.max_model_len = max_model_len
        # By default max_batch requests of max_model_len tokens fit at once; each reserves
        # whole blocks, so a max_model_len that is no multiple of the block size costs its
        # last block in full.
        per_request = blocks_for(max_model_len, block_size) * block_size
        tokens = cache_tokens if cache_tokens is not None else max_batch * per_request
        self.cache = KVCache.sized(
            config,
            tokens=max(tokens, max_model_len),
            block_size=block_size,
            dtype=weights.dtype,
            device=self.device,
        )
        self.decoder = Decoder(weights, self.cache, self.ops, max_position=max_model_len)
        self.runner = DecodeRunner(self.decoder, max_batch, max_model_len, self.cuda_graphs)
        self.scheduler = Scheduler(
            self.cache.allocator,
            block_size=block_size,
            max_batch=max_batch,
            max_model_len=max_model_len,
            max_prefill_tokens=max_prefill_tokens,
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps = {"prefill": 0, "decode": 0}
        # Steps that failed (raised), failed steps every request of which then ran alone, and
        # requests ended with "error": /stats shows them (a recovered one only logs otherwise).
        self.failures = {"steps": 0, "recovered_steps": 0, "requests": 0}
        self.decode_batches: Counter[int] = Counter()  # decode steps by batch size
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, list[int], str], None] | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request (any thread). Raises ValueError if it can never run."""
        request = self.request(prompt, params, on_update, request_id)
        self.queue([request])
        return request

    def request(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_update: OnUpdate | None,
        request_id: str | None,
    ) -> Request:
        """A request, checked but not queued (:meth:`queue` queues it, with others). Raises
        ValueError if it can never run."""
        vocab = self.weights.config.vocab
        ids = [int(t) for t in prompt]
        # min and max first: a batch's 256 prompts of 8k ids are checked on the event loop.
        if ids and not (min(ids) >= 0 and max(ids) < vocab):
            bad = [t for t in ids if not 0 <= t < vocab]
            raise ValueError(f"prompt token ids must be in [0, {vocab}); found {shown(bad[:5])}")
        request = Request(request_id or new_id(), ids, params, on_update)
        self.scheduler.check(request)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request.stream = TextStream(self.tokenizer, params.stop)
        return request

    def queue(self, requests: list[Request]) -> None:
        """Queue requests made by :meth:`request` together (any thread): the next step sees
        all of them or none, so a client's batch shares its prefill where the limits allow."""
        self.scheduler.add_all(requests)
        with self._wake:
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free its cache (any thread)."""
        self.scheduler.abort(request_id)
        with self._wake:
            self._wake.notify()

    # ------------------------------------------------------------------ stepping

    def step(self) -> bool:
        """Run one step; False when there was nothing to do.

        A step that raises ends with "error" only the requests it ran (a failed prefill's
        admitted requests, a failed decode's batch), whose blocks go back; waiting requests,
        and running ones a failed prefill did not touch, go on. The requests of a failed
        prefill of several are first run again one at a time, so that one prompt that cannot
        run (a shape that fails, a long one that runs out of memory) does not take its
        batch-mates with it (one aborted meanwhile ends then, and does not run again). Where
        that ended any request with "error", the step's exception is raised again; where
        every one of them then ran, the step succeeded (logged as a warning, with the
        failure's traceback) and nothing is raised. Each failed request's
        :attr:`Request.error` is the failure that ended it (the server names it to that
        request's client); :attr:`error` is the latest that ended any request."""
        plan = None
        try:
            self._end_aborted()
            plan = self.scheduler.schedule()
            if plan is None:
                return False
            self._run(*plan)
        except BaseException as exc:
            if not self._recover(plan, exc, retry=isinstance(exc, Exception)):  # no retry after a Ctrl-C
                self.failures["steps"] += 1
                raise
            self.failures["recovered_steps"] += 1
            # Every request went on: nothing else tells of the failure (a kernel that fails
            # only in a pack), so its traceback is logged here.
            log.warning(
                "a prefill of several requests failed (%r); each of them then ran alone", exc, exc_info=exc
            )
        return True

    def _run(self, kind: str, batch: list[Request]) -> None:
        with torch.inference_mode():
            if kind == "prefill":
                prefill = prefill_batch(
                    [r.prompt for r in batch], [r.blocks for r in batch], self.cache.block_size, self.device
                )
                if any(r.params.prompt_logprobs is not None for r in batch):
                    logits = self._scored_prefill(prefill, batch)
                else:
                    logits = self.decoder.prefill(prefill)
            else:
                logits = self.runner.step(
                    [r.output[-1] for r in batch], [r.context - 1 for r in batch], [r.blocks for r in batch]
                )
            tokens = sample(logits, [r.params for r in batch], self.generator, [r.generator for r in batch])
            # Only over the rows that asked (none: nothing runs), from the logits as made; not
            # for a prefill alone (max_tokens 0), whose token is not kept.
            asked = [r.params.logprobs if r.params.max_tokens else None for r in batch]
            logprobs = token_logprobs(logits, tokens, asked)
            new = tokens.tolist()  # waits for the GPU: the next step needs these tokens
        self.steps[kind] += 1
        if kind == "decode":
            self.decode_batches[len(batch)] += 1
        for request, token, lp in zip(batch, new, logprobs):
            if request.params.max_tokens == 0:  # a prefill alone (an echo's): nothing generated
                request.text += request.stream.finish()
                self.scheduler.finish(request, "length")
                self._notify(request, [], "")
            else:
                self._advance(request, int(token), lp)

    def _scored_prefill(self, prefill: PrefillBatch, batch: list[Request]) -> torch.Tensor:
        """A prefill where some requests score their prompts: the logits of each prompt's
        last token, as :meth:`Decoder.prefill` gives them, and each scoring request's
        :attr:`Request.prompt_logprobs` from the final states of its other tokens (made
        into logits a few hundred rows at a time, not the whole prompt's at once)."""
        rows: list[int] = []
        last: list[int] = []
        spans: list[tuple[Request, int, int]] = []  # a scoring request, where its rows start, how many
        start = 0
        for request, n in zip(batch, prefill.seq_lens):
            if request.params.prompt_logprobs is not None:
                spans.append((request, len(rows), n))
                rows.extend(range(start, start + n))
            else:
                rows.append(start + n - 1)
            last.append(len(rows) - 1)
            start += n
        states = self.decoder.prefill_states(prefill, torch.tensor(rows, device=self.device))
        for request, at, n in spans:
            request.prompt_logprobs = prompt_token_logprobs(
                self.decoder.head,
                states[at : at + n - 1],
                request.prompt,
                request.params.prompt_logprobs or 0,
            )
        return self.decoder.head(states[torch.tensor(last, device=self.device)])

    def _recover(self, plan: tuple[str, list[Request]] | None, exc: BaseException, retry: bool) -> bool:
        """End the requests of a failed step with "error", after running a failed prefill's
        requests again alone where ``retry`` (step's docstring). True where they were run
        again and every one of them ran: the step recovered, and none ended."""
        if plan is None:
            # The queues themselves failed: nothing says whose step it was, and stepping on
            # would fail the same way at once; end every request rather than spin.
            self._fail([*self.scheduler.running, *self.scheduler.take_waiting()], exc)
            return False
        kind, batch = plan
        failed = [r for r in batch if not r.finished]
        alone: list[Request] = []
        if retry and kind == "prefill" and len(failed) > 1:
            # One with a token already had its prefill, and the step failed after it (in
            # detokenizing): a second prefill would write a second token at its position.
            alone = [r for r in failed if not r.output]
        ended = [r for r in failed if r not in alone]
        self._fail(ended, exc)
        retried = bool(alone)
        if alone:
            # Those aborted meanwhile (a client gone) end now, not after a prefill of their own.
            self._end_aborted()
            alone = [r for r in alone if not r.finished]
        for i, request in enumerate(alone):
            try:
                self._run("prefill", [request])
            except Exception as again:
                log.exception("the prefill of request %s alone failed too", request.id)
                self._fail([request], again)
                ended.append(request)
            except BaseException as again:  # a Ctrl-C: none of the rest runs, nor stays running
                self._fail(alone[i:], again)
                raise
        return retried and not ended

    def _end_aborted(self) -> None:
        for request in self.scheduler.take_aborted():
            request.finish_reason = "abort"
            self._notify(request, [], "")

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        self.failures["requests"] += len(requests)
        for request in requests:
            self.error = request.error = exc
            self.scheduler.finish(request, "error")
            self._notify(request, [], "")

    def _advance(self, request: Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.output.append(token)
        if logprobs is not None:
            # Where its text starts: the complete characters decoded before it (a sum of
            # token texts would count a token holding half a character as a whole one).
            request.logprobs.append(dataclasses.replace(logprobs, text_offset=request.stream.decoded))
        eos = token in self.tokenizer.eos_ids and not request.params.ignore_eos
        delta = "" if eos else request.stream.push([token])
        reason = None
        if eos or request.stream.stopped:
            reason = "stop"
        elif len(request.output) >= request.params.max_tokens or request.context >= self.max_model_len:
            reason = "length"
        if reason is not None:
            delta += request.stream.finish()
            if request.stream.stopped:
                # The stop string completed in a token ending in half a character, whose
                # text the stream held back until now: the text ends at a stop string.
                reason = "stop"
            self.scheduler.finish(request, reason)
        request.text += delta
        self._notify(request, [token], delta)

    def _notify(self, request: Request, tokens: list[int], delta: str) -> None:
        if request.on_update is not None:
            try:
                request.on_update(request, tokens, delta)
            except Exception:  # a listener's bug must not stop the other requests
                log.exception("on_update of request %s raised", request.id)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Request]:
        """Generate for every prompt together (continuous batching); the finished requests."""
        requests = [self.submit(p, params) for p in prompts]
        while not all(r.finished for r in requests):
            if not self.step():
                raise RuntimeError("the engine stopped with unfinished requests")
        return requests

    # ------------------------------------------------------------------ background loop

    def start(self) -> None:
        """Step on a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tunebook-llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the background loop to stop after its step in progress, and wait for it at
        most ``timeout`` seconds (None: until it has); True once it has stopped. The thread
        is a daemon: a process may exit while a step of minutes runs on."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException:  # step ended the failed step's requests with "error"
                log.exception("engine step failed")

    def describe(self) -> dict[str, Any]:
        c = self.weights.config
        return {
            "model": c.name,
            "layers": c.layers,
            "ops": self.ops.name,
            "dtype": str(self.weights.dtype).removeprefix("torch."),
            "device": str(self.device),
            "cuda_graphs": self.cuda_graphs,
            "max_model_len": self.max_model_len,
            "cache_blocks": self.cache.num_blocks,
            "free_blocks": self.cache.allocator.free_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
