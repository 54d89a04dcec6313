"""Arguments laid out as callers hand them over: index tensors that are strided views, a
column of the routing weights, no expert per token, an output that aliases an input. Each
op's result equals the one for the same values laid out plainly (which its own test file
checks against PyTorch), or the call is refused with a clear error; a kernel never reads a
strided view as if it were contiguous (which once gave wrong results, and a lengths tensor
read that way ran past the block table)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tunebook.kernels import (
    fused_moe,
    linear,
    paged_attention_decode,
    reshape_and_cache,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
    varlen_attention,
)
from tunebook.kernels.rotary_embedding import cos_sin_cache


def _every_other(values: list[int], filler: int) -> torch.Tensor:
    """``values`` as a strided view (stride 2) over a buffer whose other slots hold ``filler``."""
    buffer = torch.full((2 * len(values),), filler, dtype=torch.int64)
    buffer[::2] = torch.tensor(values)
    view = buffer[::2]
    assert not view.is_contiguous()
    return view


def test_rotary_reads_positions_given_as_a_strided_view() -> None:
    torch.manual_seed(0)
    q, k, cache = torch.randn(4, 2, 16), torch.randn(4, 1, 16), cos_sin_cache(16, 64)
    positions = _every_other([3, 7, 11, 20], filler=0)
    for got, want in zip(
        rotary_embedding(q, k, positions, cache), rotary_embedding(q, k, positions.contiguous(), cache)
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_paged_decode_reads_context_lengths_given_as_a_strided_view() -> None:
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(4, 16, 1, 64), torch.randn(4, 16, 1, 64)
    q, table = torch.randn(2, 2, 64), torch.tensor([[3, 0], [1, 2]])
    lengths = _every_other([20, 5], filler=99)  # 99 read as a length would run past the table
    got = paged_attention_decode(q, k_cache, v_cache, table, lengths, max_context_len=20)
    want = paged_attention_decode(q, k_cache, v_cache, table, lengths.contiguous(), max_context_len=20)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_varlen_reads_offsets_and_prefix_lengths_given_as_strided_views() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 2, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    offsets = _every_other([0, 3, 5], filler=9)  # 9 read as an offset would write out of bounds
    got = varlen_attention(q, k, v, offsets, offsets, max_seqlen_q=3, max_seqlen_k=3)
    plain = offsets.contiguous()
    torch.testing.assert_close(got, varlen_attention(q, k, v, plain, plain, max_seqlen_q=3, max_seqlen_k=3))
    k_cache, v_cache, table = (
        torch.randn(4, 16, 1, 16),
        torch.randn(4, 16, 1, 16),
        torch.tensor([[3, 0], [1, 2]]),
    )
    prefix = _every_other([10, 4], filler=77)
    paged = {"k_cache": k_cache, "v_cache": v_cache, "block_table": table}
    got = varlen_attention(q, k, v, plain, plain, prefix_lens=prefix, **paged)
    want = varlen_attention(q, k, v, plain, plain, prefix_lens=prefix.contiguous(), **paged)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _moe_inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    tokens, hidden, inter, experts = 5, 40, 24, 6
    x = torch.randn(tokens, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) / 6, torch.randn(experts, hidden, inter) / 5
    ids = torch.tensor([[0, 2], [2, 0], [5, 2], [0, 5], [2, 0]])
    return x, w13, w2, torch.rand(tokens, 2), ids


def test_fused_moe_reads_routing_weights_given_as_a_column_of_a_wider_tensor() -> None:
    x, w13, w2, weights, ids = _moe_inputs()
    column = weights[:, :1]  # stride (2, 1): reshape(-1) keeps the stride instead of copying
    got = fused_moe(x, w13, w2, column, ids[:, :1].contiguous())
    torch.testing.assert_close(got, fused_moe(x, w13, w2, column.contiguous(), ids[:, :1].contiguous()))


def test_fused_moe_with_no_expert_per_token_returns_zeros_not_uninitialised_memory() -> None:
    x, w13, w2, _, _ = _moe_inputs()
    none = fused_moe(x, w13, w2, torch.zeros(5, 0), torch.zeros(5, 0, dtype=torch.int64))
    assert torch.equal(none, torch.zeros_like(x))


def test_linear_refuses_an_output_that_aliases_its_input() -> None:
    x, w = torch.randn(4, 64), torch.randn(64, 64)
    with pytest.raises(ValueError, match="out shares memory with x"):
        linear(x, w, out=x)


@pytest.mark.parametrize(
    ("make", "shared"),
    [
        (lambda x: (x, x[:, 8:]), True),  # a column slice of a contiguous buffer
        (lambda x: (x[:, :8], x[:, 8:]), False),  # the two halves of each row
        (lambda x: (x[:, 1:9], x[:, 8:]), True),  # overlapping by one column
        (lambda x: (x[::2], x[1::2]), False),  # even and odd rows
        (lambda x: (x[:1, 8:], x[0, 12:]), True),  # one row each, meeting at column 12
        (lambda x: (x.t(), x[2:]), True),  # a transposed view of a buffer and a contiguous part of it
    ],
)
def test_outputs_sharing_memory_with_an_input_are_told_from_those_that_do_not(make, shared) -> None:  # type: ignore[no-untyped-def]
    from tunebook.kernels._common import may_overlap

    a, b = make(torch.zeros(6, 16))
    assert may_overlap(a, b) is shared and may_overlap(b, a) is shared


def test_silu_and_mul_refuses_the_second_half_of_its_input_as_its_output() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="out shares memory with x"):
        silu_and_mul(x, out=x[:, 32:])


# Every op called with CPU tensors, as a new user writes it first (valid shapes throughout).
_CPU_CALLS = """
import torch
import tunebook.kernels as k

