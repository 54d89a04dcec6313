"""The engine's pinned-config ops: ``first`` launches every kernel at the first config its
own autotuner would consider for the call (the issue's "untuned"), ``fixed`` at the op's
hand-picked one; both compute what PyTorch computes."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest

from tunebook._call import Call
from tunebook.demo.llm.ops import FirstOps, FixedOps, make_ops
from tunebook.demo.llm.sampling import SamplingParams

from .test_engine import tiny_engine

# The LLM demo: last Triton only (test_engine.py says why).
pytestmark = pytest.mark.once

PROMPTS = [[5, 6, 7], [9] * 20, [1, 2]]


class _Spy:
    """Stands for a kernel's ``fn`` (the bare jit the ``_op(config=...)`` launchers call):
    records each launch's positional arguments and config, then launches."""

    def __init__(self, fn: Any, seen: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **config: Any) -> Any:
            self.seen.append((args, config))
            return self.fn[grid](*args, **config)

        return launch


def _spy_on_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Any, list[Any]]]:
    """op -> (its kernel's autotuner, the launches recorded)."""
    spies: dict[str, tuple[Any, list[Any]]] = {}
    for op in ("linear", "rms_norm", "rotary_embedding", "reshape_and_cache", "silu_and_mul",
               "varlen_attention", "paged_attention_decode"):  # fmt: skip
        tuner = getattr(importlib.import_module(f"tunebook.kernels.{op}"), f"_{op}_kernel")
        seen: list[Any] = []
        monkeypatch.setattr(tuner, "fn", _Spy(tuner.fn, seen))
        spies[op] = (tuner, seen)
    return spies


@pytest.mark.slow  # ~6 s: every kernel of the pack in the interpreter at small tiles
def test_first_ops_launch_each_kernels_first_candidate_and_agree_with_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefill and decode steps, batched and ragged: every launch of every kernel runs the
    first of the candidates its autotuner computes for that very call (its Space, its
    constraints and arg constraints, its own argument names), and the tokens equal the
    PyTorch engine's."""
    torch_out = [r.output for r in tiny_engine("torch").generate(PROMPTS, _params())]
    spies = _spy_on_kernels(monkeypatch)
    engine = tiny_engine("first")
    assert engine.ops.name == "first"
    assert [r.output for r in engine.generate(PROMPTS, _params())] == torch_out
    for op, (tuner, seen) in spies.items():
        assert seen, f"{op}: never launched"
        for args, config in seen:
            first = tuner.key_and_candidates(Call.bind(tuner.arg_names, args, {}, None))[1][0]
            expected = first.all_kwargs()
            assert config == {k: expected[k] for k in config}, f"{op}: {config} is not its first config"


def test_fixed_ops_launch_the_hand_picked_configs_and_first_ops_another() -> None:
    """The two baselines differ: a hand-picked config is not the Space's first (or the
    ``tuned`` phase's two ratios would be one)."""
    fixed, first = FixedOps(), FirstOps()
    args = {"N": 576, "n_rows": 1}
    assert fixed.config("rms_norm", args) == {"BLOCK_N": 1024, "ROWS": 1, "num_warps": 4, "num_stages": 1}
    assert first.config("rms_norm", args) == {"BLOCK_N": 256, "ROWS": 1, "num_warps": 1, "num_stages": 1}
    gemm = {"M": 1, "N": 49152, "K": 576}
    assert first.config("linear", gemm) != fixed.config("linear", gemm)


def test_an_unknown_ops_kind_is_refused_with_the_known_ones() -> None:
    assert make_ops("first").name == "first"
    with pytest.raises(ValueError, match="expected one of triton, fixed, first, torch"):
        make_ops("fastest")


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=2, ignore_eos=True)  # a prefill, then a decode step
