"""Decode steps over static input buffers, replayed from CUDA graphs on a GPU.

A decode step launches a few hundred short kernels (10 per layer); launched one by one
from Python the host is the bottleneck (HF transformers' eager ``generate`` takes ~54 ms a
step on an H200 for a 135M model and an 8B one alike). :class:`DecodeRunner` keeps the
step's inputs in static buffers and captures :meth:`Decoder.decode` once per (padded
batch size, context bucket):

* batch sizes are padded up to 1, 2, 4, 8, then multiples of 16 (a padded row has
  context 0, slot -1: it reads and writes nothing and its logits are dropped);
* the context bound passed to the attention kernel (part of its tuning key, and the
  width of the block table it reads) is the longest context rounded up to a power of two
  (at least 64 tokens): a graph replays with any context up to its bucket, since the
  kernels read the real lengths from the GPU.

Graphs are captured lazily, the first time a (batch, bucket) pair runs. The pack's
kernels keep per-device scratch buffers that grow on demand; a buffer that grew after a
capture would leave the graph writing freed memory, so :meth:`DecodeRunner.prepare` first
runs every batch size eagerly at the longest context (the pack's rule: run the largest
shape once before capture). On a CPU (the interpreter) steps run eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton

from .decoder import DecodeBatch, Decoder
from .kv_cache import blocks_for

MIN_CONTEXT_BUCKET = 64
# The GEMMs split K up to this many rows (tunebook.kernels.linear.SPLIT_K_MAX_M): warming
# up at this batch grows their workspace to its largest before any capture.
SPLIT_K_ROWS = 64


def batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes graphs are captured at, up to the first that holds ``max_batch``.

    >>> batch_sizes(64), batch_sizes(6), batch_sizes(20)
    ([1, 2, 4, 8, 16, 32, 48, 64], [1, 2, 4, 8], [1, 2, 4, 8, 16, 32])
    """
    out: list[int] = []
    size = 1
    while True:
        out.append(size)
        if size >= max_batch:
            return out
        size = size * 2 if size < 16 else size + 16


class DecodeRunner:
    """Runs decode steps for up to ``max_batch`` sequences of up to ``max_model_len`` tokens."""

    def __init__(self, decoder: Decoder, max_batch: int, max_model_len: int, cuda_graphs: bool) -> None:
        self.decoder = decoder
        self.block_size = decoder.cache.block_size
        self.max_model_len = max_model_len
        self.sizes = batch_sizes(max_batch)
        self.cuda_graphs = cuda_graphs
        device = decoder.w.device
        rows = max(self.sizes[-1], SPLIT_K_ROWS if cuda_graphs else 0)
        self.max_blocks = blocks_for(self.bucket(max_model_len), self.block_size)
        self.ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.table = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool: Any = None
        self.prepared = False

    def bucket(self, context: int) -> int:
        """The context bound a step with this longest context runs at."""
        return max(MIN_CONTEXT_BUCKET, triton.next_power_of_2(max(context, 1)))

    def padded(self, n: int) -> int:
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"a decode batch of {n} sequences is more than max_batch={self.sizes[-1]}")

    def step(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Logits ``[n, vocab]`` for ``n`` sequences, each adding token ``ids[i]`` at
        ``positions[i]`` (its context is then ``positions[i] + 1`` tokens)."""
        n = len(ids)
        if self.cuda_graphs and not self.prepared:
            self.prepare()
        batch = self.padded(n) if self.cuda_graphs else n
        longest = max(positions) + 1
        bucket = self.bucket(longest)
        width = blocks_for(bucket, self.block_size)
        self._load(ids, positions, block_tables, batch, width)
        if not self.cuda_graphs:
            return self.decoder.decode(self._view(batch, bucket))[:n]
        key = (batch, bucket)
        if key not in self.graphs:
            self._capture(key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _load(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        batch: int,
        width: int,
    ) -> None:
        n = len(ids)
        bs = self.block_size
        slots = [blocks[p // bs] * bs + p % bs for blocks, p in zip(block_tables, positions)]
        table = torch.zeros(n, width, dtype=torch.int32)
        for row, blocks in enumerate(block_tables):
            used = min(len(blocks), width)
            table[row, :used] = torch.tensor(blocks[:used], dtype=torch.int32)
        host = torch.tensor(
            [list(ids), list(positions), slots, [p + 1 for p in positions]], dtype=torch.int64
        )
        self.ids[:n].copy_(host[0], non_blocking=True)
        self.positions[:n].copy_(host[1], non_blocking=True)
        self.slots[:n].copy_(host[2], non_blocking=True)
        self.context_lens[:n].copy_(host[3], non_blocking=True)
        self.table[:n, :width].copy_(table, non_blocking=True)
        if batch > n:  # padded rows: read nothing, write nothing
            self.ids[n:batch].zero_()
            self.positions[n:batch].zero_()
            self.slots[n:batch].fill_(-1)
            self.context_lens[n:batch].zero_()
            self.table[n:batch].zero_()

    def _view(self, batch: int, bucket: int) -> DecodeBatch:
        return DecodeBatch(
            input_ids=self.ids[:batch],
            positions=self.positions[:batch],
            slots=self.slots[:batch],
            block_table=self.table[:batch, : blocks_for(bucket, self.block_size)],
            context_lens=self.context_lens[:batch],
            max_context_len=bucket,
        )

    def prepare(self) -> None:
        """Run every batch size once eagerly at the longest context, on padded rows only, so
        that every scratch buffer the kernels keep has its final size before any capture
        (and, in ``tune`` mode, every key they will meet at that context is tuned)."""
        top = self.bucket(self.max_model_len)
        rows = self.ids.shape[0]
        for batch in sorted({*self.sizes, rows}):
            self.ids[:batch].zero_()
            self.positions[:batch].zero_()
            self.slots[:batch].fill_(-1)
            self.context_lens[:batch].zero_()
            self.table[:batch].zero_()
            self.decoder.decode(self._view(batch, top))
        self.prepared = True

    def _capture(self, key: tuple[int, int]) -> None:
        batch, bucket = key
        view = self._view(batch, bucket)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decoder.decode(
                view
            )  # this step, eagerly: compiles, settles every key (a miss cannot be captured)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decoder.decode(view)
        self.graphs[key] = (graph, logits)
