"""linear's TMA prefill kernel (``tunebook.kernels._linear_tma``) in the CPU interpreter.

Calls of more than 512 rows with TMA-ready operands take it; the interpreter runs it for
fp16 (it misreads bf16 through tensor descriptors, so bf16 stays on the pointer kernel
there). Persistence is exercised: the interpreter launches 4 programs for many more tiles.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton

from conftest import run_python
from tunebook import _compat

from .gemm_reference import assert_close, poisoned
from .test_linear import inputs, reference

linear_mod = importlib.import_module("tunebook.kernels.linear")
tma = importlib.import_module("tunebook.kernels._linear_tma")
linear = linear_mod.linear
FP16 = torch.float16


@pytest.fixture(autouse=True)
def serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOOK_MODE", "serve")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which kernel each call launched: 'tma' or 'pointer'."""
    seen: list[str] = []
    real_launch, real_pointer = tma.launch, linear_mod._linear_kernel

    def spy_launch(*args, **kwargs):
        seen.append("tma")
        return real_launch(*args, **kwargs)

    class SpyPointer:  # the autotuner (book configs) and its .fn (explicit configs)
        def __init__(self, real):
            self.real = real
            self.fn = SpyPointer(real.fn) if hasattr(real, "fn") else None

        def __getitem__(self, grid):
            seen.append("pointer")
            return self.real[grid]

    monkeypatch.setattr(tma, "launch", spy_launch)
    monkeypatch.setattr(linear_mod, "_linear_kernel", SpyPointer(real_pointer))
    return seen


# N, K multiples of 16 elements (TMA's 16-byte rule, which Triton 3.4's interpreter checks
# in elements); N=48 and K=80 leave partial tiles in both directions.
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,N,K", [(513, 48, 80), (1100, 96, 272)])
def test_matches_reference(M, N, K, bias, launches):
    x, w, b = inputs(M, N, K, FP16, bias, "tma")
    y = linear(x, w, b, out=poisoned((M, N), FP16))
    assert launches == ["tma"]
    assert_close(y, reference(x, w, b), FP16)


CONFIGS = {
    "rule": tma.default_linear_tma_config(),
    "small": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2),
    "tall": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_K=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_explicit_configs(name, launches):
    x, w, b = inputs(700, 144, 192, FP16, True, name)
    y = linear(x, w, b, out=poisoned((700, 144), FP16), config=CONFIGS[name])
    assert launches == ["tma"]
    assert_close(y, reference(x, w, b), FP16)


def test_a_split_k_config_takes_the_pointer_kernel(launches):
    # The TMA kernel has no split-K: an explicit SPLIT_K > 1 names the pointer kernel at any M.
    x, w, b = inputs(600, 48, 64, FP16, True, "split")
    config = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2, num_warps=4, num_stages=2)
    assert_close(linear(x, w, b, config=config), reference(x, w, b), FP16)
    assert launches == ["pointer"]


def test_a_config_without_split_k_runs_on_either_kernel(launches):
    # The TMA kernel's rule has no SPLIT_K; where a call takes the pointer kernel it means 1.
    x, w, b = inputs(600, 48, 64, torch.float32, True, "fp32")
    assert_close(linear(x, w, b, config=tma.default_linear_tma_config()), reference(x, w, b), torch.float32)
    assert launches == ["pointer"]


@pytest.mark.parametrize("K", [16, 32])
def test_a_short_k_still_has_a_config(K, launches):
    # BLOCK_K 64 reads past K as zeros: the Space must not come up empty for LoRA-sized K.
    x, w, b = inputs(600, 48, K, FP16, False, "short-k")
    assert_close(linear(x, w, b), reference(x, w, b), FP16)
    assert launches == ["tma"]


