"""The attention ops tuned and then served as a shipped book is: a process tunes one key of
each op (a 2-config budget on tiny shapes: the interpreter takes ~0.5 s a call) into a
book; a new process serving from that book read-only benchmarks nothing, falls back
nowhere and runs the same configs. And the tune command lists the ops' keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_python
from tunebook.kernels import __main__ as tune_command

# One call of each attention op through tunebook.kernels._models, on tiny shapes. Prints the
# counters and each kernel's config as the last line.
CALL_EACH_OP = """
import importlib, json, torch, tunebook
from tunebook.kernels import _models

TINY = {
    "reshape_and_cache": ({"n_kv": 1, "head_size": 16, "page": 16}, 3),
    "paged_attention_decode": ({"n_q": 2, "n_kv": 1, "head_size": 16, "page": 16, "context": 40}, 2),
    "varlen_attention": ({"n_q": 2, "n_kv": 1, "head_size": 16, "seqlen": 20, "prefix": 18}, 24),
}
chosen = {}
for op, (shape, tokens) in TINY.items():
    _models.workload(op, shape, tokens, torch.bfloat16, "cpu").run(None)
    kernel = getattr(importlib.import_module("tunebook.kernels." + op), "_" + op + "_kernel")
    chosen[op] = str(kernel.best_config)
print(json.dumps({**tunebook.stats(), "chosen": chosen}))
"""


@pytest.mark.slow  # two processes tuning and running attention on the interpreter, ~25 s
def test_tuned_book_is_served_with_zero_benchmarking(book_dir: Path, tmp_path: Path) -> None:
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    tuned = run_python(CALL_EACH_OP, env={**budget, "TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_MODE": "tune"})
    assert tuned["benchmarked"] == 6 and tuned["book_hits"] == 0, tuned  # 2 configs for each of 3 keys
    names = sorted(p.name.split("--")[0] for p in book_dir.glob("*.json"))
    assert names == [
        "tunebook-kernels-paged_attention_decode",
        "tunebook-kernels-reshape_and_cache",
        "tunebook-kernels-varlen_attention",
    ]

    env = {**budget, "TUNEBOOK_DIR": str(tmp_path / "empty"), "TUNEBOOK_PATH": str(book_dir)}
    served = run_python(CALL_EACH_OP, env={**env, "TUNEBOOK_MODE": "serve"})
    assert served["benchmarked"] == 0 and served["fallbacks"] == 0 and served["book_hits"] == 3, served
    assert served["chosen"] == tuned["chosen"]


def test_tune_command_lists_the_attention_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode: batches 1, 16, 64, 256 x contexts 512, 8k, 32k, at most 2^21 cached tokens;
    prefill: five (longest, prefix) shapes at 8192 tokens; cache writes: 1 to 4096 tokens."""
    # The command sets these for its process: give them back afterwards.
    monkeypatch.setenv("TUNEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")
    monkeypatch.delenv("TUNEBOOK_KERNELS_MAX_CONFIGS", raising=False)
    argv = ["tune", "--out", str(tmp_path), "--dry-run", "--models", "llama-3-8b"]
    assert (
        tune_command.main([*argv, "--ops", "paged_attention_decode,varlen_attention,reshape_and_cache"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("20 calls")
    decode = [line for line in lines if "paged_attention_decode" in line]
    assert len(decode) == 11 and not any("context': 32768} tokens=256" in line for line in decode)
    assert sum("varlen_attention" in line for line in lines) == 5
    assert sum("reshape_and_cache" in line for line in lines) == 4