x, q = torch.randn(2, 64), torch.randn(2, 4, 16)
cache = torch.zeros(4, 16, 2, 16)
table, lens, slots = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32), torch.arange(2)
cu = torch.tensor([0, 2], dtype=torch.int32)
ids = torch.zeros(2, 1, dtype=torch.int64)
calls = {
    "rms_norm": lambda: k.rms_norm(x, torch.ones(64)),
    "silu_and_mul": lambda: k.silu_and_mul(x),
    "rotary_embedding": lambda: k.rotary_embedding(q, q[:, :2], torch.arange(2), k.cos_sin_cache(16, 8)),
    "linear": lambda: k.linear(x, torch.randn(8, 64)),
    "fused_moe": lambda: k.fused_moe(x, torch.randn(2, 16, 64), torch.randn(2, 64, 8), torch.ones(2, 1), ids),
    "paged_attention_decode": lambda: k.paged_attention_decode(q, cache, cache.clone(), table, lens),
    "varlen_attention": lambda: k.varlen_attention(q, q[:, :2], q[:, :2], cu, cu),
    "reshape_and_cache": lambda: k.reshape_and_cache(q[:, :2], q[:, :2], cache, cache.clone(), slots),
}
for op, call in calls.items():
    try:
        call()
        print(op, "ran")
    except Exception as exc:
        print(op, type(exc).__name__, str(exc).replace(chr(10), " | "))
"""


def test_cpu_tensors_without_the_interpreter_are_refused_with_the_way_out() -> None:
    """Without TRITON_INTERPRET, a CPU tensor once reached Triton's launcher and ended in
    "0 active drivers ([]). There should only be one."; every op now says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _CPU_CALLS], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 8, proc.stdout
    for line in lines:
        op, kind, message = line.split(" ", 2)
        assert kind == "ValueError", line
        assert re.match(rf"tunebook\.kernels\.{op}: \w+ (is|and the others are) on the CPU", message), line
        assert "TRITON_INTERPRET=1" in message and "active drivers" not in message, line


def _expanded(*shape: int) -> torch.Tensor:
    """A tensor of ``shape`` whose first dimension is one row repeated (stride 0): every row
    written into it lands on the same memory."""
    return torch.empty(1, *shape[1:]).expand(*shape)


