"""The LLM demo's command line and the tuning demo against a person's mistakes: what a misuse
review found (2026-12-05). Each case failed before its fix: a run that tuned while it should
serve, one that "succeeded" doing nothing, a wrong model name, or a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tunebook.demo.llm import __main__ as cli

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once


def one_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def write_gguf(
    path: Path, *, heads: int = 2, kv_heads: int = 1, layers: int = 1, merges: bool = True, q_rows: int = 8
) -> Path:
    """A tiny Llama GGUF file (hidden 8, 2 query heads of 4, 1 KV head), its weights zeros;
    ``heads``, ``layers``, ``merges`` and the q projection's rows spoil it on demand."""
    import gguf
    import numpy as np

    hidden, kv, ffn, vocab = 8, 4, 16, 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_feed_forward_length(ffn)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "<|endoftext|>"])
    if merges:
        w.add_token_merges(["a b"])

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))

    t("token_embd.weight", vocab, hidden)
    t("output_norm.weight", hidden)
    for i in range(1):  # one layer's tensors, whatever block_count says
        t(f"blk.{i}.attn_norm.weight", hidden)
        t(f"blk.{i}.attn_q.weight", q_rows, hidden)
        t(f"blk.{i}.attn_k.weight", kv, hidden)
        t(f"blk.{i}.attn_v.weight", kv, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, 8)
        t(f"blk.{i}.ffn_norm.weight", hidden)
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- modes and ops


def test_a_blank_tunebook_mode_serves_as_an_unset_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # `TUNEBOOK_MODE= ... generate` benchmarked 12 configs: setdefault kept the blank value,
    # which the library reads as its default, tune.
    seen: list[str] = []
    monkeypatch.setenv("TUNEBOOK_MODE", "  ")
    monkeypatch.setattr(cli, "_generate", lambda args, on_gpu: seen.append(os.environ["TUNEBOOK_MODE"]) or 0)
    assert cli.main(["generate", "hi"]) == 0 and seen == ["serve"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "fixed"], "--ops fixed: tune tunes the pack's kernels"),  # exit 0 and no book
        (["--batches", "8", "--max-batch", "4"], "--batches: 8 is more than --max-batch 4"),
        (["--max-configs", "0"], "--max-configs: expected at least 1; found 0"),
    ],
)
def test_tune_refuses_what_would_tune_nothing_or_fail_late(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "--out", str(tmp_path / "b"), "--model", "tiny", "--random", *args])
    assert exited.value.code == 2
    one_error(capsys, message)


def test_tune_says_a_batch_above_the_default_max_batch_before_tuning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It crashed with a tensor-size RuntimeError after every prefill had been tuned.
    args = ["tune", "--out", str(tmp_path / "b"), "--model", "tiny", "--random", "--batches", "100"]
    assert cli.main([*args, "--prefills", "1", "--max-model-len", "16"]) == 2
    one_error(capsys, "--batches: 100 is more than the 4 sequences", "--max-batch 100")
    assert not list((tmp_path / "b").glob("*--*"))  # nothing was tuned


@pytest.mark.parametrize("size", ["0", "-1", "nan"])
def test_serve_refuses_a_body_limit_that_is_no_size(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--max-body-mb", size, "--model", "tiny", "--random"])
    assert exited.value.code == 2
    one_error(
        capsys, "--max-body-mb: expected a size in MiB above 0", "python -m tunebook.demo.llm serve: error:"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gguf", ""], "--gguf: expected a .gguf file; found an empty value"),  # read "." before
        (["--seed", str(10**23)], "--seed: expected 0 to 2**63 - 1"),  # said after the model loaded
        (["--gguf", "f.gguf", "--model", "llama-3-8b"], "leave out --model llama-3-8b"),  # ignored
        (["--gguf", "f.gguf", "--random"], "leave out --random"),  # the file was ignored
    ],
)
def test_generate_refuses_values_before_loading(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "hi", *args])
    assert exited.value.code == 2
    # The subcommand's usage and name: the top-level usage listed only the subcommands.
    one_error(capsys, message, "python -m tunebook.demo.llm generate: error:", "[--seed SEED]")


def test_ctrl_c_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: Any, on_gpu: bool) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_generate", interrupted)
    assert cli.main(["generate", "hi"]) == 130
    one_error(capsys, "generate: interrupted")