def test_what_stays_on_the_pointer_kernel(launches):
    """Few rows, bf16 in the interpreter, unaligned rows, a row stride TMA cannot take: each
    still right, through the pointer kernel."""
    cases = {
        "512 rows": inputs(512, 48, 64, FP16, False),
        "bf16": inputs(600, 48, 64, torch.bfloat16, False),
        "K=72 (144-byte rows)": inputs(600, 48, 72, FP16, False),
    }
    for name, (x, w, b) in cases.items():
        launches.clear()
        assert_close(linear(x, w, b), reference(x, w, b), x.dtype)
        assert launches == ["pointer"], name
    x, w, _ = inputs(600, 48, 64, FP16, False, "expanded")
    launches.clear()
    repeated = x[:1].expand(600, 64)  # every row the same memory: stride 0
    assert_close(linear(repeated, w), reference(repeated, w, None), FP16)
    assert launches == ["pointer"]
    x, w, _ = inputs(600, 48, 64, FP16, False, "offset")
    shifted = torch.empty(600 * 64 + 1, dtype=FP16)[1:].view(600, 64)  # base 2 bytes past 16
    shifted.copy_(x)
    launches.clear()
    assert_close(linear(shifted, w), reference(x, w, None), FP16)
    assert launches == ["pointer"]


def test_a_padded_row_stride_is_read_through_its_stride(launches):
    x, w, b = inputs(600, 48, 64, FP16, True, "padded")
    padded = torch.zeros(600, 96, dtype=FP16)
    padded[:, :64] = x
    view = padded[:, :64]  # rows 192 bytes apart, not 128
    assert_close(linear(view, w, b), reference(x, w, b), FP16)
    assert launches == ["tma"]


@pytest.mark.parametrize("M", [5, 600])
def test_a_strided_bias_is_read_by_element(M):
    # A bias viewed with stride 2 was read as if contiguous (every other element skipped).
    x, w, _ = inputs(M, 48, 64, FP16, False, "strided-bias")
    b = torch.randn(96, dtype=FP16)[::2]
    assert_close(linear(x, w, b), reference(x, w, b), FP16)


def test_space_rule_and_fallback():
    space = tma.linear_tma_space()
    assert len(space) <= 64  # tunebook searches every key of a space this small exhaustively
    llama = space.candidates(args={"M": 4096, "N": 6144, "K": 4096})
    assert tma.default_linear_tma_config() in llama
    assert all(c["BLOCK_M"] * c["BLOCK_N"] >= 64 * 128 for c in llama)
    narrow = space.candidates(args={"M": 4096, "N": 48, "K": 64})
    assert narrow and all(c["BLOCK_N"] == 64 and c["BLOCK_K"] == 64 for c in narrow)
    configs = [triton.Config(c) for c in narrow]
    chosen = tma._fallback((4096, 48, 64), configs)
    assert chosen in configs


def test_ensure_allocator_installs_one_only_where_none_is_set():
    from triton.runtime import _allocation

    holder = _allocation._allocator

    def current():
        return holder.get() if hasattr(holder, "get") else _allocation._allocator

    before = current()

    def ours(size, alignment, stream):
        raise AssertionError("not called here")

    class Theirs:  # with a `get` method of its own, as a pool allocator may have
        def __call__(self, size, alignment, stream):
            raise AssertionError("not called here")

        def get(self, size):
            raise AssertionError("not called here")

    theirs = Theirs()

    try:
        triton.set_allocator(_allocation.NullAllocator())
        _compat.ensure_allocator(ours)
        assert current() is ours
        triton.set_allocator(theirs)
        _compat.ensure_allocator(ours)
        assert current() is theirs  # an application's own allocator stays
    finally:
        triton.set_allocator(before)


def test_importing_the_kernel_installs_the_allocator_for_launches_outside_linear():
    # Tuning workers and sweeps launch the autotuner directly, never through linear().
    out = run_python(
        """
        import json
        from triton.runtime import _allocation
        import tunebook.kernels.linear
        holder = _allocation._allocator
        current = holder.get() if hasattr(holder, "set") else holder
        print(json.dumps({"null": isinstance(current, _allocation.NullAllocator)}))
        """
    )
    assert out["null"] is False
