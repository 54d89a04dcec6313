"""On the CPU (Triton's interpreter) every index tensor of the pack is checked before the
launch: an index past its tensor there reads or writes the process's own memory. Before
these checks, a slot past the cache returned None having written outside it, and a bad
offset corrupted the heap (``malloc(): unaligned tcache chunk detected``, the process gone)."""

from __future__ import annotations

import pytest
import torch

from tunebook.kernels import cos_sin_cache as make_cos_sin_cache
from tunebook.kernels import paged_attention_decode, reshape_and_cache, rotary_embedding, varlen_attention

PAGE = 4


def caches(blocks: int = 3, heads: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(blocks, PAGE, heads, size), torch.zeros(blocks, PAGE, heads, size)


def test_a_slot_past_the_caches_is_refused_and_nothing_is_written() -> None:
    k_cache, v_cache = caches()  # 12 slots
    key, value = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    with pytest.raises(
        ValueError, match=r"slot_mapping\[1\] = 12 must be below 12 \(the caches hold 12 slots"
    ):
        reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([0, 12]))
    assert not k_cache.any() and not v_cache.any()
    reshape_and_cache(key, value, k_cache, v_cache, torch.tensor([11, -1]))  # the last slot; -1: none
    assert torch.equal(k_cache[2, 3], key[0]) and int(k_cache.ne(0).sum()) == 16


@pytest.mark.parametrize("position", [8, -1])
def test_a_position_outside_the_cos_sin_cache_is_refused(position: int) -> None:
    table = make_cos_sin_cache(16, 8)  # positions 0..7
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(
        ValueError, match=rf"positions\[1\] = {position} must be in \[0, 8\) \(cos_sin_cache has 8 rows"
    ):
        rotary_embedding(q, k, torch.tensor([0, position]), table)


def test_decode_block_table_entries_a_sequence_reads_must_be_blocks_of_the_caches() -> None:
    k_cache, v_cache = caches()
    q = torch.randn(2, 2, 16)
    lens = torch.tensor([5, 3], dtype=torch.int32)  # 2 blocks and 1 block
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)  # -1: past sequence 1's blocks
    assert paged_attention_decode(q, k_cache, v_cache, table, lens).shape == (2, 2, 16)
    bad = torch.tensor([[0, 3], [2, -1]], dtype=torch.int32)  # block 3 of 3
    with pytest.raises(
        ValueError, match=r"block_table\[0, 1\] = 3 must be in \[0, 3\) \(the caches hold 3 blocks"
    ):
        paged_attention_decode(q, k_cache, v_cache, bad, lens, max_context_len=8)
    long = torch.tensor([5, 9], dtype=torch.int32)  # past the 2-block row; max_context_len given
    with pytest.raises(
        ValueError, match=r"context_lens\[1\] = 9 must be at most 8 \(a block-table row holds 2 blocks"
    ):
        paged_attention_decode(q, k_cache, v_cache, table, long, max_context_len=8)


