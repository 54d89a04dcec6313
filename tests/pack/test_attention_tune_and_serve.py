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
@pytest.mark.once  # the pack's command line over the core's persistence (tests/conftest.py)
def test_tuned_book_is_served_with_zero_benchmarking(book_dir: Path, tmp_path: Path) -> None:
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    tuned = run_python(CALL_EACH_OP, env={**budget, "TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_MODE": "tune"})
    assert tuned["benchmarked"] == 6 and tuned["book_hits"] == 0, tuned  # 2 configs for each of 3 keys
    names = sorted(p.name.split("--")[0] for p in book_dir.iterdir() if not p.name.startswith("."))
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


def test_offline_tuning_rebuilds_meaningful_calls() -> None:
    """``tunebook tune`` rebuilds a call from a key (and the recorded call's layout, whose
    index tensors would be all zeros): the attention kernels' ``inputs=`` factories give
    real lengths, shuffled block tables and distinct slots, and the calls compute right."""
    import torch

    from tunebook.kernels.paged_attention_decode import _paged_attention_decode_kernel
    from tunebook.kernels.reshape_and_cache import _reshape_and_cache_kernel
    from tunebook.kernels.varlen_attention import _varlen_attention_kernel

    from .attention_reference import attention

    key = {"batch": 2, "max_context_len": 20, "NQ": 2, "NK": 1, "HEAD_SIZE": 16, "PAGE": 16}
    grid, args, kwargs = _paged_attention_decode_kernel.options.inputs({"call": None, "key": key})
    q, k_cache, v_cache, table, lens, out = args[0], args[3], args[7], args[11], args[14], args[15]
    assert q.dtype == torch.bfloat16 and lens.tolist() == [20, 20]
    assert sorted(table.flatten().tolist()) == list(range(4))
    _paged_attention_decode_kernel[grid](*args, **kwargs)
    t = torch.arange(20)
    for b in range(2):
        blocks = table[b, t // 16].long()
        expected = attention(q[b : b + 1], k_cache[blocks, t % 16], v_cache[blocks, t % 16], causal=False)
        torch.testing.assert_close(out[b].double(), expected[0], atol=2**-6, rtol=2**-6)

    fp16_call = {"args": [{"tensor": {"shape": [12, 2, 16], "dtype": "torch.float16"}}]}
    key = {"max_seqlen_q": 8, "max_seqlen_k": 24, "NQ": 2, "NK": 1, "HEAD_SIZE": 16, "CAUSAL": True}
    key |= {"HAS_PREFIX": True, "PAGE": 16}
    grid, args, kwargs = _varlen_attention_kernel.options.inputs({"call": fp16_call, "key": key})
    assert args[0].shape == (12, 2, 16) and args[0].dtype == torch.float16
    assert args[12].tolist() == [0, 8, 10, 12] and args[24].tolist() == [16, 16, 16]  # cu_seqlens, prefixes
    _varlen_attention_kernel[grid](*args, **kwargs)
    assert torch.isfinite(args[9]).all()
    key["PAGE"] = 8  # a server's own block size, part of the key: the rebuilt cache has it
    grid, args, kwargs = _varlen_attention_kernel.options.inputs({"call": fp16_call, "key": key})
    assert args[14].shape[1] == 8 and args[_varlen_attention_kernel.arg_names.index("PAGE")] == 8

    key = {"n_tokens": 5, "NK": 1, "HEAD_SIZE": 16}
    grid, args, kwargs = _reshape_and_cache_kernel.options.inputs({"call": None, "key": key})
    slots = args[14]
    assert len(set(slots.tolist())) == 5
    _reshape_and_cache_kernel[grid](*args, **kwargs)
    assert torch.equal(args[6].view(-1, 1, 16)[slots], args[0])
