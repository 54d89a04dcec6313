"""Write new tokens' keys and values into the paged KV cache (vLLM's ``reshape_and_cache_flash``).

For token ``t`` with ``slot = slot_mapping[t] >= 0``::

    k_cache[slot // block_size, slot % block_size] = key[t]       # [NK, head_size]
    v_cache[slot // block_size, slot % block_size] = value[t]

and a token with ``slot < 0`` (vLLM's padding, -1) writes nothing. The caches are
``[num_blocks, block_size, NK, head_size]`` (the layout in ``_attention``) of the keys'
dtype; values are copied, not converted. Slots must be distinct (two tokens writing one
slot leave either value).

This op writes **in place**, unlike the rest of the pack: filling the cache is its whole
purpose. Tuning reruns it on the call's own arguments, which is harmless here: writing the
same values to the same slots again changes nothing (the op is idempotent), so every
measurement leaves the cache as one call does.

Kernel: a program copies ``BLOCK_T`` tokens x ``BLOCK_H`` heads x ``head_size`` of both
keys and values; the grid is (token tiles, head tiles). One token with all of its heads per
program is vLLM's launch. The key is the token count bucketed onto serving batch sizes, the
KV heads and head size exactly, and the dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from . import _attention as a
from . import _common as c

_OP = "reshape_and_cache"


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    block_d = c.pow2_at_least(args["HEAD_SIZE"])
    if not c.threads_fit(cfg["BLOCK_T"] * cfg["BLOCK_H"] * block_d, cfg["num_warps"]):
        return False
    if cfg["BLOCK_H"] > c.pow2_at_least(args["NK"]):
        return False  # only masked-off heads
    return cfg["BLOCK_T"] <= c.bucket_of(args["n_tokens"])


SPACE = tunebook.Space(
    BLOCK_T=[1, 2, 4, 8, 16],
    BLOCK_H=[1, 2, 4, 8, 16, 32],
    num_warps=[1, 2, 4, 8],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """vLLM's launch: one program per token covering all of its heads, 4 warps."""
    return {"BLOCK_T": 1, "BLOCK_H": c.pow2_at_least(key["NK"]), "num_warps": 4}


