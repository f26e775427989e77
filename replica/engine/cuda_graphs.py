"""CUDA graphs of the decode forward, one per batch-size bucket.

Decode steps have static shapes once the batch is padded to a bucket: every input lives in a
static buffer that each step overwrites, and the graph replays the whole forward (all layers,
attention included) in one launch. Padding rows write their K/V into a scratch block that the
block manager never hands out, and attend over that one slot; their outputs are ignored.
The attention grid must not depend on this step's data, so the decode split count is fixed per
bucket from max_model_len.
"""
import logging

import torch

from replica.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    sizes = [s for s in sizes if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model, kv_caches, scratch_block: int, block_size: int, max_num_seqs: int,
                 max_model_len: int):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.scratch_slot = scratch_block * block_size
        self.buckets = bucket_sizes(max_num_seqs)
        max_bs, device = self.buckets[-1], model.device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), self.scratch_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_bs, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, model.cfg.hidden_size, dtype=model.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        from replica.kernels.paged_decode_triton import choose_num_splits

        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, is_decode_only=True, block_size=self.block_size)
        meta.decode_num_splits = choose_num_splits(bs, self.model.cfg.num_kv_heads, self.max_model_len,
                                                   self.model.device)
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        from replica.kernels import pdl                # Triton: imported where graphs exist

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), pdl.capturing_graphs():
            for bs in reversed(self.buckets):       # largest first, so smaller ones reuse its pool
                meta = self._meta(bs)
                for _ in range(2):                  # warm-up: Triton compiles, cuBLAS picks kernels
                    self.model.forward(self.input_ids[:bs], self.positions[:bs], meta, self.kv_caches)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.hidden[:bs] = self.model.forward(self.input_ids[:bs], self.positions[:bs],
                                                          meta, self.kv_caches)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                seq_lens: torch.Tensor, tables: torch.Tensor) -> int:
        """Fills the static inputs from this step's device tensors (rows beyond them are padding
        that attends over the scratch slot); returns the bucket to replay. No host sync."""
        # input_ids, positions, slots: [N] int64; seq_lens: [N] int32; tables: [N, width] int32
        num_seqs, width = tables.shape
        bs = next(b for b in self.buckets if b >= num_seqs)
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

    def replay(self, bs: int, num_seqs: int) -> torch.Tensor:
        """Returns hidden states [num_seqs, hidden]."""
        self.graphs[bs].replay()
        return self.hidden[:num_seqs]