def test_a_prompt_that_is_not_utf8_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # The shell passes undecodable bytes as surrogates; the tokenizer raised TypeError.
    assert cli.main(["generate", "ab\udcffcd", "--model", "tiny", "--random"]) == 2
    one_error(capsys, "PROMPT is not valid UTF-8 text")


def test_a_cache_that_does_not_fit_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(
            ["generate", "hi", "--model", "tiny", "--random", "--ops", "torch", "--max-batch", "10000000"]
        )
    assert exited.value.code == 2
    fits = "--max-batch 10000000 sequences x --max-model-len 512 tokens does not fit"
    one_error(capsys, fits, "lower them")


def test_generate_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    # `generate ... | head -c 2` decoded every token for nobody, then ended in a BrokenPipeError
    # traceback and status 1.
    env = {**os.environ, "TUNEBOOK_DIR": str(tmp_path / "book"), "TRITON_INTERPRET": "1"}
    args = ["generate", "hi", "--model", "tiny", "--random", "--ops", "torch", "--max-tokens", "200", "--raw"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunebook.demo.llm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err, err
    assert "200 tokens in" not in err  # it stopped, and printed no summary for a closed pipe


# ----------------------------------------------------------------------------- model files


def test_a_file_named_by_the_environment_is_served_under_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was advertised as smollm2-135m-instruct whatever the file, unlike --gguf.
    import torch

    from tunebook.demo.llm.loading import load_model

    monkeypatch.setenv("TUNEBOOK_LLM_GGUF", str(write_gguf(tmp_path / "mine.gguf")))
    assert load_model(dtype=torch.float32, device="cpu").model_id == "mine"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("cut", "is not a GGUF model file, or one cut short"),  # IndexError from gguf
        ("heads=0", "llama.embedding_length 8 and llama.attention.head_count 0 must be >= 1"),
        ("kv_heads=0", "n_kv_heads is 0; it must be at least 1"),  # ZeroDivisionError before
        # 3 heads of hidden 8: a head size of 8 // 3 = 2, so 6 query rows where the file has 8
        ("heads=3", "q_proj.weight has shape (8, 8), where the file's metadata makes it (6, 8)"),
        ("layers=2", "the weights lack model.layers.1"),  # KeyError before
        ("q_rows=6", "model.layers.0.self_attn.q_proj.weight has shape (6, 8)"),  # a reshape error
        ("no merges", "the GGUF file's tokenizer lacks tokenizer.ggml.merges"),  # KeyError before
    ],
)
def test_a_damaged_or_inconsistent_model_file_is_one_line(
    spoil: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.gguf"
    if spoil == "cut":
        full = write_gguf(tmp_path / "full.gguf").read_bytes()
        path.write_bytes(full[:40])
    elif spoil == "no merges":
        write_gguf(path, merges=False)
    else:
        name, value = spoil.split("=")
        write_gguf(path, **{name: int(value)})
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "hi", "--gguf", str(path), "--max-model-len", "16", "--ops", "torch"])
    assert exited.value.code == 2
    one_error(capsys, message)


# ----------------------------------------------------------------------------- tuning demo


@pytest.mark.slow  # two interpreted processes tune and serve a small GEMM
def test_the_demo_tunes_whatever_the_shells_mode_and_lists_only_pages(tmp_path: Path) -> None:
    # TUNEBOOK_MODE=serve in the shell: "UNEXPECTED" with no reason. A --book holding other
    # files: each listed as a page and called an unreadable book file, to be deleted.
    book = tmp_path / "book"
    book.mkdir()
    (book / "note.txt").write_text("mine")
    env = {**os.environ, "TUNEBOOK_MODE": "serve", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunebook.demo", "--book", str(book)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: the second process benchmarked nothing" in proc.stdout
    assert "the book: 1 page(s)" in proc.stdout and "UnreadableBookFile" not in proc.stdout + proc.stderr
    assert (book / "note.txt").read_text() == "mine"


def test_the_demo_refuses_an_empty_book(capsys: pytest.CaptureFixture[str]) -> None:
    from tunebook.demo.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--book", ""])
    assert exited.value.code == 2
    one_error(capsys, "--book: expected a directory; found an empty value")


def test_ctrl_c_in_the_demo_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunebook.demo import __main__ as demo

    def interrupted(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_demo", interrupted)
    assert demo.main([]) == 130
    one_error(capsys, "interrupted")