# Each op given an expanded tensor to write: the rows once overwrote each other, silently.
_EXPANDED_WRITES = {
    "rms_norm out": lambda: rms_norm(torch.randn(3, 64), torch.ones(64), out=_expanded(3, 64)),
    "rms_norm residual_out": lambda: rms_norm(
        torch.randn(3, 64), torch.ones(64), residual=torch.randn(3, 64), residual_out=_expanded(3, 64)
    ),
    "silu_and_mul out": lambda: silu_and_mul(torch.randn(3, 64), out=_expanded(3, 32)),
    "rotary_embedding out[0]": lambda: rotary_embedding(
        torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.arange(3), cos_sin_cache(16, 8),
        out=(_expanded(3, 2, 16), torch.empty(3, 1, 16)),
    ),
    "rotary_embedding out[1]": lambda: rotary_embedding(
        torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.arange(3), cos_sin_cache(16, 8),
        out=(torch.empty(3, 2, 16), _expanded(3, 1, 16)),
    ),
    "linear out": lambda: linear(torch.randn(3, 32), torch.randn(16, 32), out=_expanded(3, 16)),
    "fused_moe out": lambda: fused_moe(
        torch.randn(3, 32), torch.randn(2, 16, 32), torch.randn(2, 32, 8), torch.ones(3, 1),
        torch.zeros(3, 1, dtype=torch.int64), out=_expanded(3, 32),
    ),
    "paged_attention_decode out": lambda: paged_attention_decode(
        torch.randn(3, 2, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16),
        torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, dtype=torch.int64), out=_expanded(3, 2, 16),
    ),
    "varlen_attention out": lambda: varlen_attention(
        torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.tensor([0, 3]),
        torch.tensor([0, 3]), out=_expanded(3, 2, 16),
    ),
    "reshape_and_cache k_cache": lambda: reshape_and_cache(
        torch.randn(2, 1, 16), torch.randn(2, 1, 16), _expanded(2, 4, 1, 16), torch.zeros(2, 4, 1, 16),
        torch.tensor([0, 5]),
    ),
    "reshape_and_cache v_cache": lambda: reshape_and_cache(
        torch.randn(2, 1, 16), torch.randn(2, 1, 16), torch.zeros(2, 4, 1, 16), _expanded(2, 4, 1, 16),
        torch.tensor([0, 5]),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_EXPANDED_WRITES))
def test_a_written_tensor_whose_rows_share_memory_is_refused(case: str) -> None:
    op, name = case.split()
    with pytest.raises(ValueError, match=rf"{op}: {re.escape(name)} has elements that share memory"):
        _EXPANDED_WRITES[case]()


_NOT_A_TENSOR = {
    "rms_norm out": lambda: rms_norm(torch.randn(3, 16), torch.ones(16), out=[1]),
    "rms_norm residual_out": lambda: rms_norm(
        torch.randn(3, 16), torch.ones(16), residual=torch.randn(3, 16), residual_out=[1]
    ),
    "silu_and_mul out": lambda: silu_and_mul(torch.randn(3, 16), out=[1]),
    "paged_attention_decode out": lambda: paged_attention_decode(
        torch.randn(3, 2, 16), torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16),
        torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, dtype=torch.int64), out=[1],
    ),
    "varlen_attention out": lambda: varlen_attention(
        torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.tensor([0, 3]),
        torch.tensor([0, 3]), out=[1],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_NOT_A_TENSOR))
def test_an_output_that_is_not_a_tensor_is_named(case: str) -> None:
    """It once ended in an AttributeError ('list' object has no attribute 'device')."""
    op, name = case.split()
    with pytest.raises(
        TypeError, match=rf"^tunebook\.kernels\.{op}: {name} must be a torch tensor or None; found list$"
    ):
        _NOT_A_TENSOR[case]()


def test_meta_tensors_are_refused_by_name_before_any_memory_check() -> None:
    """A meta tensor has no memory (data_ptr() 0): it once reached Triton (or torch's "Cannot
    copy out of meta tensor"), and two of them read as sharing memory."""
    meta = {"device": "meta"}
    x, w = torch.randn(3, 64, **meta), torch.ones(64, **meta)
    with pytest.raises(ValueError, match=r"rms_norm: x and the others are on meta, where no kernel can run"):
        rms_norm(x, w, out=torch.empty(3, 64, **meta))
    with pytest.raises(ValueError, match=r"silu_and_mul: x is on meta"):
        silu_and_mul(x)
    with pytest.raises(ValueError, match=r"linear: x is on meta"):
        linear(x, torch.randn(8, 64, **meta))
    q = torch.randn(2, 2, 16, **meta)
    cu = torch.tensor([0, 2], **meta)
    with pytest.raises(ValueError, match=r"varlen_attention: q and the others are on meta"):
        varlen_attention(q, q[:, :1], q[:, :1], cu, cu, max_seqlen_q=2, max_seqlen_k=2)
