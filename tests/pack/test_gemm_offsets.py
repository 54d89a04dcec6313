"""The GEMM kernels compute row offsets in 32 bits (as the sources their books were tuned on
do): a call whose tensors reach past 2^31 elements runs in parts that each stay below. With
the limit lowered, every part a call launches is checked to stay under it and the result to
be the reference's; and a real 2^31-element reach (a row stride of 2^28, memory reserved
lazily) is checked in a child process, where the old code read the wrong rows or crashed."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from conftest import run_python
from tunebook.kernels import _gemm_common
from tunebook.kernels._gemm_common import span

from .gemm_reference import MOE_TOL, assert_close, generator, poisoned, randn
from .test_fused_moe import reference as moe_reference
from .test_linear import reference as linear_reference

linear_mod = importlib.import_module("tunebook.kernels.linear")
moe_mod = importlib.import_module("tunebook.kernels.fused_moe")


class Spy:
    """Stands in for an autotuned kernel: records the element span of the tensor arguments
    at ``rows`` (those it offsets by row index) of every launch, then launches the real one."""

    def __init__(self, real: Any, rows: tuple[int, ...]) -> None:
        self.real, self.rows, self.launches = real, rows, []

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.launches.append([span(args[i]) for i in self.rows])
            return self.real[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    "M, N, limit, parts",
    [
        (9, 40, 500, 2),  # the weight (959) reaches too far: halves by columns
        (37, 8, 200, 8),  # x (37 x 24) reaches too far: halves of rows until 8 rows or fewer
        (1, 200, 1000, 8),  # one row of x, a long y row and a large weight: columns only
    ],
)
def test_a_call_past_the_offset_limit_runs_in_parts_below_it(
    M: int, N: int, limit: int, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_gemm_common, "OFFSET_LIMIT", limit)
    spy = Spy(linear_mod._linear_kernel, (0, 1, 3))  # x, weight, y (split-K scratch is sized M x N)
    monkeypatch.setattr(linear_mod, "_linear_kernel", spy)
    x, w, b = (randn(s, torch.float32, generator(M, N, s)) for s in ((M, 24), (N, 24), (N,)))
    out = poisoned((M, N), torch.float32)
    linear_mod.linear(x, w, b, out=out)
    assert_close(out, linear_reference(x, w, b), torch.float32)
    assert len(spy.launches) == parts
    assert all(max(spans) <= limit for spans in spy.launches), spy.launches


def test_one_row_past_the_limit_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gemm_common, "OFFSET_LIMIT", 50)
    x = torch.zeros(2, 200)[:, ::2]  # one row reaches 198 elements: no split can help
    with pytest.raises(ValueError, match=r"one row of x or of weight spans more than 2\^31.*contiguous"):
        linear_mod.linear(x, torch.zeros(1, 100))


def test_fused_moe_past_the_limit_runs_in_halves_of_its_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    T, E, H, inter, top_k = 7, 4, 24, 40, 2
    gen = generator("moe-offsets")
    x, w13 = randn((T, H), torch.float32, gen), randn((E, 2 * inter, H), torch.float32, gen, 0.2)
    w2 = randn((E, H, inter), torch.float32, gen, 0.2)
    weights, ids = torch.topk(torch.randn(T, E, generator=gen).softmax(-1), top_k)
    monkeypatch.setattr(_gemm_common, "OFFSET_LIMIT", 200)  # T * top_k * inter = 560: parts of 2 tokens
    # gemm1: x and h; gemm2: h and y (the weights are offset per expert in 64 bits)
    spies = [Spy(moe_mod._moe_gemm1_kernel, (0, 2)), Spy(moe_mod._moe_gemm2_kernel, (0, 2))]
    monkeypatch.setattr(moe_mod, "_moe_gemm1_kernel", spies[0])
    monkeypatch.setattr(moe_mod, "_moe_gemm2_kernel", spies[1])
    out = poisoned((T, H), torch.float32)
    moe_mod.fused_moe(x, w13, w2, weights, ids, out=out)
    assert_close(out, moe_reference(x, w13, w2, weights, ids), torch.float32, MOE_TOL[torch.float32])
    assert len(spies[0].launches) == len(spies[1].launches) == 4  # 7 tokens: 1+2, 2+2
    for spy in spies:
        assert all(max(spans) <= 200 for spans in spy.launches), spy.launches


@pytest.mark.slow  # reserves 4 GiB of address space (untouched) in a child process
def test_a_row_stride_reaching_2_31_elements_is_read_right() -> None:
    result = run_python(
        """
import json, torch
from tunebook.kernels import linear
S = 2**28
x = torch.empty(8 * S + 64, dtype=torch.float16).as_strided((9, 64), (S, 1))
x.copy_(torch.randn(9, 64, generator=torch.Generator().manual_seed(0)).half())
w = (torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) / 8).half()
err = (linear(x, w).double() - x.double() @ w.double().T).abs().max().item()
print(json.dumps({"err": err}))
""",
        env={"TUNEBOOK_MODE": "serve"},
    )
    assert result["err"] < 0.05, result  # row 8 starts at element 2^31: the old code crashed
