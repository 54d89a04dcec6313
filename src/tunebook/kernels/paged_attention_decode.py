"""Decode attention over a paged KV cache: one query token per sequence, grouped-query heads.

For sequence ``b`` with ``L = context_lens[b]`` cached tokens, query head ``h`` and its KV
head ``h // (NQ / NK)``, in fp32::

    s_t   = scale * q[b, h] . K[b, t, h // G]          t < L        (G = NQ / NK)
    out[b, h] = sum_t softmax(s)_t V[b, t, h // G]                  (0 when L = 0)

where token ``t`` of sequence ``b`` is ``cache[block_table[b, t // block_size], t %
block_size]`` (the layout is in ``_attention``). A sequence with ``L <= 0`` reads nothing
and gets a zero output (an unused batch slot, e.g. padding up to a CUDA graph's batch
size); block-table entries past ``cdiv(L, block_size)`` are never read and may hold
anything (-1 included).

Kernel: a program takes one (KV head, sequence, split): the ``G`` query heads that share
the KV head ride in one tile (padded to 16 rows for ``tl.dot``), so each key and value is
read from memory once per sequence, not once per query head. The KV head is the grid's
fastest axis: the programs that run side by side read the neighbouring heads of the same
cache rows (a token's heads are contiguous), one whole row between them rather than one
head's slice of many (1-4% faster than sequence-first on an H200: BENCHMARKS.md, 5b). A
program walks its keys in tiles of ``BLOCK_N`` through the block table. **Split-KV
(flash-decoding):** with ``SPLITS > 1`` a sequence's tiles are dealt into ``SPLITS``
contiguous ranges read by as many programs, which fills the GPU when a few long sequences
would leave most SMs idle. Each split stores its normalized partial output (rounded to the
output's dtype: ``_partials``) and log-sum-exp (fp32) in a workspace and bumps the
(sequence, KV head) arrival counter (after a block barrier, with an acq_rel atomic); the
program that arrives last merges the splits in split order
(``out = sum_s w_s o_s / sum_s w_s``, ``w_s = exp2(lse_s - max lse)``: the same bits
whichever arrives last; ``_merged``), stores the output and resets the counter. Past 16
splits the merge takes two levels: the last of every TREE_GROUP splits merges them into a
group partial, and the last group merges the groups (``_merge_last``). Or, with
``MERGE_KERNEL=1``, the splits only store their partials and the op launches
``_merge_kernel`` after them (the merges and their rules are in ``_decode_merge``), a
program a (query head, sequence) reading all of its partials at once (a chunk of the head a
program where such pairs are few: ``merge_chunk``): cheaper where a few long sequences run
many splits, and the only merge past 64 splits
(128 and 256 reach one to sixteen (sequence, KV head) pairs). The merge launch is
the autotuner's ``post_hook`` too, so either way the tuner times a split config at its whole
cost, and chooses ``SPLITS`` and ``MERGE_KERNEL`` per key like any other parameter.

**Loop structure** (both tuned per key): whole tiles take their block numbers from a
register copy of the table, a chunk at a time (``_attention.attend_paged_chunks``), so that
Triton's pipeliner fetches ``num_stages - 1`` tiles ahead (through the table, it fetches
none). With ``SLICES > 1`` (as many as ``num_warps``) a program keeps ``SLICES`` softmax
states, one a warp, each step reading ``SLICES`` tiles of ``BLOCK_N`` keys, and merges them
once at its end (``_attention.attend_warp_slices``): the tile's softmax then never crosses
warps (BENCHMARKS.md 5b, nineteenth session). With ``TMA=1`` (GPUs with a TMA unit, where
the caches' layout allows it) a program reads one cache block a step as a box through
host-built tensor descriptors (``_decode_tma``).

The key: the batch size bucketed onto serving batch sizes, the longest context bucketed
onto powers of two (``max_context_len``), query heads, KV heads, head size and block size
exactly, and the dtypes.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import triton
import triton.language as tl

import tunebook

from .. import _compat
from .._forksafe import renew_lock
from . import _attention as a
from . import _common as c
from ._attention import NO_SCORE, attend_paged_chunks, attend_tiles, attend_warp_slices, normalized
from ._decode_merge import TREE_GROUP, _Grid, _merge_hook, _merge_last, _partials
from ._decode_tma import _attend_pages_tma, _descriptors, _has_tma, programmatic_launch
from ._gemm_common import SMEM_BYTES, Scratch, dot_mode

_OP = "paged_attention_decode"

# A split config launches batch * NK * SPLITS programs; past ~15 waves on a 132-SM GPU more
# splits only add partial outputs to merge. It also caps the workspace (sized for fp32, G
# rows of BLOCK_D per program, and as many again for every TREE_GROUP programs' group
# partial) at 2304 * G * BLOCK_D * 4 bytes, which Scratch rounds up to a power of two: 8 MiB
# for Llama-3-8B's layout.
MAX_SPLIT_PROGRAMS = 2048
# Elements of a K (or V) tile each thread holds: more spills registers, fewer idles lanes.
# Pipelined configs (num_stages > 1) may hold more: they won on the H200 at 128 a thread
# (216-220 registers, no spills: benchmarks/kernels/compile_check.py), and the tuner measures.
MAX_TILE_PER_THREAD = 64
MAX_STAGED_TILE_PER_THREAD = 256
MIN_TILE_PER_THREAD = 8
# The grid's second axis (sequences) is limited to 65,535 programs by CUDA.
MAX_BATCH = 65535
# 128 and 256 only reach few (sequence, KV head) pairs (MAX_SPLIT_PROGRAMS): one sequence on
# one or two KV heads runs 128-512 programs. Capped at 64, such a call left half of an H200's
# SMs idle and ran at 0.90-0.93 of SDPA at 32k tokens; at 128-256 splits with the merge
# spread over more programs (merge_chunk) it ran 1.02-1.25x SDPA (BENCHMARKS.md 5b,
# twenty-ninth session).
SPLITS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Past this many splits only the merge kernel merges them: the in-kernel merge's last
# arrivals read the partials one L2 round trip at a time, 1.1-3.3 us of a 13-17 us call at
# 64 splits of few sequences already (BENCHMARKS.md 5b, twenty-fifth session).
MOST_SPLITS_MERGED_IN_KERNEL = 64

_workspace = Scratch("paged_attention_decode.workspace", zeroed=False)
_lse = Scratch("paged_attention_decode.lse", zeroed=False)
_counters = Scratch("paged_attention_decode.counters", zeroed=True)  # kept at zero between launches
_LAUNCH_LOCK = threading.Lock()  # a split launch and its merge kernel, together
renew_lock(globals(), "_LAUNCH_LOCK", threading.Lock)  # held across a first call's tuning


def max_splits(batch: int, n_kv: int, context: int) -> int:
    """The largest SPLITS a call may use: each split gets one 16-key tile at least, and the
    launch stays within MAX_SPLIT_PROGRAMS programs (batch and context as bucketed; a batch
    past the largest bucket counts as itself)."""
    best = 1
    sequences = max(batch, c.bucket_of(batch))
    for s in SPLITS:
        if sequences * n_kv * s <= MAX_SPLIT_PROGRAMS and a.context_of(context) >= 16 * s:
            best = s
    return best


def step_keys(cfg: dict[str, Any]) -> int:
    """Keys a program reads per loop step: SLICES tiles of BLOCK_N (SLICES 1 when absent)."""
    return int(cfg.get("SLICES", 1)) * int(cfg["BLOCK_N"])


def _feasible(cfg: dict[str, Any]) -> bool:
    # Warp slices are one a warp (more would share warps, fewer would split a slice's keys
    # over warps again); the slices' batched tl.dot wants 16 keys a slice at least.
    if cfg["MERGE_KERNEL"] and cfg["SPLITS"] == 1:
        return False  # nothing to merge
    if not cfg["MERGE_KERNEL"] and cfg["SPLITS"] > MOST_SPLITS_MERGED_IN_KERNEL:
        return False
    if cfg["TMA"] and cfg["SLICES"] > 1:
        return False  # one softmax state: the TMA loop reads one cache block a step
    slices = cfg["SLICES"]
    if slices > 1 and (slices != cfg["num_warps"] or cfg["BLOCK_N"] < 16):
        return False
    return cfg["num_stages"] == 1 or cfg["BLOCK_N"] >= 16


def _fits_call(cfg: dict[str, Any], args: Any) -> bool:
    # the step's tile the kernel holds: head_size padded to a tl.dot size (16 at least)
    per_thread = step_keys(cfg) * a.dot_floor(args["HEAD_SIZE"]) / (32 * cfg["num_warps"])
    most = MAX_TILE_PER_THREAD if cfg["num_stages"] == 1 else MAX_STAGED_TILE_PER_THREAD
    return MIN_TILE_PER_THREAD <= per_thread <= most and fits_work(cfg, args)


def fits_work(cfg: dict[str, Any], args: Any) -> bool:
    """The call's rules on tiles, splits and stages, whatever a thread holds: every tile and
    split has keys to read, a pipeline has 2+ tiles, the stages fit in shared memory."""
    block_d = a.dot_floor(args["HEAD_SIZE"])
    context = a.context_of(args["max_context_len"])
    step = step_keys(cfg)
    if cfg["TMA"] and (cfg["BLOCK_N"] != args["PAGE"] or args.get("k_desc") is None):
        return False  # the TMA loop's step is one cache block, loaded as one box
    if step > context:
        return False  # a step longer than every sequence: masked-off keys
    if step > a.table_chunk(args["PAGE"])[0]:
        return False  # a step past the chunk of block numbers held in registers
    splits = cfg["SPLITS"]
    if splits > max_splits(args["batch"], args["NK"], args["max_context_len"]):
        return False
    if splits > 1 and context < splits * step:
        return False  # splits without a whole step to read
    steps = context // (splits * step)
    if cfg["num_stages"] > 1 and steps < 2:
        return False  # a loop of one step has nothing to pipeline
    elem = 4 if args["k_cache_ptr"].dtype == torch.float32 else 2
    # The pipeliner keeps num_stages - 1 K and V tiles in flight (one when unpipelined).
    buffers = max(1, cfg["num_stages"] - 1)
    return buffers * 2 * step * block_d * elem <= SMEM_BYTES


SPACE = tunebook.Space(
    # First: a search's first step from a split winner tries its other merge.
    MERGE_KERNEL=[0, 1],
    BLOCK_N=[16, 32, 64, 128, 256],
    SPLITS=SPLITS,
    SLICES=[1, 2, 4, 8],
    num_warps=[1, 2, 4, 8],
    num_stages=[1, 2, 3, 4],
    TMA=[0, 1],
    constraints=[_feasible],
    arg_constraints=[_fits_call],
)


def hand_picked(key: dict[str, Any]) -> dict[str, int]:
    """vLLM's Triton attention backend at decode (``unified_attention``): 16-key tiles, 16
    softmax segments when fewer than 128 (sequence, KV head) programs would run and one
    otherwise, merged by a kernel of their own (its ``reduce_segments``), Triton's default 4
    warps and 3 stages."""
    splits = 16 if key["batch"] * key["NK"] <= 128 else 1
    return _point(16, splits, 4, 3)


def _point(
    block_n: int, splits: int, warps: int, stages: int, *, slices: int = 1, tma: int = 0
) -> dict[str, int]:
    """A point of SPACE as the launch rules below name it, its splits (if any) merged by the
    merge kernel."""
    return {"MERGE_KERNEL": int(splits > 1), "BLOCK_N": block_n, "SPLITS": splits, "SLICES": slices,
            "num_warps": warps, "num_stages": stages, "TMA": tma}  # fmt: skip


# Programs a launch wants at least before more splits pay (about one an SM of an H100/H200).
RULE_PROGRAMS = 128
# The same for one-warp TMA programs, several of which share an SM.
TMA_RULE_PROGRAMS = 1024


def _tma_here() -> bool:
    """Whether this process's GPU, the one a tuning key is tuned on, has a TMA unit."""
    return not _compat.interpreting() and torch.cuda.is_available() and _has_tma(torch.cuda.current_device())


