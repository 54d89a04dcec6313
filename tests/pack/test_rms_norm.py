"""rms_norm against a float64 PyTorch reference, on the CPU interpreter."""

from __future__ import annotations

import pytest
import torch

import tunebook
from tunebook.kernels import rms_norm
from tunebook.kernels.rms_norm import SPACE, _rms_norm, _rms_norm_kernel, hand_picked

from .packutil import DTYPES, assert_close, poisoned, randn, sweep_configs

EPS = 1e-6


def reference(h: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def check(x, w, residual=None, *, eps=EPS, config=None):  # type: ignore[no-untyped-def]
    """Run the op into poisoned outputs and compare with the reference; inputs untouched."""
    before = [t.clone() for t in (x, w, residual) if t is not None]
    out = poisoned(x.shape, x.dtype)
    if residual is None:
        y = _rms_norm(x, w, eps, None, out, None, config)
        assert y is out
        assert_close(y, reference(x, w, eps))
    else:
        h_out = poisoned(x.shape, residual.dtype)
        y, h = _rms_norm(x, w, eps, residual, out, h_out, config)
        assert y is out and h is h_out
        assert_close(h, x.double() + residual.double(), "h")
        # y is the norm of exactly the h returned (its rounding included).
        assert_close(y, reference(h, w, eps), "y")
    after = [t for t in (x, w, residual) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 100), (3, 576), (5, 1000)], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_matches_reference(gen, dtype, shape, fused) -> None:  # type: ignore[no-untyped-def]
    x = randn(gen, *shape, dtype=dtype)
    w = randn(gen, shape[-1], dtype=dtype)
    check(x, w, randn(gen, *shape, dtype=dtype) if fused else None)


def test_new_tensors_by_default(gen) -> None:  # type: ignore[no-untyped-def]
    x, w, r = randn(gen, 2, 3, 64), randn(gen, 64), randn(gen, 2, 3, 64)
    y = rms_norm(x, w)
    y2, h = rms_norm(x, w, residual=r)
    assert y.shape == y2.shape == h.shape == x.shape
    assert_close(y, reference(x, w))
    assert_close(h, x.double() + r.double(), "h")
    assert_close(rms_norm(x[0, 0], w), reference(x[0, 0], w))  # one vector, no row dimension


def test_mixed_dtypes(gen) -> None:  # type: ignore[no-untyped-def]
    """fp32 weights and an fp32 residual stream under bf16 activations."""
    x = randn(gen, 3, 200, dtype=torch.bfloat16)
    w, r = randn(gen, 200), randn(gen, 3, 200)
    y, h = rms_norm(x, w, residual=r)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(h, x.double() + r.double(), "h")
    assert_close(y, reference(h, w), "y")


def test_strided_rows(gen) -> None:  # type: ignore[no-untyped-def]
    """Rows of a wider buffer (row stride 300 for 100 columns), and a 3-D input whose rows
    interleave with another tensor's, are read in place; out may be strided too."""
    wide = randn(gen, 4, 300, dtype=torch.float16)
    x, r = wide[:, :100], wide[:, 200:]
    w = randn(gen, 100, dtype=torch.float16)
    check(x, w)
    check(x, w, r)
    x3 = randn(gen, 2, 3, 2, 64).transpose(1, 2)[:, 0]  # [2, 3, 64], strides (384, 128, 1)
    check(x3, randn(gen, 64))
    out = poisoned((4, 256), torch.float16)[:, 50:150]
    assert_close(rms_norm(x, w, out=out), reference(x, w))


def test_strided_last_dim_is_copied(gen) -> None:  # type: ignore[no-untyped-def]
    x = randn(gen, 64, 3).t()  # [3, 64], last-dim stride 3
    check(x, randn(gen, 64))


def test_zero_rows_launch_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    x, w = randn(gen, 0, 64), randn(gen, 64)
    assert rms_norm(x, w).shape == (0, 64)
    y, h = rms_norm(x, w, residual=randn(gen, 0, 64))
    assert y.shape == h.shape == (0, 64)
    assert rms_norm(randn(gen, 2, 0, 64), w).shape == (2, 0, 64)
    assert tunebook.stats()["misses"] == 0 and tunebook.stats()["fallbacks"] == 0


