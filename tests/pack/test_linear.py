"""tunebook.kernels.linear against an fp64 PyTorch reference, in the CPU interpreter.

Most tests run in serve mode (no benchmarking: the kernel's default rule picks the
config); explicit configs sweep the corners the rule does not reach (largest tiles,
split-K, grouped tile order). One test tunes for real and reads the book back in a new
process.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import tunebook
from conftest import run_python
from tunebook.kernels.linear import default_linear_config, linear, linear_space, max_split_k

from .gemm_reference import TF32_TOL, assert_close, generator, poisoned, randn

# The package re-exports the function under the module's name: reach the module itself.
linear_mod = importlib.import_module("tunebook.kernels.linear")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def inputs(M: int, N: int, K: int, dtype: torch.dtype, bias: bool, *case: object):
    gen = generator(M, N, K, dtype, bias, *case)
    x = randn((M, K), dtype, gen)
    w = randn((N, K), dtype, gen, scale=K**-0.5)
    b = randn((N,), dtype, gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,N,K", [(1, 40, 24), (3, 100, 72), (17, 40, 72), (70, 100, 24)])
def test_matches_reference(M, N, K, dtype, bias):
    x, w, b = inputs(M, N, K, dtype, bias)
    y = linear(x, w, b, out=poisoned((M, N), dtype))
    assert_close(y, reference(x, w, b), dtype)


CONFIGS = {
    "smallest": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=1, num_warps=2, num_stages=2),
    "largest": dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=2),
    "grouped": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, SPLIT_K=1, num_warps=4, num_stages=3),
    "split2": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2, num_warps=4, num_stages=2),
    "split4_uneven": dict(
        BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, SPLIT_K=4, num_warps=4, num_stages=3
    ),
    "split16": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=16, num_warps=4, num_stages=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("M,N,K", [(1, 40, 520), (37, 100, 200)])
def test_explicit_configs(name, M, N, K):
    # K=520 and 200 leave the last split a short (or empty) share of the K steps.
    dtype = torch.bfloat16
    x, w, b = inputs(M, N, K, dtype, True, name)
    y = linear(x, w, b, out=poisoned((M, N), dtype), config=CONFIGS[name])
    assert_close(y, reference(x, w, b), dtype)


def test_split_k_is_deterministic_and_leaves_counters_at_zero():
    x, w, b = inputs(5, 100, 512, torch.float32, True)
    config = CONFIGS["split4_uneven"]
    first = linear(x, w, b, config=config)
    again = linear(x, w, b, config=config)
    assert torch.equal(first, again)
    for buf in linear_mod._counters._buffers.values():
        assert int(buf.abs().sum()) == 0


def test_leading_dims_and_non_contiguous_inputs():
    dtype = torch.float16
    gen = generator("strided")
    big = randn((2, 3, 2 * 72), dtype, gen)
    x = big[..., ::2]  # [2, 3, 72], stride 2 along K
    w = randn((72, 40), dtype, gen, scale=72**-0.5).T  # [40, 72] with strides (1, 40)
    b = randn((40,), dtype, gen)
    y = linear(x, w, b, out=poisoned((2, 3, 40), dtype))
    assert_close(y, reference(x.reshape(6, 72), w, b).reshape(2, 3, 40), dtype)
    xt = randn((72, 5), dtype, gen).T  # a transposed 2-D x is read through its strides
    assert_close(linear(xt, w), reference(xt, w, None), dtype)


def test_tf32_products():
    x, w, b = inputs(3, 40, 72, torch.float32, False)
    assert_close(linear(x, w, b, fp32_precision="tf32"), reference(x, w, b), torch.float32, TF32_TOL)


def test_empty_inputs_launch_nothing():
    w = torch.randn(40, 24)
    assert linear(torch.empty(0, 24), w).shape == (0, 40)
    assert linear(torch.empty(2, 0, 24), w).shape == (2, 0, 40)
    b = torch.randn(5)
    assert torch.equal(linear(torch.empty(3, 0), torch.empty(5, 0), b), b.expand(3, 5))
    assert tunebook.stats()["fallbacks"] == 0  # no kernel call was made


def _config(**change: object) -> dict[str, object]:
    """A whole explicit config of the pointer kernel, with ``change`` applied."""
    return {
        "BLOCK_M": 16,
        "BLOCK_N": 16,
        "BLOCK_K": 16,
        "GROUP_M": 1,
        "num_warps": 4,
        "num_stages": 1,
        **change,
    }


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.randn(3, 24), torch.randn(40, 25)), {}, "K = weight.shape"),
        ((torch.randn(3, 24), torch.randn(40, 24, 1)), {}, "2-D"),
        ((torch.randn(3, 24), torch.randn(40, 24).half()), {}, "weight must have x's dtype"),
        ((torch.randn(3, 24).int(), torch.randn(40, 24).int()), {}, "bfloat16, float16 or float32"),
        ((torch.randn(3, 24), torch.randn(40, 24), torch.randn(41)), {}, "bias must be"),
        ((torch.randn(3, 24), torch.randn(40, 24)), {"out": torch.empty(3, 41)}, "out must be"),
        ((torch.randn(3, 24), torch.randn(40, 24)), {"fp32_precision": "tf64"}, "fp32_precision"),
        # a partial explicit config raised a bare KeyError('BLOCK_N')
        (
            (torch.randn(3, 24), torch.randn(40, 24)),
            {"config": {"BLOCK_M": 16}},
            "config lacks BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages",
        ),
        ((torch.randn(3, 24), torch.randn(40, 24)), {"config": [16, 32]}, "config must be a dict"),
    ],
)
def test_errors_say_what_was_expected(args, kwargs, message):
    """Each a ValueError, as docs/kernels.md says of every op (a dtype once gave a TypeError)."""
    with pytest.raises(ValueError, match=message):
        linear(*args, **kwargs)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"GROUP_M": -1}, "config's GROUP_M must be a whole number of at least 1; found -1"),
        ({"GROUP_M": 0}, "config's GROUP_M must be a whole number of at least 1; found 0"),
        ({"SPLIT_K": 0}, "config's SPLIT_K must be a whole number of at least 1; found 0"),
        ({"BLOCK_M": 12}, "config's BLOCK_M must be a power of two; found 12"),
        ({"BLOCK_N": 16.0}, "config's BLOCK_N must be a power of two; found 16.0"),
        ({"num_warps": True}, "config's num_warps must be a power of two; found True"),
    ],
)
def test_an_explicit_configs_values_are_checked_before_a_launch(change, message):
    """They reached the kernel: GROUP_M=-1 wrote out of bounds (the interpreter's process
    aborted), GROUP_M=0 left rows unwritten, SPLIT_K=0 launched nothing and returned out as
    it was, a tile of 12 failed inside Triton."""
    with pytest.raises(ValueError, match=f"^tunebook.kernels.linear: {message}$"):
        linear(torch.randn(40, 32), torch.randn(48, 32), config=_config(**change))


def test_a_bias_or_out_of_the_wrong_kind_is_named():
    """They once ended in an AttributeError ('list' object has no attribute 'shape') or in
    torch's "view size is not compatible"."""
    x, w = torch.randn(2, 3, 24), torch.randn(40, 24)
    with pytest.raises(
        TypeError, match=r"^tunebook\.kernels\.linear: bias must be a torch tensor or None; found list$"
    ):
        linear(x, w, [0.0] * 40)
    with pytest.raises(
        TypeError, match=r"^tunebook\.kernels\.linear: out must be a torch tensor or None; found int$"
    ):
        linear(x, w, out=3)
    out = torch.empty(3, 2, 40).transpose(0, 1)  # [2, 3, 40]: its two leading dims are not one
    with pytest.raises(
        ValueError, match=r"^tunebook\.kernels\.linear: out's leading dimensions cannot be viewed as one"
    ):
        linear(x, w, out=out)
    columns = torch.empty(2, 3, 80)[..., ::2]  # strided rows are fine: written in place
    assert linear(x, w, out=columns) is columns
    assert_close(columns, reference(x, w, None), torch.float32)


