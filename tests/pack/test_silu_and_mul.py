"""silu_and_mul against a float64 PyTorch reference, on the CPU interpreter."""

from __future__ import annotations

import pytest
import torch

import tunebook
from tunebook.kernels import silu_and_mul
from tunebook.kernels.silu_and_mul import SPACE, _silu_and_mul, _silu_and_mul_kernel, hand_picked

from .packutil import DTYPES, assert_close, poisoned, randn, sweep_configs


def reference(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    a, b = x[..., :d].double(), x[..., d:].double()
    return a / (1 + torch.exp(-a)) * b


def check(x: torch.Tensor, config: dict | None = None) -> None:
    before = x.clone()
    out = poisoned((*x.shape[:-1], x.shape[-1] // 2), x.dtype)
    assert _silu_and_mul(x, out, config) is out
    assert_close(out, reference(x))
    assert torch.equal(x, before), "x was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 200), (3, 1152), (5, 2000), (2, 3, 130)], ids=str)
def test_matches_reference(gen, dtype, shape) -> None:  # type: ignore[no-untyped-def]
    check(randn(gen, *shape, dtype=dtype) * 4)  # * 4: silu's tails, where exp over/underflows


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_extreme_values() -> None:
    """exp(-a) overflows to inf for a << 0: silu must give -0, not NaN. (d = 5 also checks
    that a row shorter than the smallest block has a config.)"""
    x = torch.tensor([[-1e4, -80.0, 0.0, 80.0, 1e4, 2.0, 2.0, 2.0, 2.0, 2.0]])
    check(x)


def test_new_tensor_by_default(gen) -> None:  # type: ignore[no-untyped-def]
    x = randn(gen, 2, 3, 64, dtype=torch.bfloat16)
    y = silu_and_mul(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    assert_close(y, reference(x))
    assert_close(silu_and_mul(x[0, 0]), reference(x[0, 0]))  # one vector, no row dimension


def test_strided_rows(gen) -> None:  # type: ignore[no-untyped-def]
    """The gate/up half of a wider projection output (row stride 500 for 2 * 100 columns) is
    read in place, and out may be strided rows too."""
    x = randn(gen, 4, 500, dtype=torch.float16)[:, 100:300]
    check(x)
    out = poisoned((4, 300), torch.float16)[:, 7:107]
    assert silu_and_mul(x, out=out) is out
    assert_close(out, reference(x))


def test_strided_last_dim_is_copied(gen) -> None:  # type: ignore[no-untyped-def]
    check(randn(gen, 64, 3).t())


def test_zero_rows_launch_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    assert silu_and_mul(randn(gen, 0, 64)).shape == (0, 32)
    assert silu_and_mul(randn(gen, 3, 0, 64)).shape == (3, 0, 32)
    assert tunebook.stats()["misses"] == 0 and tunebook.stats()["fallbacks"] == 0


def test_serve_mode_runs_the_hand_picked_config(gen) -> None:  # type: ignore[no-untyped-def]
    silu_and_mul(randn(gen, 2, 2 * 768))
    cfg = _silu_and_mul_kernel.best_config
    assert {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} == hand_picked({"D": 768})
    assert tunebook.stats()["benchmarked"] == 0


def test_config_sweep(gen) -> None:  # type: ignore[no-untyped-def]
    """Configs with one block per row, looping programs whose last block is ragged, several
    rows per program: all compute the same thing."""
    n_rows, d = 5, 1000
    configs = sweep_configs(SPACE, {"D": d, "n_rows": n_rows})
    assert {cfg["BLOCK_D"] for cfg in configs} >= {64, 1024}
    assert {cfg["LOOP"] for cfg in configs} >= {1, 4}
    x = randn(gen, n_rows, 2 * d, dtype=torch.bfloat16)
    for cfg in configs:
        check(x, cfg)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: silu_and_mul(x.int()), "x must be float16, bfloat16 or float32; found torch.int32"),
        (lambda x: silu_and_mul(x[:, :63]), r"last dimension must be 2\*d .* found shape \(2, 63\)"),
        (lambda x: silu_and_mul(x[:, :0]), r"last dimension must be 2\*d"),
        (lambda x: silu_and_mul(x, out=torch.empty(2, 64)), r"out must have shape \(2, 32\)"),
        (lambda x: silu_and_mul(x, out=x[:, :32]), "out shares memory with x"),
        (lambda x: silu_and_mul(x, out=torch.empty(32, 2).t()), "must be viewable as rows of 32"),
        (lambda x: silu_and_mul([1.0, 2.0]), "x must be a torch.Tensor; found list"),
    ],
)
def test_rejects_bad_inputs(gen, call, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call(randn(gen, 2, 64))