def test_prefill_offsets_and_prefix_blocks_are_checked_even_where_the_sizes_are_given() -> None:
    q, k, v = torch.randn(5, 2, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    past = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be offsets .* q's 5 rows; found \[0, 3, 6\]"):
        varlen_attention(q, k, v, past, past, max_seqlen_q=3, max_seqlen_k=3)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    k_cache, v_cache = caches()
    prefix = torch.tensor([4, 1], dtype=torch.int32)
    table = torch.tensor([[1, 5], [0, 7]], dtype=torch.int32)  # entries past each prefix: never read
    out = varlen_attention(
        q, k, v, cu, cu, max_seqlen_q=3, max_seqlen_k=7,
        k_cache=k_cache, v_cache=v_cache, block_table=table, prefix_lens=prefix,
    )  # fmt: skip
    assert out.shape == (5, 2, 16)
    untouched = torch.full_like(q, float("nan"))
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 5 must be in \[0, 3\)"):
        varlen_attention(
            q, k, v, cu, cu, max_seqlen_q=3, max_seqlen_k=7,
            k_cache=k_cache, v_cache=v_cache, block_table=table.flip(1), prefix_lens=prefix, out=untouched,
        )  # fmt: skip
    assert untouched.isnan().all(), "the refused call launched nothing"


# ------------------------------------------------------- offsets computed in 32 bits
#
# A head's offset (head x head stride) and, in decode, a sequence's (sequence x batch
# stride) are computed in 32 bits by the kernels. A legal layout whose offset passes 2^31 - 1
# (a head-major cache, whose head stride spans one head's whole cache) once wrapped and wrote
# gigabytes away from the tensor. The views below have a head stride of 2^30 + 64 over 3 heads
# (the last head at 2^31 + 128): 4 GiB of address space, of which no page is touched, since
# the call is refused before any launch (and a launch would fail the test, not write).

HEAD_STRIDE = 2**30 + 64  # fits in 32 bits, as Triton passes it; 2 x it does not
PAST = f"{2 * HEAD_STRIDE:,}"


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunebook.kernels import _common

    def launched(*args: object, **kwargs: object) -> None:
        raise AssertionError("launched: the kernel would have wrapped an offset past 2^31 - 1")

    monkeypatch.setattr(_common, "launch", launched)


def far_heads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head-major (k_cache, v_cache) pair [2 blocks, PAGE, 3 heads, 16], and q [2, 3, 16]
    whose heads are as far apart, all views of one lazily allocated buffer."""
    buffer = torch.empty(2**31 + 1024, dtype=torch.float16)  # no page touched
    shape, strides = (2, PAGE, 3, 16), (PAGE * 16, 16, HEAD_STRIDE, 1)
    k_cache = buffer.as_strided(shape, strides, 0)
    v_cache = buffer.as_strided(shape, strides, 256)
    q = buffer.as_strided((2, 3, 16), (16, HEAD_STRIDE, 1), 512)
    return k_cache, v_cache, q


def test_a_head_offset_past_32_bits_is_refused_by_reshape_and_cache(no_launch: None) -> None:
    k_cache, v_cache, _ = far_heads()
    key = torch.randn(2, 3, 16, dtype=torch.float16)
    with pytest.raises(
        ValueError,
        match=rf"k_cache's last head starts at element offset {PAST} \(2 x its stride .*token-major",
    ):
        reshape_and_cache(key, key.clone(), k_cache, v_cache, torch.tensor([0, 5]))


def test_a_head_offset_past_32_bits_is_refused_by_paged_decode(no_launch: None) -> None:
    k_cache, v_cache, _ = far_heads()
    q, table = torch.randn(1, 3, 16, dtype=torch.float16), torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match=rf"k_cache's last KV head starts at element offset {PAST}"):
        paged_attention_decode(q, k_cache, v_cache, table, torch.tensor([5]))


def test_a_head_offset_past_32_bits_is_refused_by_varlen_and_rotary(no_launch: None) -> None:
    k_cache, v_cache, q = far_heads()
    k = torch.randn(2, 3, 16, dtype=torch.float16)
    cu = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=rf"q's last head starts at element offset {PAST}"):
        varlen_attention(q, k, k.clone(), cu, cu)
    paged = {"k_cache": k_cache, "v_cache": v_cache, "block_table": torch.tensor([[0]])}
    with pytest.raises(ValueError, match=rf"k_cache's last KV head starts at element offset {PAST}"):
        varlen_attention(k, k, k.clone(), cu, cu, prefix_lens=torch.tensor([3]), **paged)
    with pytest.raises(ValueError, match=rf"q's last head starts at element offset {PAST}"):
        rotary_embedding(q, k, torch.tensor([0, 1]), make_cos_sin_cache(16, 8, dtype=torch.float16))


def test_the_32_bit_bound_is_exact() -> None:
    from tunebook.kernels._common import INT32_MAX, check_offsets

    check_offsets("op", [("t", "head", 2, INT32_MAX)], "fix")  # the largest offset that fits
    check_offsets("op", [("t", "head", 3, INT32_MAX + 1)], "fix")  # a 64-bit stride: 64-bit products
    check_offsets("op", [("t", "head", 1, 2**40)], "fix")  # one head: offset 0
    with pytest.raises(ValueError, match=r"t's last head starts at element offset 2,147,483,648 .*; fix"):
        check_offsets("op", [("t", "head", 3, 2**30)], "fix")
