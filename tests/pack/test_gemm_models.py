"""The GEMM ops take part in the pack's shape table (``tunebook.kernels._models``), so the one
tune command tunes and ships their books too: each builder's call computes what the op's
PyTorch reference does (tiny shapes, the interpreter), and the tune command lists their keys
for every named model, and tunes them into a book that a serving process then answers from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_python
from tunebook.kernels import _models

from .gemm_reference import MOE_TOL, assert_close
from .packutil import tune_command
from .test_fused_moe import reference as moe_reference
from .test_linear import reference as linear_reference


@pytest.mark.parametrize("bias", [False, True])
def test_the_linear_builder_computes_x_times_w_transposed(bias: bool) -> None:
    w = _models.workload("linear", {"layer": "qkv", "N": 40, "K": 24, "bias": bias}, 3, torch.bfloat16, "cpu")
    w.tensors["out"].fill_(float("nan"))  # poisoned: an element left unwritten fails
    y = w.run(None)
    t = w.tensors
    assert y.data_ptr() == t["out"].data_ptr() and ("bias" in t) == bias
    assert_close(y, linear_reference(t["x"], t["weight"], t.get("bias")), torch.bfloat16)
    assert w.key == {"M": 3, "N": 40, "K": 24} and w.flops == 2 * 3 * 40 * 24


def test_the_fused_moe_builder_routes_every_token_to_its_top_k_experts() -> None:
    shape = {"experts": 4, "hidden": 24, "intermediate": 40, "top_k": 2}
    w = _models.workload("fused_moe", shape, 5, torch.bfloat16, "cpu")
    w.tensors["out"].fill_(float("nan"))
    y = w.run({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1})
    t = w.tensors
    assert t["w13"].shape == (4, 80, 24) and t["w2"].shape == (4, 24, 40) and t["topk_ids"].shape == (5, 2)
    ref = moe_reference(t["x"], t["w13"], t["w2"], t["topk_weights"], t["topk_ids"])
    assert_close(y, ref, torch.bfloat16, MOE_TOL[torch.bfloat16])


def test_the_model_table_gives_each_model_its_projections_and_mixtral_its_experts() -> None:
    linear = _models.shapes("linear")
    by_model: dict[str, list[dict[str, object]]] = {}
    for shape, names in linear.items():
        for name in names:
            by_model.setdefault(name, []).append(dict(shape))
    llama = {s["layer"]: (s["N"], s["K"]) for s in by_model["llama-3-8b"]}
    assert llama == {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    tp8 = {s["layer"]: (s["N"], s["K"]) for s in by_model["llama-3-70b-tp8"]}
    assert tp8 == {"qkv": (1280, 8192), "o": (8192, 1024), "gate_up": (7168, 8192), "down": (8192, 3584)}
    assert [s["bias"] for s in by_model["qwen2.5-7b"] if s["layer"] == "qkv"] == [True]
    # Mixtral's MLP is its experts: only attention projections are linear layers, shared with Llama-3-8B's
    assert sorted(s["layer"] for s in by_model["mixtral-8x7b"]) == ["o", "qkv"]
    moe = [dict(s) for s in _models.shapes("fused_moe")]
    assert moe == [
        {"experts": 8, "hidden": 4096, "intermediate": 14336, "top_k": 2},
        {"experts": 8, "hidden": 4096, "intermediate": 7168, "top_k": 2},
    ]


@pytest.mark.once  # the pack's command line
def test_the_tune_command_lists_the_gemm_keys(tmp_path: Path) -> None:
    listed = tune_command("--out", str(tmp_path), "--dry-run")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    # 20 distinct projections and 2 expert shapes, at each of the 14 token buckets
    assert sum(line.lstrip().startswith("linear ") for line in lines) == 20 * 14
    assert sum(line.lstrip().startswith("fused_moe ") for line in lines) == 2 * 14
    assert lines[0].startswith(f"{len(lines) - 1} calls")


@pytest.mark.slow  # tunes four GEMM keys on the interpreter, then serves them in a new process
@pytest.mark.once  # the command's plumbing; linear itself is tested on every Triton
def test_gemm_keys_tuned_by_the_command_are_served_with_zero_benchmarking(book_dir: Path) -> None:
    args = ("--out", str(book_dir), "--ops", "linear", "--models", "smollm2-135m", "--tokens", "1")
    budget = {"TUNEBOOK_KERNELS_MAX_CONFIGS": "2"}
    tune = tune_command(*args, "--max-configs", "2", "--no-shipped-books", env=budget, timeout=900)
    assert tune.returncode == 0, tune.stderr
    assert tune.stdout.count("configs measured") == 5, tune.stdout  # four keys, then the summary
    served = run_python(
        """
import json, tunebook
from tunebook.kernels import _models
for job in _models.plan(["linear"], _models.select_models("smollm2-135m"), [1]):
    job.build("cpu").run(None)
print(json.dumps(tunebook.stats()))
""",
        env={
            "TUNEBOOK_KERNELS_MAX_CONFIGS": "2",
            "TUNEBOOK_DIR": str(book_dir),
            "TUNEBOOK_MODE": "serve",
            "TUNEBOOK_KERNELS_SHIPPED_BOOKS": "0",
        },
    )
    assert served["benchmarked"] == 0 and served["fallbacks"] == 0 and served["book_hits"] == 4, served
