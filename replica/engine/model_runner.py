"""StepPlan → flat input tensors → one forward → logits of the rows that sample.

The runner owns the KV cache tensors and the model; it reads sequences' token ids but never
changes block ownership (that is the block manager's), and never reads the block manager or a
sequence's block table: block-id changes reach it through the plan (`StepPlan.block_updates`)
and are kept in a persistent block table, one row per running sequence (`batch_rows.py`).

No host sync on the way in: a step's integer inputs (new tokens, positions, slot mapping, the
scheduled rows, the block-table changes) are written into preallocated host buffers (pinned on
CUDA, two of them used in turn) and reach the device in one asynchronous copy per dtype; the
block-table changes are scattered into the device table, and the scheduled rows' tables are
gathered from it, in stream order. With overlap scheduling a decode row's newest token may not be
known on the host yet (`PLACEHOLDER_TOKEN` in its token ids): its input is then read on the device
from the previous step's sampled tokens (`prev_tokens`, at the index where the previous step
sampled the same batch row), so the CPU can plan step t+1 while the GPU still runs step t.
"""
import logging

import numpy as np
import torch

from replica.engine.batch_rows import PersistentBlockTable
from replica.engine.scheduler import StepPlan
from replica.engine.sequence import PLACEHOLDER_TOKEN
from replica.layers.attention import AttentionMetadata
from replica.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

_RING = 2     # host buffers in flight: one is filled while the other's copy may still be queued