# Short calls: contexts of at most SHORT_CONTEXT tokens (as bucketed: 513-1,023 tokens count
# as 1,024) and at most SHORT_WORK work (bucketed batch x KV heads x bucketed context) have
# too few programs, each reading too few blocks, for the rules for longer calls: a TMA
# program would wait on one block after another, and warp slices hold 4 softmax states for
# a few dozen keys. Such calls of the head sizes in SPANNING_SPLITS get 2-D tiles that span a
# split's keys (``_spanning_tiles``). Other head sizes (256, say) keep the rules for longer
# calls: no GPU run has timed these tiles against them there.
SHORT_CONTEXT = 512
SHORT_WORK = 16 * 1024
# _spanning_tiles, by head size: below SPANNING_FEW_KEYS tokens, splits of 16 keys while at
# most 32 programs run (heads of 128) or none (heads of 64); from it, splits of 64 keys while
# at most 256 run; never more than 8 splits. The H200 page's choices for these calls: for
# heads of 128, 8 splits of 16 keys for one to four sequences of 128 tokens, 8 of 64 for one
# to four of 512, one split where more sequences fill the GPU; for heads of 64 (3 KV heads),
# one split below 256 tokens at every batch.
SPANNING_FEW_KEYS = 256
SPANNING_SPLITS: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    # head size: ((most programs, least keys a split) below / from it); 0 programs: no split
    # (the keys a split then never matter)
    128: ((32, 16), (256, 64)),
    64: ((0, 16), (256, 64)),
}
SPANNING_MOST_SPLITS = 8


def first_guess(key: dict[str, Any]) -> dict[str, int]:
    """The op's own first guess, measured first in every search and served where the book
    remembers nothing comparable: a guess the search measures, not a winner. One of three
    rules, the first that applies:

    * A short call of a 64- or 128-wide head (at most SHORT_CONTEXT tokens and SHORT_WORK
      work): ``_spanning_tiles``. On an H200, over the 46 such calls of the shipped page, the
      rules below took 1.05-1.64x the page's config's time (geomean 1.41) and these tiles
      0.92-1.10x (geomean 1.01) (BENCHMARKS.md 5b, thirty-second session). It applies on
      every GPU; only the H200 has timed it.
    * On a GPU with a TMA unit, where the layout allows it: one cache block a step loaded as
      a box (``TMA=1``), one warp, 3 stages, splits merged by the merge kernel until about
      TMA_RULE_PROGRAMS programs run, each split keeping 4 blocks at least: the best of a
      prototype's sweep on the H200 at 16-256 sequences of 512-32k tokens (BENCHMARKS.md 5b,
      twenty-seventh session).
    * Otherwise four softmax states, one a warp, of 16 keys each, 3 stages, splits until
      about RULE_PROGRAMS programs run while each split keeps two steps of keys to pipeline.
      On an H200 it ran at 0.79 of SDPA where the 2-D configs timed beside it reached
      0.68-0.69 (Llama-3 layouts, 16-64 sequences of 512 tokens), and lost at Qwen2.5-7B's
      28/4 (BENCHMARKS.md 5b, twentieth session)."""
    programs, context = key["batch"] * key["NK"], a.context_of(key["max_context_len"])
    if key["HEAD_SIZE"] in SPANNING_SPLITS and context <= SHORT_CONTEXT and programs * context <= SHORT_WORK:
        return _spanning_tiles(programs, context, key["HEAD_SIZE"])
    page = key["PAGE"] if _tma_here() else 0
    if 16 <= page <= 256 and page & (page - 1) == 0 and a.dot_floor(key["HEAD_SIZE"]) == key["HEAD_SIZE"]:
        splits = 1
        while programs * splits < TMA_RULE_PROGRAMS and context >= 8 * page * splits and splits < SPLITS[-1]:
            splits *= 2
        # One warp up to 64-token blocks; larger blocks (a server's own, not the books') get
        # the warps and stages that keep the guess a point of the Space (_fits_call).
        block_d = a.dot_floor(key["HEAD_SIZE"])
        warps = max(1, page * block_d // (32 * MAX_STAGED_TILE_PER_THREAD))
        elem = 4 if getattr(key.get("k_cache_ptr"), "dtype", None) == torch.float32 else 2
        stages = 3
        while stages > 2 and 2 * (stages - 1) * page * block_d * elem > SMEM_BYTES:
            stages -= 1
        return _point(page, splits, warps, stages, tma=1)
    step = 4 * 16
    splits = 1
    while programs * splits < RULE_PROGRAMS and context >= 4 * step * splits and splits < SPLITS[-1]:
        splits *= 2
    return _point(16, splits, 4, 3, slices=4)


def _spanning_tiles(programs: int, context: int, head_size: int) -> dict[str, int]:
    """One 2-D tile a split, of the split's keys (16-128), without TMA, one stage; splits
    merged by the merge kernel, as many as SPANNING_SPLITS allows; enough warps (up to 8)
    that each thread holds at most MAX_TILE_PER_THREAD elements of the [keys, head] tile."""
    most_programs, least_keys = SPANNING_SPLITS[head_size][context >= SPANNING_FEW_KEYS]
    splits = 1
    while (
        programs * splits * 2 <= most_programs
        and splits < SPANNING_MOST_SPLITS
        and context // (splits * 2) >= least_keys
    ):
        splits *= 2
    block_n = max(16, min(128, context // splits))
    warps = max(1, min(8, block_n * a.dot_floor(head_size) // (32 * MAX_TILE_PER_THREAD)))
    return _point(block_n, splits, warps, 1)


@c.autotune(
    _OP,
    SPACE,
    key=[c.token_bucket("batch"), a.context_bucket("max_context_len"), "NQ", "NK", "HEAD_SIZE", "PAGE"],
    hand_picked=hand_picked,
    inputs=lambda description: _inputs(description),
    rule=first_guess,
    post_hook=lambda args, exception=None: _merge_hook(args, exception),
)
@triton.jit(do_not_specialize=["batch", "max_context_len"])
def _paged_attention_decode_kernel(
    q_ptr,
    q_stride_b,
    q_stride_h,
    k_cache_ptr,
    k_stride_b,
    k_stride_s,
    k_stride_h,
    v_cache_ptr,
    v_stride_b,
    v_stride_s,
    v_stride_h,
    table_ptr,
    table_stride,
    table_width,
    lens_ptr,
    out_ptr,
    out_stride_b,
    out_stride_h,
    ws_ptr,
    lse_ptr,
    lock_ptr,
    qk_scale,
    batch,
    max_context_len,
    k_desc,
    v_desc,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    MERGE_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    CHUNK: tl.constexpr,
    TABLE_SLOTS: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    SLICES: tl.constexpr = 1,
    MERGE_KERNEL: tl.constexpr = 0,
    TMA: tl.constexpr = 0,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    if PDL and MERGE_KERNEL:
        # The merge kernel, launched with programmatic dependent launch, may be scheduled
        # once every program of this grid has started; it waits for this grid's end and
        # memory (gdc_wait) before reading the partials.
        tl.extra.cuda.gdc_launch_dependents()
    G: tl.constexpr = NQ // NK
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < G
    d_mask = d < HEAD_SIZE
    heads = kv_head * G + g
    q = tl.load(
        q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    # The table's first chunk, asked for with q and the length: split 0 starts there, and the
    # length is not needed to read it (the chain length -> table -> keys is one load shorter).
    table_row = table_ptr + seq.to(tl.int64) * table_stride
    slot = tl.arange(0, TABLE_SLOTS)
    first_blocks = tl.load(table_row + slot, mask=slot < table_width, other=0)
    context = tl.maximum(tl.load(lens_ptr + seq), 0)
    # Splits take whole steps (SLICES tiles of BLOCK_N keys), so every step but a sequence's
    # last is full.
    STEP: tl.constexpr = SLICES * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(context, STEP), SPLITS) * STEP
    lo = split * per_split
    hi = tl.minimum(context, lo + per_split)
    full = lo + tl.maximum(hi - lo, 0) // STEP * STEP
    k_base = k_cache_ptr + kv_head * k_stride_h
    v_base = v_cache_ptr + kv_head * v_stride_h
    if TMA:
        acc, m_i, l_i = _attend_pages_tma(
            q, lo, hi, k_desc, v_desc, kv_head * HEAD_SIZE, table_row, qk_scale, BLOCK_G, BLOCK_D, PAGE, DOT
        )  # fmt: skip
    elif SLICES == 1:
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_G], NO_SCORE, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        # Whole tiles without masks (pipelined: their block numbers come in chunks), then
        # the ragged last one.
        acc, m_i, l_i = attend_paged_chunks(
            acc, m_i, l_i, q, lo, full,
            k_base, v_base, k_stride_s, v_stride_s, k_stride_b, v_stride_b, table_row, table_width,
            first_blocks, qk_scale, d, d_mask, BLOCK_G, BLOCK_N, PAGE, CHUNK, TABLE_SLOTS, DOT,
        )  # fmt: skip
        acc, m_i, l_i = attend_tiles(
            acc, m_i, l_i, q, g, full, hi, hi, 0,
            k_base, v_base, k_stride_s, v_stride_s, k_stride_b, v_stride_b, table_row, qk_scale, d, d_mask,
            BLOCK_G, BLOCK_N, True, False, True, PAGE, DOT,
        )  # fmt: skip
    else:
        acc, m_i, l_i = attend_warp_slices(
            q, lo, full, hi,
            k_base, v_base, k_stride_s, v_stride_s, k_stride_b, v_stride_b, table_row, table_width,
            first_blocks, qk_scale, d, d_mask,
            BLOCK_G, BLOCK_D, BLOCK_N, SLICES, PAGE, CHUNK, TABLE_SLOTS, DOT,
        )  # fmt: skip
    out_rows = out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        tl.store(out_rows, normalized(acc, l_i).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        first = (seq * NK + kv_head) * SPLITS
        parts_ptr = _partials(ws_ptr, out_ptr)
        part = parts_ptr + ((first + split) * G + g[:, None]) * BLOCK_D + d[None, :]
        tl.store(part, normalized(acc, l_i).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), NO_SCORE)
        tl.store(lse_ptr + (first + split) * G + g, lse, mask=g_mask)
        if not MERGE_KERNEL:  # else _merge_kernel, launched next, merges the splits
            _merge_last(
                parts_ptr, lse_ptr, lock_ptr, out_ptr, out_stride_b, out_stride_h, seq, kv_head, split, first,
                batch, d, d_mask, NK, G, MERGE_G, BLOCK_D, SPLITS,
            )  # fmt: skip


@c.graph_break
def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged KV cache.

    ``q``: ``[batch, NQ, head_size]`` float16/bfloat16/float32 (batch and head strides
    free). ``k_cache``/``v_cache``: ``[num_blocks, block_size, NK, head_size]``, ``q``'s
    dtype, last dimension contiguous. ``block_table``: ``[batch, max_blocks]`` int32/int64.
    ``context_lens``: ``[batch]`` int32/int64, the tokens each sequence attends to (its new
    token's K/V already written, e.g. by ``reshape_and_cache``). ``scale``: defaults to
    ``head_size ** -0.5``. ``max_context_len``: the longest context (an upper bound is
    fine): part of the tuning key; when omitted it is read from ``context_lens``, which
    waits for the GPU (pass it in a server, and always inside a CUDA graph capture).
    Returns ``[batch, NQ, head_size]`` in ``q``'s dtype (or ``out``).

    >>> import torch
    >>> from tunebook.kernels import paged_attention_decode
    >>> k_cache, v_cache = torch.randn(4, 16, 1, 64), torch.randn(4, 16, 1, 64)
    >>> q, table = torch.randn(2, 2, 64), torch.tensor([[3, 0], [1, 2]])
    >>> out = paged_attention_decode(q, k_cache, v_cache, table, torch.tensor([20, 0]), max_context_len=20)
    >>> k = torch.cat([k_cache[3], k_cache[0, :4]])[:, 0]               # sequence 0's 20 tokens
    >>> v = torch.cat([v_cache[3], v_cache[0, :4]])[:, 0]
    >>> ref = torch.softmax(q[0] @ k.T / 8, dim=-1) @ v
    >>> torch.allclose(out[0], ref, atol=1e-4), bool(out[1].eq(0).all())   # an empty slot reads 0
    (True, True)
    """
    return _paged_attention_decode(
        q, k_cache, v_cache, block_table, context_lens, scale, max_context_len, out
    )


def _paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None,
    max_context_len: int | None,
    out: torch.Tensor | None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """:func:`paged_attention_decode`, launched with ``config`` (BLOCK_N, SPLITS,
    num_warps, num_stages) instead of the tuned one when given: tests and benchmarks use it."""
    a.check_heads(_OP, "q", q)
    batch, n_q, head_size = q.shape
    n_kv = k_cache.shape[2] if k_cache.dim() == 4 else -1
    # the caches first: one of the wrong rank has no KV heads to compare (they read as -1)
    page = a.check_cache(_OP, k_cache, v_cache, n_kv, head_size, q.dtype)
    a.check_gqa(_OP, n_q, n_kv)
    a.check_index(_OP, "block_table", block_table, 2)
    a.check_index(_OP, "context_lens", context_lens, 1)
    if block_table.shape[0] != batch or context_lens.shape[0] != batch:
        c.fail(
            _OP,
            f"block_table and context_lens must have one row per sequence ({batch}); found "
            f"{tuple(block_table.shape)} and {tuple(context_lens.shape)}",
        )
    c.check_same_device(
        _OP, q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, context_lens=context_lens,
        out=out,
    )  # fmt: skip
    a.check_scale(_OP, scale)
    a.check_length_bound(_OP, "max_context_len", max_context_len)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        c.check_out(_OP, "out", out, q.shape, q.dtype, {"q": q, "k_cache": k_cache, "v_cache": v_cache})
        if head_size > 1 and out.stride(2) != 1:
            c.fail(_OP, f"out's last dimension must be contiguous; found strides {tuple(out.stride())}")
    if batch == 0 or head_size == 0:
        return out
    if batch > MAX_BATCH:
        c.fail(
            _OP, f"at most {MAX_BATCH} sequences per call (CUDA's grid limit); found {batch}: split the batch"
        )
    read = max_context_len is None
    if max_context_len is None:
        c.refuse_read_in_capture(_OP, q.device, "max_context_len")
        max_context_len = int(context_lens.max())  # waits for the GPU
    max_context_len = int(max_context_len)
    capacity = block_table.shape[1] * page
    if max_context_len > capacity:
        # Name what the caller gave: the longest context_lens entry where the bound was read.
        given = (
            f"context_lens holds {max_context_len} tokens" if read else f"max_context_len={max_context_len}"
        )
        c.fail(
            _OP,
            f"{given}, more than the block table holds ({block_table.shape[1]} blocks of {page} tokens); "
            "widen the table (or check the cache's layout: [num_blocks, block_size, NK, head_size])",
        )
    a.check_block_table_on_cpu(_OP, block_table, context_lens, "context_lens", k_cache.shape[0], page)
    if capacity == 0:  # a table of no blocks: every sequence is empty (the bound above), and reads 0
        return out.zero_()
    max_context_len = max(max_context_len, 1)  # the key's context bucket starts at 16 anyway
    # Offsets computed in 32 bits: a sequence's and a head's (the program's indices x strides).
    a.check_offsets(
        _OP,
        [("q", "sequence", batch, q.stride(0)), ("q", "head", n_q, q.stride(1)),
         ("out", "sequence", batch, out.stride(0)), ("out", "head", n_q, out.stride(1)),
         ("k_cache", "KV head", n_kv, k_cache.stride(2)), ("v_cache", "KV head", n_kv, v_cache.stride(2))],
    )  # fmt: skip
    grid, args = _launch(q, k_cache, v_cache, block_table, context_lens, scale, max_context_len, out, config)
    # The split kernel leaves its partials in the layout's shared workspace for the merge
    # launched after it: another thread's split launch in between, on the same stream,
    # would overwrite them (one launch, the in-kernel merge, needed no lock).
    with _LAUNCH_LOCK:
        c.launch(_paged_attention_decode_kernel, grid, args, config)
        grid.merge(out)
    return out


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None,
    max_context_len: int,
    out: torch.Tensor,
    config: dict[str, int] | None,
) -> tuple[_Grid, tuple[Any, ...]]:
    """The kernel's grid and arguments for checked inputs (the workspace sized for the
    largest SPLITS the call allows, or ``config``'s)."""
    batch, n_q, head_size = q.shape
    n_kv, page = k_cache.shape[2], k_cache.shape[1]
    table = a.rows_contiguous(block_table)
    context_lens = context_lens.contiguous()  # read as lens + seq: a strided view would be misread
    block_g = a.dot_floor(n_q // n_kv)
    block_d = a.dot_floor(head_size)
    merge_g = c.pow2_at_least(n_q // n_kv)
    splits = max_splits(batch, n_kv, max_context_len) if config is None else int(config["SPLITS"])
    # Sized for the layout, not for the call, and kept apart per layout: whatever config the
    # tuner or the book picks, a split call launches at most MAX_SPLIT_PROGRAMS programs
    # (max_splits), over at most half as many (sequence, KV head) pairs. So a layout's
    # buffers take their final size at its first split call and never move under a CUDA
    # graph captured after it, whatever other layouts (a draft model's) run meanwhile. Sized
    # per call, a later, larger call reallocated them and an earlier graph wrote freed
    # memory (an illegal address on the H200, 2026-12-01).
    programs = max(batch * n_kv * splits, MAX_SPLIT_PROGRAMS) if splits > 1 else 1
    # The split partials, then (past MERGE_ONE_BY_ONE splits) one group partial per TREE_GROUP.
    partials = (programs + programs // TREE_GROUP.value) * (n_q // n_kv)
    layout = (n_q // n_kv, block_d)
    # An fp32 buffer that the kernels read as the output's dtype (``_partials``): its dtype,
    # part of the key, and its size stay the same whatever the output's (an fp32 call after
    # a bf16 one of the layout must not move it under a captured graph).
    ws = _workspace.get(q.device, partials * block_d, torch.float32, layout)
    lse = _lse.get(q.device, partials, torch.float32, layout)
    pairs = max(batch * n_kv, MAX_SPLIT_PROGRAMS // 2) if splits > 1 else 1
    # A counter per (sequence, KV head), then one per group of splits.
    locks = _counters.get(q.device, pairs + programs // TREE_GROUP.value, torch.int32)
    pdl = programmatic_launch(q.device)
    args = (
        *(q, q.stride(0), q.stride(1)),
        *(k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        *(v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        *(table, table.stride(0), table.shape[1], context_lens),
        *(out, out.stride(0), out.stride(1)),
        *(ws, lse, locks),
        a.softmax_scale(scale, head_size) * a.LOG2E,
        batch,
        max_context_len,
        *_descriptors(k_cache, v_cache),
        *(n_q, n_kv, head_size, page, block_g, merge_g, block_d),
        dot_mode(q.dtype),
        *a.table_chunk(page),
        int(pdl),
    )

    return _Grid(n_kv, batch, ws, lse, block_d, pdl), args


def _inputs(description: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A call of the key's shape for offline tuning (``tunebook tune``): ``batch`` sequences
    of ``max_context_len`` tokens in shuffled blocks, as the benchmarks build them (a
    recorded call's layout alone would give zero lengths and an all-zero block table)."""
    from . import _models

    key = description["key"]
    shape = {"n_q": key["NQ"], "n_kv": key["NK"], "head_size": key["HEAD_SIZE"], "page": key["PAGE"]}
    dtype = a.recorded_dtype(description.get("call"), "q_ptr", _paged_attention_decode_kernel)
    w = _models.workload(
        _OP, {**shape, "context": key["max_context_len"]}, key["batch"], dtype, a.tuning_device()
    )
    t = w.tensors
    tensors = (t["q"], t["k_cache"], t["v_cache"], t["block_table"], t["context_lens"])
    grid, args = _launch(*tensors, None, key["max_context_len"], t["out"], None)
    return grid, args, {}
