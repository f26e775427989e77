"""Which decode CUDA graphs a bucket gets: its split count for any context, and a second, smaller
one for short contexts where the bound on the context is what raised it; and where a graph step's
inputs are written (pure host arithmetic and buffers; the graphs themselves are captured on a GPU,
tests/gpu/test_cuda_engine.py)."""
from types import SimpleNamespace

import numpy as np
import torch

from replica.engine import cuda_graphs
from replica.engine.cuda_graphs import DecodeGraphs
from replica.engine.model_runner import StepBuffers


def _graphs(max_model_len: int, num_kv_heads: int = 1) -> DecodeGraphs:
    # on the CPU choose_num_splits counts 8 SMs: about 16 programs in two waves
    model = SimpleNamespace(cfg=SimpleNamespace(num_kv_heads=num_kv_heads, hidden_size=8), dtype=torch.float32,
                            device=torch.device("cpu"))
    return DecodeGraphs(model, [], scratch_block=0, block_size=16, max_num_seqs=32, max_model_len=max_model_len)


def test_small_buckets_get_a_short_context_split_count_where_it_is_smaller(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "SHORT_CONTEXT", 256)      # 4 tiles of 64 keys: at most 4 splits
    graphs = _graphs(4096)
    assert graphs.split_counts(1) == (16, 4)
    assert graphs.split_counts(2) == (8, 4)
    assert graphs.split_counts(4) == (4, None)      # the bound raised nothing: one graph serves both
    assert graphs.split_counts(32) == (1, None)


def test_no_short_context_graph_when_switched_off_or_the_model_is_short(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "SHORT_CONTEXT", 256)
    assert _graphs(256).split_counts(1) == (4, None)
    monkeypatch.setattr(cuda_graphs, "SHORT_CONTEXT_GRAPHS", False)
    assert _graphs(4096).split_counts(1) == (16, None)


def test_replay_takes_the_short_graph_only_while_every_context_fits_and_returns_its_outputs():
    graphs = _graphs(4096)
    replayed = []

    def fake(bucket: dict, bs: int, name: str, with_logits: bool):
        bucket[bs] = graph = SimpleNamespace(replay=lambda: replayed.append(name))
        graphs.hidden[id(graph)] = torch.full((bs, 8), float(len(graphs.hidden)))
        if with_logits:
            graphs.logits[id(graph)] = torch.full((bs, 3), -float(len(graphs.hidden)))
    fake(graphs.graphs, 1, "full", True)
    fake(graphs.short_graphs, 1, "short", True)
    fake(graphs.graphs, 2, "full 2", False)
    assert graphs.replay(1, 1, cuda_graphs.SHORT_CONTEXT).tolist() == [[1.0] * 8]
    assert graphs.last_logits.tolist() == [[-2.0] * 3]
    assert graphs.replay(1, 1, cuda_graphs.SHORT_CONTEXT + 1).tolist() == [[0.0] * 8]
    assert graphs.last_logits.tolist() == [[-1.0] * 3]
    graphs.replay(1, 1)
    assert graphs.replay(2, 1, 10).shape == (1, 8)              # a bucket without one: its one graph, a row
    assert graphs.last_logits is None                           # ... which leaves the logits to the runner
    assert replayed == ["short", "full", "full", "full 2"]


def test_a_graph_steps_inputs_are_padded_to_its_bucket_with_the_scratch_slot_and_a_context_of_one():
    graphs = _graphs(4096)
    graphs.scratch_slot = 48
    (ids, positions, slots), lens = graphs.host_inputs(np.array([7, 9]), np.array([30, 5]), np.array([94, 21]),
                                                       np.array([31, 6], dtype=np.int32), bs=4)
    assert ids.tolist() == [7, 9, 0, 0] and positions.tolist() == [30, 5, 0, 0]
    assert slots.tolist() == [94, 21, 48, 48] and lens.tolist() == [31, 6, 1, 1]
    assert lens.dtype == np.int32 and ids.dtype == np.int64


def test_the_runner_uploads_a_graph_steps_inputs_where_the_graph_reads_them_and_the_rest_after_them():
    buffers = StepBuffers(torch.device("cpu"), max_tokens=8, max_seqs=4, max_updates=4, graph_rows=4)
    buffers.is_cuda = True          # the staging path (host buffer → device copy), run on the CPU
    model = SimpleNamespace(cfg=SimpleNamespace(num_kv_heads=1, hidden_size=8), dtype=torch.float32,
                            device=torch.device("cpu"))
    graphs = DecodeGraphs(model, [], 3, 16, 4, 4096, *buffers.graph_inputs())
    assert graphs.slot_mapping.tolist() == [48] * 4 and graphs.seq_lens.tolist() == [1] * 4
    head = graphs.host_inputs(np.array([7, 9]), np.array([30, 5]), np.array([94, 21]),
                              np.array([31, 6], dtype=np.int32), bs=2)
    none64, none32 = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    entries, rows = np.array([0, 1]), np.array([2, 0])
    views64, views32 = buffers.upload([none64] * 3 + [entries, none64, none64, rows, none64],
                                      [none32, none32, np.array([5], dtype=np.int32)], head)
    # the graph's own tensors see the step (they are views of the uploaded buffer)
    assert graphs.input_ids[:2].tolist() == [7, 9] and graphs.positions[:2].tolist() == [30, 5]
    assert graphs.slot_mapping[:2].tolist() == [94, 21] and graphs.seq_lens[:2].tolist() == [31, 6]
    assert views64[3].tolist() == [0, 1] and views64[6].tolist() == [2, 0] and views32[2].tolist() == [5]
    # an eager step after it uploads its parts behind the heads and leaves the graph's inputs alone
    views64, _ = buffers.upload([np.array([1, 2, 3])] + [none64] * 7, [none32] * 3)
    assert views64[0].tolist() == [1, 2, 3] and graphs.input_ids[:2].tolist() == [7, 9]