class StepBuffers:
    """Host staging for one step's integer inputs and its device copies.

    int64 row: [graph head: input_ids | positions | slots, R each] | input_ids [T] | positions [T] |
    slots [T] | sample entries [S] | gather dst [G] | gather src [G] | scheduled rows [B] |
    block-table update indices [U]; int32 row: [graph head: seq_lens, R] | query_start [B+1] |
    seq_lens [B] | block-table update values [U].
    The heads (R = graph_rows) are the decode CUDA graphs' inputs (`graph_inputs`): a graph step
    uploads its ids, positions, slots and lengths there, padded to its bucket, and nothing else
    copies them; the parts after the heads serve every step.
    """

    def __init__(self, device: torch.device, max_tokens: int, max_seqs: int, max_updates: int,
                 graph_rows: int = 0):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.graph_rows = graph_rows
        self.head64, self.head32 = 3 * graph_rows, graph_rows
        self.size64 = self.head64 + 3 * max_tokens + 4 * max_seqs + max_updates
        self.size32 = self.head32 + 2 * max_seqs + 1 + max_updates
        pin = self.is_cuda
        self.host64 = [torch.zeros(self.size64, dtype=torch.int64, pin_memory=pin) for _ in range(_RING)]
        self.host32 = [torch.zeros(self.size32, dtype=torch.int32, pin_memory=pin) for _ in range(_RING)]
        self.dev64 = torch.zeros(self.size64, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(self.size32, dtype=torch.int32, device=device)
        self.step = 0

    def graph_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device heads: [3, R] int64 (ids, positions, slots) and [R] int32 (lengths)."""
        return self.dev64[:self.head64].view(3, self.graph_rows), self.dev32[:self.head32]

    def upload(self, parts64: list[np.ndarray], parts32: list[np.ndarray],
               head: tuple[list[np.ndarray], np.ndarray] | None = None) -> tuple[list, list]:
        """Copies the parts to the device in two transfers; returns device views of each part.
        head: a graph step's ([ids, positions, slots], lengths), each [bs ≤ R], written at the
        start of the heads' rows in the same transfers."""
        slot = self.step % _RING
        self.step += 1
        views = []
        heads = (head[0], [head[1]]) if head is not None else ([], [])
        for parts, host, dev, start, rows in ((parts64, self.host64[slot], self.dev64, self.head64, heads[0]),
                                              (parts32, self.host32[slot], self.dev32, self.head32, heads[1])):
            sizes = [len(p) for p in parts]
            total = sum(sizes)
            if not self.is_cuda:          # the CPU computes from the host arrays directly
                flat = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=host.numpy().dtype))
                views.append(list(flat.split(sizes)))
                continue
            staged = host.numpy()
            np.concatenate(parts, out=staged[start:start + total])
            for r, values in enumerate(rows):           # a head row r starts at r · R
                staged[r * self.graph_rows:r * self.graph_rows + len(values)] = values
            first = 0 if rows else start
            if start + total > first:
                dev[first:start + total].copy_(host[first:start + total], non_blocking=True)
            views.append(list(dev[start:start + total].split(sizes)))
        return views[0], views[1]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 max_num_seqs: int = 256, max_model_len: int = 2048, use_cuda_graphs: bool = False,
                 max_num_batched_tokens: int = 8192, kv_dtype: torch.dtype | None = None,
                 max_piecewise_tokens: int = 0):
        """kv_dtype: the KV cache's dtype (default the model's; FP8 e4m3 with --kv-cache-dtype fp8).
        max_piecewise_tokens: with use_cuda_graphs, steps that are not decode-only and hold at most
        this many tokens replay piecewise graphs (0: they run eagerly)."""
        self.model = model
        self.device = model.device
        self.block_size = block_size
        cfg = model.cfg
        # [layers, 2 (k, v), num_blocks + 1, block_size, num_kv_heads, head_dim]. The extra block is
        # scratch for CUDA-graph padding rows; the block manager never hands it out. Zeroed: the
        # reference attention reads padding slots (masked), and garbage there could be NaN.
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads,
                                    cfg.head_dim, dtype=kv_dtype or model.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        max_blocks = -(-max_model_len // block_size)
        self.block_table = PersistentBlockTable(max_num_seqs, max_blocks, self.device)
        # a step holds at most the token budget, plus one decode token per sequence beyond it; a
        # step's block-table changes are at most every row's whole table
        self.buffers = StepBuffers(self.device, max_num_batched_tokens + max_num_seqs, 2 * max_num_seqs,
                                   max_num_seqs * max_blocks, graph_rows=max_num_seqs if use_cuda_graphs else 0)
        # Benchmarks set this to a list to collect (start, end) CUDA events around each step's GPU
        # work (forward and logits), which gives the GPU's idle share between steps.
        self.step_events: list | None = None
        self.graphs = self.piecewise = None
        if use_cuda_graphs:
            from replica.engine.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.kv_caches, num_blocks, block_size, max_num_seqs,
                                       max_model_len, *self.buffers.graph_inputs())
            self.graphs.capture()
            max_tokens = min(max_piecewise_tokens, max_num_batched_tokens + max_num_seqs)
            if max_tokens > 0:
                from replica.engine.piecewise_graphs import PiecewiseGraphs
                self.piecewise = PiecewiseGraphs(model, self.kv_caches, num_blocks, block_size, max_tokens)
                self.piecewise.capture(pool=self.graphs.pool)

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        return (2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * model_cfg.head_dim
                * torch.empty((), dtype=dtype).element_size())

    def execute(self, plan: StepPlan, prev_tokens: torch.Tensor | None = None,
                prev_rows: np.ndarray | None = None) -> torch.Tensor:
        """Runs the plan; returns float32 logits [len(plan.samplers), vocab]. `prev_tokens` [S']
        (device) and `prev_rows` [S'] (the batch row of each, host) are the previous step's
        sampled tokens, which resolve the placeholder tokens of decode rows."""
        if plan.block_copies:
            src = torch.tensor([s for s, _ in plan.block_copies]).to(self.device, non_blocking=True)
            dst = torch.tensor([d for _, d in plan.block_copies]).to(self.device, non_blocking=True)
            raw = self.kv_cache.view(torch.uint8)       # as bytes: index_put has no float8 kernels
            raw[:, :, dst] = raw[:, :, src]
        parts64, parts32, width, max_query_len, max_seq_len, num_decode_prefix = self._flatten(plan, prev_rows)
        num_seqs = len(plan.scheduled)
        is_gather_prefix = bool((parts64[4] == np.arange(len(parts64[4]))).all())   # gather dst: rows 0..G-1
        use_graph = self.graphs is not None and max_query_len == 1 and self.graphs.can_run(num_seqs)
        head = None
        if use_graph:           # ids, positions, slots and lengths go straight to the graph's inputs
            bs = self.graphs.bucket(num_seqs)
            entries_host = parts64[3]     # the graph's own logits serve when each row samples once, in order
            is_each_row_sampled = len(entries_host) == num_seqs and bool((entries_host == np.arange(num_seqs)).all())
            head = self.graphs.host_inputs(*parts64[:3], parts32[1], bs)
            none64, none32 = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
            parts64[:3], parts32[:2] = [none64] * 3, [none32] * 2
        (input_ids, positions, slots, entries, gather_dst, gather_src, rows, update_index), \
            (query_start, seq_lens, update_values) = self.buffers.upload(parts64, parts32, head)
        num_gathered = len(gather_dst)
        if num_gathered:          # placeholder tokens: the previous step's samples, still on the device
            ids = self.graphs.input_ids if use_graph else input_ids
            if is_gather_prefix:  # steady decode, every row waiting, in order: one gather kernel
                torch.index_select(prev_tokens, 0, gather_src, out=ids[:num_gathered])
            else:
                ids[gather_dst] = prev_tokens[gather_src]
        self.block_table.scatter(update_index, update_values)
        if use_graph:
            self.graphs.prepare_tables(self.block_table.device_table, rows, bs)
            start = self._record()
            hidden = self.graphs.replay(bs, num_seqs, max_seq_len)
            logits = self.graphs.last_logits
            if logits is None or not is_each_row_sampled:
                logits = self.model.compute_logits(hidden.index_select(0, entries))
        else:
            tables = self.block_table.rows(rows, width)
            meta = AttentionMetadata(
                slot_mapping=slots, query_start_loc=query_start, seq_lens=seq_lens, block_tables=tables,
                max_query_len=max_query_len, max_seq_len=max_seq_len,
                is_decode_only=max_query_len == 1, block_size=self.block_size,
                num_decode_prefix=num_decode_prefix)
            start = self._record()
            if self.piecewise is not None and self.piecewise.can_run(len(input_ids)):
                hidden = self.piecewise.run(input_ids, positions, meta)
            else:
                hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
            ends = query_start[1:].long() - 1
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

    def _flatten(self, plan: StepPlan, prev_rows: np.ndarray | None):
        """Host arrays of the step's inputs: ([int64 parts], [int32 parts], table width,
        max query length, max sequence length). Writes the plan's block-table changes into the
        persistent table first; slots are computed from it."""
        size = self.block_size
        update_index, update_values = self.block_table.apply(plan.block_updates)
        table = self.block_table.host
        num_seqs = len(plan.scheduled)
        rows = np.fromiter((e.seq.row for e in plan.scheduled), dtype=np.int64, count=num_seqs)
        num_new = np.fromiter((e.num_new_tokens for e in plan.scheduled), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((e.seq.num_computed_tokens for e in plan.scheduled), dtype=np.int64,
                             count=num_seqs)
        ends = starts + num_new
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        width = int(self.block_table.num_blocks[rows].max())
        max_query_len = int(num_new.max())
        if max_query_len == 1:          # decode-only: one token per row, no Python per token
            input_ids = np.fromiter((e.seq.token_ids[e.seq.num_computed_tokens] for e in plan.scheduled),
                                    dtype=np.int64, count=num_seqs)
            positions = starts
            slots = table[rows, positions // size].astype(np.int64) * size + positions % size
        else:
            input_ids = np.empty(int(query_start[-1]), dtype=np.int64)
            for i, entry in enumerate(plan.scheduled):
                input_ids[query_start[i]:query_start[i + 1]] = entry.seq.token_ids[starts[i]:ends[i]]
            # position of each token: its row's start plus its offset within the row's new tokens
            row_of_token = np.repeat(np.arange(num_seqs), num_new)
            positions = np.arange(len(input_ids), dtype=np.int64) - np.repeat(query_start[:-1] - starts, num_new)
            slots = table[rows[row_of_token], positions // size].astype(np.int64) * size + positions % size
        last = query_start[1:] - 1
        waiting = input_ids[last] == PLACEHOLDER_TOKEN
        gather_dst = last[waiting]
        if len(gather_dst):
            index_of_row = np.full(len(table), -1, dtype=np.int64)
            index_of_row[prev_rows] = np.arange(len(prev_rows))
            gather_src = index_of_row[rows[waiting]]
            if (gather_src < 0).any():      # a placeholder's token must come from the previous step
                raise RuntimeError("a placeholder token's row was not sampled by the previous step")
            input_ids[gather_dst] = 0
        else:
            gather_src = gather_dst
        entries = np.fromiter((entry for _, entry in plan.samplers), dtype=np.int64, count=len(plan.samplers))
        parts64 = [input_ids, positions, slots, entries, gather_dst, gather_src, rows, update_index]
        parts32 = [query_start.astype(np.int32), ends.astype(np.int32), update_values]
        # leading sequences with one new token each: a mixed step's decodes (running sequences
        # come first, in admission order), which attention can run through its decode kernel
        num_decode_prefix = num_seqs if max_query_len == 1 else int(np.argmax(num_new > 1))
        return parts64, parts32, width, max_query_len, int(ends.max()), num_decode_prefix
