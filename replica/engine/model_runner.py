"""StepPlan → flat input tensors → one forward → logits of the rows that sample.

The runner owns the KV cache tensors and the model; it reads sequences' token ids and block
tables but never changes block ownership (that is the block manager's).
"""
import logging

import torch

from replica.engine.scheduler import StepPlan
from replica.layers.attention import AttentionMetadata
from replica.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 max_num_seqs: int = 256, max_model_len: int = 2048, use_cuda_graphs: bool = False):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        cfg = model.cfg
        # [layers, 2 (k, v), num_blocks + 1, block_size, num_kv_heads, head_dim]. The extra block is
        # scratch for CUDA-graph padding rows; the block manager never hands it out. Zeroed: the
        # reference attention reads padding slots (masked), and garbage there could be NaN.
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads,
                                    cfg.head_dim, dtype=model.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        # Benchmarks set this to a list to collect (start, end) CUDA events around each step's GPU
        # work (forward and logits), which gives the GPU's idle share between steps.
        self.step_events: list | None = None
        self.graphs = None
        if use_cuda_graphs:
            from replica.engine.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.kv_caches, num_blocks, block_size, max_num_seqs,
                                       max_model_len)
            self.graphs.capture()

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        return (2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * model_cfg.head_dim
                * torch.empty((), dtype=dtype).element_size())

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs the plan; returns float32 logits [len(plan.samplers), vocab]."""
        if plan.block_copies:
            src = torch.tensor([s for s, _ in plan.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in plan.block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        lists = self._flatten(plan)
        entries = torch.tensor([entry for _, entry in plan.samplers], dtype=torch.long, device=self.device)
        is_decode_only = len(lists[0]) == len(plan.scheduled)
        if self.graphs is not None and is_decode_only and self.graphs.can_run(len(plan.scheduled)):
            bs = self.graphs.prepare(*lists[:4], lists[5])
            start = self._record()
            hidden = self.graphs.replay(bs, len(plan.scheduled))
            logits = self.model.compute_logits(hidden.index_select(0, entries))
        else:
            input_ids, positions, meta = self._tensors(plan, *lists)
            start = self._record()
            hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
            ends = meta.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden.index_select(0, ends[entries]))
        if start is not None:
            self.step_events.append((start, self._record()))
        return logits

    def _record(self):
        if self.step_events is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _flatten(self, plan: StepPlan):
        size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens = []
        tables = []
        for entry in plan.scheduled:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            end = start + entry.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // size] * size + p % size for p in range(start, end))
            query_start.append(query_start[-1] + entry.num_new_tokens)
            seq_lens.append(end)
            tables.append(table)
        return input_ids, positions, slots, seq_lens, query_start, tables

    def _tensors(self, plan: StepPlan, input_ids, positions, slots, seq_lens, query_start, tables):
        size = self.block_size
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        device = self.device

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(padded, torch.int32),
            max_query_len=max(e.num_new_tokens for e in plan.scheduled),
            max_seq_len=max(seq_lens),
            is_decode_only=all(e.num_new_tokens == 1 for e in plan.scheduled),
            block_size=size,
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta
