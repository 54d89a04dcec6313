"""``python -m tunebook.demo.llm generate "PROMPT"`` as a user runs it: a new process that
loads the model, runs the engine on the pack's kernels and prints the completion; a bad
value ends the command with one line and status 2, not a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tunebook.demo.llm.__main__ import main

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once


def generate(tmp_path: Path, *args: str, interpret: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNEBOOK_DIR": str(tmp_path / "book")}
    env.pop("TUNEBOOK_MODE", None)  # the command sets serve mode itself
    if not interpret:
        env.pop("TRITON_INTERPRET", None)  # without a GPU the command re-executes itself with it
    command = [sys.executable, "-m", "tunebook.demo.llm", "generate", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # ~9 s: two Python start-ups (the re-execution) and three interpreted steps
def test_generate_prints_a_completion_from_the_books_without_tuning(tmp_path: Path) -> None:
    """The tiny model (random weights: its text is noise, but text) through the chat
    template, three greedy tokens on the Triton kernels in ``serve`` mode."""
    proc = generate(
        tmp_path, "What is the capital of France?", "--model", "tiny", "--random", "--max-tokens", "3",
        interpret=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), f"no completion printed; stderr:\n{proc.stderr}"
    summary = proc.stderr.strip().splitlines()[-1]
    expected = (
        r"\[3 tokens in [\d.]+ s \(length\); triton kernels; tunebook: 0 configs benchmarked, \d+ fallbacks\]"
    )
    assert re.fullmatch(expected, summary), summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature must be in [0, 100]; found -1.0"),
        (["--max-tokens", "0"], "max_tokens must be at least 1; found 0"),  # not "the default"
        (["--model", "tiny", "--random", "--max-batch", "0"], "max_batch must be at least 1; found 0"),
        (["--model", "tiny", "--random", "--block-size", "0"], "block_size must be at least 1; found 0"),
    ],
)
def test_a_bad_value_is_one_line_and_a_non_zero_status(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (the command's own ``main``; under the interpreter already, so it
    does not re-execute): the exit status and stderr a shell sees."""
    with pytest.raises(SystemExit) as exited:
        main(["generate", "hi", *args])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"python -m tunebook.demo.llm: error: {message}"] and out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "80000"], "--port: expected 0-65535; found 80000"),
        (["generate", "hi", "--gguf", "{tmp}"], "--gguf: expected a .gguf file; {tmp} is a directory"),
        (["generate", "hi", "--gguf", "{tmp}/notes.txt"], "{tmp}/notes.txt is not a GGUF model file"),
        (["tune", "--out", "{tmp}/notes.txt/book"], "cannot write the book at {tmp}/notes.txt/book"),
        # once read after the model loaded and every prefill was tuned: minutes, then a traceback
        (["tune", "--out", "{tmp}/b", "--batches", "1,x"], "--batches: expected comma-separated positive"),
        (["tune", "--out", "{tmp}/b", "--prefills", "abc"], "--prefills: expected comma-separated positive"),
        (["tune", "--out", "{tmp}/b", "--contexts", "0"], "--contexts: expected comma-separated positive"),
    ],
)
def test_a_wrong_path_or_port_is_one_line_before_any_work(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Caught before the model loads or a kernel is tuned (a port out of range once failed
    only after the model had loaded; an unwritable --out let a tuning run to its end)."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit) as exited:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
        raise SystemExit(code)
    assert exited.value.code == 2
    _, err = capsys.readouterr()
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err


def test_a_mode_tunebook_does_not_know_is_one_line_naming_this_commands_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNEBOOK_MODE", "serv")
    assert main(["generate", "hi"]) == 2
    _, err = capsys.readouterr()
    assert (
        "TUNEBOOK_MODE='serv' is not a mode; expected tune, serve or off (unset, generate runs in serve mode)"
        in err
    )


def test_tune_runs_a_prefill_in_every_bucket_a_prompt_can_land_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt has 1 to max_model_len - 1 tokens. The tune command once prefilled only the
    powers of two below max_model_len: with ``--max-model-len 512`` a 257-511-token prompt
    met a bucket it never tuned. Nor did it run scored prompts (echo), whose LM head meets
    row counts no other prefill does. PyTorch ops (nothing to tune: only the plan is
    checked), the tiny model, one decode step."""
    from tunebook.demo.llm.engine import Engine
    from tunebook.demo.llm.sampling import SamplingParams
    from tunebook.demo.llm.scheduler import Request
    from tunebook.kernels._common import bucket_of

    prompts: list[int] = []
    scored: list[int] = []
    generate = Engine.generate

    def spy(self: Engine, batch: Sequence[Sequence[int]], params: SamplingParams) -> list[Request]:
        (scored if params.prompt_logprobs is not None else prompts).extend(len(p) for p in batch)
        return generate(self, batch, params)

    monkeypatch.setattr(Engine, "generate", spy)
    monkeypatch.setenv("TUNEBOOK_MODE", "tune")  # main sets it; restored after the test
    from tunebook.demo.llm import __main__ as cli

    build = cli.build_engine

    def torch_engine(args: Any, on_gpu: bool) -> Any:
        args.ops = "torch"  # `tune --ops torch` is refused (it tunes nothing): the plan alone here
        return build(args, on_gpu)

    monkeypatch.setattr(cli, "build_engine", torch_engine)
    top = 48  # not a power of two: its bucket is 64, prompts of 33-47 tokens land in it
    args = ["tune", "--out", str(tmp_path / "out"), "--model", "tiny", "--random"]
    assert main([*args, "--max-model-len", str(top), "--batches", "1", "--contexts", "16"]) == 0
    assert max(prompts) == top - 1
    assert {bucket_of(n) for n in prompts} == {bucket_of(n) for n in range(1, top)}
    # A scored prompt of n tokens runs the LM head over its n - 1 rows (a prompt may fill the
    # context when scored alone): every bucket of them.
    assert max(scored) == top and {bucket_of(n - 1) for n in scored} == {bucket_of(n) for n in range(1, top)}


def test_a_port_in_use_is_one_line_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn found the port taken only after the model had loaded (seconds to minutes on a
    CPU) and "serving ... on http://..." was printed: then an ERROR line and exit status 3."""
    import socket

    from tunebook.demo.llm import __main__ as cli

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "build_engine", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), "--random", "--model", "tiny"])
    assert code == 2
    out, err = capsys.readouterr()
    expected = f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port"
    assert err.strip().splitlines() == [f"python -m tunebook.demo.llm: error: {expected} (or --host)"]
    assert out == ""
