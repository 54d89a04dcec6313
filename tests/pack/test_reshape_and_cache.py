"""reshape_and_cache against an index_copy_ reference on the CPU interpreter: every written
slot holds its token's key and value exactly, padding slots (-1) write nothing, every other
slot is left as it was."""

from __future__ import annotations

import pytest
import torch

import tunebook
from tunebook.kernels import reshape_and_cache
from tunebook.kernels.reshape_and_cache import (
    SPACE,
    _reshape_and_cache,
    _reshape_and_cache_kernel,
    hand_picked,
)

from .packutil import DTYPES, randn, sweep_configs

PAGE = 16


def expected(key, value, k_cache, v_cache, slots):  # type: ignore[no-untyped-def]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_ref.view(-1, *k_ref.shape[2:])[slots[keep].long()] = key[keep]
    v_ref.view(-1, *v_ref.shape[2:])[slots[keep].long()] = value[keep]
    return k_ref, v_ref


def check(key, value, k_cache, v_cache, slots, config=None) -> None:  # type: ignore[no-untyped-def]
    """The caches start poisoned: a slot the kernel should not touch stays NaN, and one it
    should write must match exactly (a copy, no arithmetic)."""
    k_ref, v_ref = expected(key, value, k_cache, v_cache, slots)
    inputs = [t.clone() for t in (key, value, slots)]
    _reshape_and_cache(key, value, k_cache, v_cache, slots, config)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (key, value, slots))), "an input was modified"


def caches(blocks: int, n_kv: int, head_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    poison = torch.full((blocks, PAGE, n_kv, head_size), float("nan"), dtype=dtype)
    return poison, poison.clone()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_kv", "head_size"), [(2, 64), (1, 128), (3, 80)], ids=str)
def test_scatters_into_slots(gen, dtype, n_kv, head_size) -> None:  # type: ignore[no-untyped-def]
    """Slots across blocks in no order, padding slots, a head size that is not a power of two."""
    k_cache, v_cache = caches(4, n_kv, head_size, dtype)
    slots = torch.tensor([5, -1, 17, 63, 0, 16, -1, 40], dtype=torch.int64)
    key = randn(gen, len(slots), n_kv, head_size, dtype=dtype)
    check(key, randn(gen, len(slots), n_kv, head_size, dtype=dtype), k_cache, v_cache, slots)
    assert tunebook.stats()["benchmarked"] == 0


def test_strided_key_and_value_from_a_fused_projection(gen) -> None:  # type: ignore[no-untyped-def]
    """Key and value as head slices of one QKV output [tokens, q + k + v heads, size]."""
    qkv = randn(gen, 5, 4 + 2 + 2, 64, dtype=torch.bfloat16)
    k_cache, v_cache = caches(2, 2, 64, torch.bfloat16)
    check(qkv[:, 4:6], qkv[:, 6:], k_cache, v_cache, torch.tensor([3, 4, 30, 31, 9], dtype=torch.int32))


def test_rerunning_changes_nothing(gen) -> None:  # type: ignore[no-untyped-def]
    """Tuning reruns the op on the call's own arguments: an idempotent write stays right."""
    k_cache, v_cache = caches(2, 1, 64, torch.float16)
    slots = torch.tensor([7, 8, 20])
    key, value = randn(gen, 3, 1, 64, dtype=torch.float16), randn(gen, 3, 1, 64, dtype=torch.float16)
    k_ref, v_ref = expected(key, value, k_cache, v_cache, slots)
    for _ in range(2):
        reshape_and_cache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


def test_config_sweep(gen) -> None:  # type: ignore[no-untyped-def]
    configs = sweep_configs(SPACE, {"n_tokens": 9, "NK": 3, "HEAD_SIZE": 64})
    assert {c["BLOCK_T"] for c in configs} >= {1, 16} and {c["BLOCK_H"] for c in configs} >= {1, 4}
    slots = torch.randperm(4 * PAGE, generator=gen)[:9]
    slots[2] = -1
    key, value = randn(gen, 9, 3, 64), randn(gen, 9, 3, 64)
    for config in configs:
        k_cache, v_cache = caches(4, 3, 64, torch.float32)
        check(key, value, k_cache, v_cache, slots, config)


def test_serve_mode_runs_the_hand_picked_config(gen) -> None:  # type: ignore[no-untyped-def]
    k_cache, v_cache = caches(1, 8, 64, torch.bfloat16)
    key = randn(gen, 2, 8, 64, dtype=torch.bfloat16)
    reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([0, 1]))
    cfg = _reshape_and_cache_kernel.best_config
    assert {**cfg.kwargs, "num_warps": cfg.num_warps} == hand_picked({"NK": 8})


def test_no_tokens_launch_nothing() -> None:
    k_cache, v_cache = caches(1, 1, 64, torch.float32)
    reshape_and_cache(
        torch.zeros(0, 1, 64), torch.zeros(0, 1, 64), k_cache, v_cache, torch.zeros(0, dtype=torch.int64)
    )
    assert tunebook.stats()["misses"] == 0 and bool(k_cache.isnan().all())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"value": torch.zeros(3, 2, 32)}, "value must have key's shape"),
        (
            {"k_cache": torch.zeros(2, PAGE, 2, 64, dtype=torch.float16)},
            "k_cache must have key's dtype torch.float32; found torch.float16",
        ),
        ({"v_cache": "k_cache"}, "k_cache and v_cache share memory"),  # one tensor given twice
        ({"slot_mapping": torch.tensor([1, 2])}, r"one slot per token \(3\)"),
        ({"slot_mapping": torch.tensor([1.0, 2.0, 3.0])}, "slot_mapping must be a 1-D int32 or int64"),
        ({"key": None}, "key shares memory with the cache"),  # None: a view of k_cache
    ],
)
def test_rejects_bad_inputs(changes, match) -> None:  # type: ignore[no-untyped-def]
    k_cache, v_cache = torch.zeros(2, PAGE, 2, 64), torch.zeros(2, PAGE, 2, 64)
    args = {
        "key": torch.zeros(3, 2, 64),
        "value": torch.zeros(3, 2, 64),
        "k_cache": k_cache,
        "v_cache": v_cache,
    }
    args["slot_mapping"] = torch.tensor([0, 1, 2])
    args.update(changes)
    if args["key"] is None:
        args["key"] = k_cache[0, :3]
    if args["v_cache"] == "k_cache":
        args["v_cache"] = k_cache
    with pytest.raises(ValueError, match=match):
        reshape_and_cache(**args)