def test_space_and_default_rule():
    space = linear_space()
    assert 1000 <= len(space) <= 10000
    args = {"M": 1, "N": 4096, "K": 4096}
    cands = space.candidates(args=args)
    assert cands and all(c["BLOCK_M"] == 16 for c in cands)
    assert any(c["SPLIT_K"] > 1 for c in cands)
    assert not any(c["SPLIT_K"] > 1 for c in space.candidates(args={"M": 4096, "N": 4096, "K": 4096}))
    assert max_split_k(1, 28672, 4096) == 4 and max_split_k(65, 4096, 4096) == 1
    rule = default_linear_config(1, 4096, 4096)
    assert rule in cands  # the serve-mode rule is a config of the space
    assert default_linear_config(4096, 4096, 4096) in space.candidates(args={"M": 4096, "N": 4096, "K": 4096})


TUNE_CHILD = """
import importlib, json, torch, tunebook
mod = importlib.import_module("tunebook.kernels.linear")
x, w = torch.randn(3, 40), torch.randn(24, 40)
y = mod.linear(x, w)
assert torch.allclose(y, x @ w.T, atol=1e-4)
print(json.dumps(tunebook.stats()))
"""


@pytest.mark.once  # persistence across processes is the core's, tested on every Triton (test_persistence.py)
def test_tune_then_a_new_process_benchmarks_nothing(book_dir):
    env = {"TUNEBOOK_MODE": "tune", "TUNEBOOK_DIR": str(book_dir), "TUNEBOOK_KERNELS_MAX_CONFIGS": "3"}
    first = run_python(TUNE_CHILD, env=env)
    assert first["benchmarked"] == 3
    second = run_python(TUNE_CHILD, env=env)
    assert second["benchmarked"] == 0 and second["book_hits"] == 1
