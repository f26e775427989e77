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
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        cfg = model.cfg
        # [layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]. Zeroed: the reference
        # attention reads padding slots (masked), and garbage there could be NaN.
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads,
                                    cfg.head_dim, dtype=model.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]

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
        input_ids, positions, meta = self._prepare(plan)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
        ends = meta.query_start_loc[1:].long() - 1
        entries = torch.tensor([entry for _, entry in plan.samplers], dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, ends[entries]))

    def _prepare(self, plan: StepPlan):
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