def test_serve_mode_runs_the_hand_picked_config(gen) -> None:  # type: ignore[no-untyped-def]
    rms_norm(randn(gen, 2, 576), randn(gen, 576))
    picked = hand_picked({"N": 576})
    cfg = _rms_norm_kernel.best_config
    assert {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages} == picked
    assert tunebook.stats()["benchmarked"] == 0


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_config_sweep(gen, fused) -> None:  # type: ignore[no-untyped-def]
    """Every kind of config computes the same thing, not only the one the tuner picks:
    loop variants with a ragged last block, the one-pass block, many rows per program."""
    n_rows, n = 5, 1000
    configs = sweep_configs(SPACE, {"N": n, "n_rows": n_rows})
    blocks = {cfg["BLOCK_N"] for cfg in configs}
    assert min(blocks) == 256 and max(blocks) == 1024, blocks
    x, w = randn(gen, n_rows, n, dtype=torch.float16), randn(gen, n, dtype=torch.float16)
    r = randn(gen, n_rows, n, dtype=torch.float16) if fused else None
    for cfg in configs:
        check(x, w, r, config=cfg)


def test_hidden_smaller_than_any_block(gen) -> None:  # type: ignore[no-untyped-def]
    check(randn(gen, 3, 8), randn(gen, 8))


def test_eps(gen) -> None:  # type: ignore[no-untyped-def]
    x = randn(gen, 2, 64) * 1e-3  # mean(x^2) ~ 1e-6: eps matters
    check(x, randn(gen, 64), eps=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, w: rms_norm(x.int(), w), "x must be float16, bfloat16 or float32; found torch.int32"),
        (lambda x, w: rms_norm(x, w[:10]), r"weight must have shape \(64,\) .* found \(10,\)"),
        (
            lambda x, w: rms_norm(x, w, residual=x[:1]),
            r"residual must have x's shape \(2, 64\); found \(1, 64\)",
        ),
        (lambda x, w: rms_norm(x, w, residual_out=x.clone()), "residual_out is only written when residual"),
        (lambda x, w: rms_norm(x, w, out=torch.empty(2, 64, dtype=torch.half)), "out must have shape"),
        (lambda x, w: rms_norm(x, w, out=x), "out shares memory with x; in-place updates are not supported"),
        (lambda x, w: rms_norm(x, w, eps=-1.0), "eps must be a finite number >= 0; found -1.0"),
        (lambda x, w: rms_norm(x, w, eps=None), "eps must be a finite number >= 0; found a NoneType"),
        (lambda x, w: rms_norm(x, w, eps=float("inf")), "eps must be a finite number >= 0; found inf"),
        (lambda x, w: rms_norm(x, w, eps=float("nan")), "eps must be a finite number >= 0; found nan"),
        (lambda x, w: rms_norm(x, w, x), r"found a Tensor \(the residual comes after eps, or as residual=\)"),
        (lambda x, w: rms_norm(x[:, :0], w[:0]), "non-empty last dimension"),
        (lambda x, w: rms_norm(x, w, out=torch.empty(64, 2).t()), "must be viewable as rows of 64"),
    ],
)
def test_rejects_bad_inputs(gen, call, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call(randn(gen, 2, 64), randn(gen, 64))


def test_torch_compile_breaks_the_graph_at_the_op_and_matches_eager(gen) -> None:  # type: ignore[no-untyped-def]
    """Dynamo once traced into the op (its checks, the autotuner, Triton's launcher) and
    failed deep inside; the op is now a graph break, run eagerly between compiled graphs."""
    import torch._dynamo

    torch._dynamo.reset()

    def block(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y, h = rms_norm(x * 2, w, residual=r)  # type: ignore[misc]
        return y.relu() + h

    x, w, r = randn(gen, 3, 64), randn(gen, 64), randn(gen, 3, 64)
    compiled = torch.compile(block, backend="eager")
    torch.testing.assert_close(compiled(x, w, r), block(x, w, r), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x + 1, w, r), block(x + 1, w, r), rtol=0, atol=0)  # guards hold
    torch._dynamo.reset()
