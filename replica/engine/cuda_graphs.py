"""CUDA graphs of the decode forward, one per batch-size bucket.

Decode steps have static shapes once the batch is padded to a bucket: every input lives in a
static buffer that each step overwrites, and the graph replays the whole forward (all layers,
attention included) in one launch. The token ids, positions, slots and sequence lengths are
views of the runner's upload buffers (`inputs64`, `inputs32`): the step's host-to-device copy
writes them where the graph reads them, with no device-to-device copy between (each is ~2 µs of
a step's critical path, bench/NOTES.md, "What a W2 step spends outside the layers"). Padding
rows write their K/V into a scratch block that the block manager never hands out, and attend
over that one slot; their outputs are ignored.
The attention grid must not depend on this step's data, so the decode split count is fixed per
graph from a static bound on the context: max_model_len, and for the small buckets whose count
that bound raises (batch 1: 32 splits of the KV against 16 that a 1,024-token context can use) a
second graph from SHORT_CONTEXT, replayed while every sequence of the step is that short. The
split count never changes the result's correctness, only its speed (W2 on an H200: +1.2%,
bench/NOTES.md, "Moving short kernels' work into their neighbours lost").
"""
import logging

import numpy as np
import torch

from replica.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

SHORT_CONTEXT = 1024           # tokens: the bound of the small buckets' second graph
SHORT_CONTEXT_GRAPHS = True
# Buckets up to this many rows also compute the logits inside the graph (x's rounding and the
# head chained under PDL after the final norm, instead of launched after the replay): every row
# of a decode step samples, so the runner takes them as they are. Larger buckets (the head as a
# GEMM, and [bs, vocab] fp32 held by the graph pool) leave them to the runner. 0: none.
LOGITS_IN_GRAPH_ROWS = 4


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    sizes = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model, kv_caches, scratch_block: int, block_size: int, max_num_seqs: int,
                 max_model_len: int, inputs64: torch.Tensor | None = None, inputs32: torch.Tensor | None = None):
        """inputs64: [3, max_bs] int64 (token ids, positions, slots), inputs32: [max_bs] int32
        (sequence lengths), on the device; None: the graphs' own."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_slot = scratch_block * block_size
        self.buckets = bucket_sizes(max_num_seqs)
        max_bs, device = self.buckets[-1], model.device
        max_blocks = -(-max_model_len // block_size)
        if inputs64 is None:
            inputs64 = torch.zeros(3, max_bs, dtype=torch.int64, device=device)
            inputs32 = torch.zeros(max_bs, dtype=torch.int32, device=device)
        if inputs64.shape != (3, max_bs) or inputs32 is None or inputs32.shape != (max_bs,):
            raise ValueError(f"inputs64 must be [3, {max_bs}] and inputs32 [{max_bs}]")
        self.input_ids, self.positions, self.slot_mapping = inputs64
        self.seq_lens = inputs32
        self.slot_mapping.fill_(self.scratch_slot)
        self.seq_lens.fill_(1)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_bs, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.short_graphs: dict[int, torch.cuda.CUDAGraph] = {}     # bucket → its SHORT_CONTEXT graph
        # id(graph) → the hidden states [bs, hidden] and the float32 logits [bs, vocab] it writes:
        # tensors of the graphs' pool, kept alive (so no other capture reuses them) and read in place
        self.hidden: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.last_logits: torch.Tensor | None = None  # the logits of the graph replayed last, if it has them
        self.pool = None

    def _meta(self, bs: int, num_splits: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, is_decode_only=True, block_size=self.block_size)
        meta.decode_num_splits = num_splits
        return meta

    def split_counts(self, bs: int) -> tuple[int, int | None]:
        """The bucket's decode split count for any context, and for contexts ≤ SHORT_CONTEXT where
        that is smaller (else None: one graph serves both)."""
        from replica.kernels.paged_decode_triton import choose_num_splits
        num_kv_heads, device = self.model.cfg.num_kv_heads, self.model.device
        full = choose_num_splits(bs, num_kv_heads, self.max_model_len, device)
        if not SHORT_CONTEXT_GRAPHS or SHORT_CONTEXT >= self.max_model_len:
            return full, None
        short = choose_num_splits(bs, num_kv_heads, SHORT_CONTEXT, device)
        return full, (short if short < full else None)

    @torch.inference_mode()
    def capture(self) -> None:
        """(Re)captures every bucket's graphs into the same pool (a graph captured before is
        dropped first, its memory going back to the pool)."""
        from replica.kernels import pdl                # Triton: imported where graphs exist

        self.graphs.clear()
        self.short_graphs.clear()
        self.hidden.clear()
        self.logits.clear()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), pdl.capturing_graphs():
            for bs in reversed(self.buckets):       # largest first, so smaller ones reuse its pool
                full, short = self.split_counts(bs)
                self.graphs[bs] = self._capture(bs, full, stream)
                if short is not None:
                    self.short_graphs[bs] = self._capture(bs, short, stream)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s (and for contexts up to %d tokens: %s)",
                 self.buckets, SHORT_CONTEXT, sorted(self.short_graphs))

    def _capture(self, bs: int, num_splits: int, stream) -> torch.cuda.CUDAGraph:
        meta = self._meta(bs, num_splits)
        for _ in range(2):                  # warm-up: Triton compiles, cuBLAS picks kernels
            hidden = self.model.forward(self.input_ids[:bs], self.positions[:bs], meta, self.kv_caches)
            if bs <= LOGITS_IN_GRAPH_ROWS:
                self.model.compute_logits(hidden)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            self.hidden[id(graph)] = hidden = self.model.forward(self.input_ids[:bs], self.positions[:bs], meta,
                                                                 self.kv_caches)
            if bs <= LOGITS_IN_GRAPH_ROWS:
                self.logits[id(graph)] = self.model.compute_logits(hidden)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def host_inputs(self, input_ids, positions, slots, seq_lens, bs: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The step's host arrays padded to the bucket (padding rows take the scratch slot and a
        context of 1), as the upload writes them into `inputs64`'s rows and `inputs32`."""
        num_seqs = len(input_ids)

        def padded(values, fill, dtype):
            out = np.full(bs, fill, dtype=dtype)
            out[:num_seqs] = values
            return out
        return ([padded(input_ids, 0, np.int64), padded(positions, 0, np.int64),
                 padded(slots, self.scratch_slot, np.int64)], padded(seq_lens, 1, np.int32))

    def prepare_tables(self, table: torch.Tensor, rows: torch.Tensor, bs: int) -> None:
        """The scheduled rows of the persistent block table (`table` [rows, max_blocks]; `rows`
        [N] on the device) into the static one; padding rows get the scratch block."""
        num_seqs = len(rows)
        torch.index_select(table, 0, rows, out=self.block_tables[:num_seqs])
        if bs > num_seqs:
            self.block_tables[num_seqs:bs].fill_(self.scratch_slot // self.block_size)

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                seq_lens: torch.Tensor, tables: torch.Tensor) -> int:
        """Fills the static inputs from device tensors (benchmarks; the runner writes them with
        its upload instead): rows beyond them are padding that attends over the scratch slot.
        Returns the bucket to replay. No host sync."""
        # input_ids, positions, slots: [N] int64; seq_lens: [N] int32; tables: [N, width] int32
        num_seqs, width = tables.shape
        bs = self.bucket(num_seqs)
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(positions)
        self.slot_mapping[:num_seqs].copy_(slots)
        self.seq_lens[:num_seqs].copy_(seq_lens)
        self.block_tables[:num_seqs, :width].copy_(tables)
        if bs > num_seqs:
            self.input_ids[num_seqs:bs].zero_()
            self.positions[num_seqs:bs].zero_()
            self.slot_mapping[num_seqs:bs].fill_(self.scratch_slot)
            self.seq_lens[num_seqs:bs].fill_(1)
            self.block_tables[num_seqs:bs].fill_(self.scratch_slot // self.block_size)
        return bs

    def replay(self, bs: int, num_seqs: int, max_seq_len: int | None = None) -> torch.Tensor:
        """Returns hidden states [num_seqs, hidden], and sets `last_logits` (the graph's float32
        logits [num_seqs, vocab], or None where its bucket leaves them to the caller); max_seq_len
        (host) picks the short-context graph where the bucket has one."""
        graph = self.short_graphs.get(bs) if max_seq_len is not None and max_seq_len <= SHORT_CONTEXT else None
        graph = graph or self.graphs[bs]
        graph.replay()
        logits = self.logits.get(id(graph))
        self.last_logits = None if logits is None else logits[:num_seqs]
        return self.hidden[id(graph)][:num_seqs]