@c.autotune(
    _OP,
    SPACE,
    key=[c.token_bucket("n_tokens"), "NK", "HEAD_SIZE"],
    hand_picked=hand_picked,
    inputs=lambda description: _inputs(description),
)
@triton.jit(do_not_specialize=["n_tokens"])
def _reshape_and_cache_kernel(
    key_ptr,
    key_stride_t,
    key_stride_h,
    value_ptr,
    value_stride_t,
    value_stride_h,
    k_cache_ptr,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    v_cache_ptr,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    slot_ptr,
    n_tokens,
    NK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    mask = (slot >= 0)[:, None, None] & (heads < NK)[None, :, None] & (d < HEAD_SIZE)[None, None, :]
    tok = tok.to(tl.int64)[:, None, None]
    block = (slot // PAGE)[:, None, None]
    offset = (slot % PAGE)[:, None, None]
    h = heads[None, :, None]
    e = d[None, None, :]
    k = tl.load(key_ptr + tok * key_stride_t + h * key_stride_h + e, mask=mask)
    tl.store(k_cache_ptr + block * kc_stride_b + offset * kc_stride_s + h * kc_stride_h + e, k, mask=mask)
    v = tl.load(value_ptr + tok * value_stride_t + h * value_stride_h + e, mask=mask)
    tl.store(v_cache_ptr + block * vc_stride_b + offset * vc_stride_s + h * vc_stride_h + e, v, mask=mask)


@c.graph_break
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[tokens, NK, head_size]`` into the paged caches at
    ``slot_mapping`` ``[tokens]`` (int32/int64; a negative slot writes nothing; a slot past
    the cache, ``num_blocks * block_size`` or more, is not checked on a GPU, as in vLLM:
    checking it would wait for the GPU; on the CPU it is a ValueError; ``k_cache`` and
    ``v_cache`` must be two tensors). Token and head strides are free (slices of a fused
    QKV output work); last dimensions contiguous. Writes the caches in place and returns
    None.

    >>> import torch
    >>> from tunebook.kernels import reshape_and_cache
    >>> k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    >>> key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    >>> reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    >>> torch.equal(k_cache[1, 1], key[0]), torch.equal(v_cache[0, 0], value[2]), int(k_cache.ne(0).sum())
    (True, True, 16)
    """
    _reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def _reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    config: dict[str, int] | None = None,
) -> None:
    """:func:`reshape_and_cache`, launched with ``config`` (BLOCK_T, BLOCK_H, num_warps)
    instead of the tuned one when given: tests and benchmarks use it."""
    for name, t in (("key", key), ("value", value)):
        a.check_heads(_OP, name, t)
    if value.shape != key.shape or value.dtype != key.dtype:
        c.fail(
            _OP,
            f"value must have key's shape {tuple(key.shape)} and dtype {key.dtype}; found "
            f"{tuple(value.shape)} {value.dtype}",
        )
    n_tokens, n_kv, head_size = key.shape
    a.check_cache(_OP, k_cache, v_cache, n_kv, head_size, key.dtype, dtype_of="key")
    a.check_index(_OP, "slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != n_tokens:
        c.fail(
            _OP, f"slot_mapping must have one slot per token ({n_tokens}); found {tuple(slot_mapping.shape)}"
        )
    c.check_same_device(
        _OP, key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        c.check_written(_OP, name, cache)
    if c.may_overlap(k_cache, v_cache):  # the values would overwrite the keys
        c.fail(
            _OP,
            "k_cache and v_cache share memory (one tensor given twice?); pass two caches (or two "
            "disjoint views, e.g. kv[:, 0] and kv[:, 1])",
        )
    for cache in (k_cache, v_cache):
        for name, t in (("key", key), ("value", value)):
            if c.may_overlap(cache, t):
                c.fail(_OP, f"{name} shares memory with the cache it is written into; pass a separate tensor")
    if n_tokens == 0 or head_size == 0:
        return
    slots = k_cache.shape[0] * k_cache.shape[1]
    c.check_indices_on_cpu(
        _OP, "slot_mapping", slot_mapping, None, slots, f"the caches hold {slots} slots; negative: none"
    )
    # A head's offset (head x head stride) is computed in 32 bits; tokens and slots in 64.
    c.check_offsets(
        _OP,
        [(name, "head", n_kv, t.stride(ax)) for name, t, ax in
         (("key", key, 1), ("value", value, 1), ("k_cache", k_cache, 2), ("v_cache", v_cache, 2))],
        "pass it token-major (a cache as [num_blocks, block_size, NK, head_size] contiguous, a token's "
        "heads side by side; a head-major cache's head stride spans a whole head's cache)",
    )  # fmt: skip
    grid, args = _launch(key, value, k_cache, v_cache, slot_mapping)
    c.launch(_reshape_and_cache_kernel, grid, args, config)


def _launch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[Any, tuple[Any, ...]]:
    """The kernel's grid and arguments for checked inputs."""
    n_tokens, n_kv, head_size = key.shape
    slots = a.rows_contiguous(slot_mapping)
    args = (
        *(key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1)),
        *(k_cache, *k_cache.stride()[:3], v_cache, *v_cache.stride()[:3]),
        *(slots, n_tokens, n_kv, head_size, k_cache.shape[1], c.pow2_at_least(head_size)),
    )

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (c.cdiv(n_tokens, meta["BLOCK_T"]), c.cdiv(n_kv, meta["BLOCK_H"]))

    return grid, args


def _inputs(description: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A call of the key's shape for offline tuning (``tunebook tune``): ``n_tokens``
    tokens written into shuffled blocks of 16, as the benchmarks build them (a recorded
    call's layout alone would send every token to slot 0)."""
    from . import _models

    key = description["key"]
    shape = {"n_kv": key["NK"], "head_size": key["HEAD_SIZE"], "page": _models.PAGE}
    dtype = a.recorded_dtype(description.get("call"), "key_ptr", _reshape_and_cache_kernel)
    t = _models.workload(_OP, shape, key["n_tokens"], dtype, a.tuning_device()).tensors
    grid, args = _launch(t["key"], t["value"], t["k_cache"], t["v_cache"], t["slot_mapping"])
    return grid, args, {}
