"""Which decode CUDA graphs a bucket gets: its split count for any context, and a second, smaller
one for short contexts where the bound on the context is what raised it (pure host arithmetic;
the graphs themselves are captured on a GPU, tests/gpu/test_cuda_engine.py)."""
from types import SimpleNamespace

import torch

from replica.engine import cuda_graphs
from replica.engine.cuda_graphs import DecodeGraphs


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


def test_replay_takes_the_short_graph_only_while_every_context_fits():
    graphs = _graphs(4096)
    replayed = []
    graphs.graphs[1] = SimpleNamespace(replay=lambda: replayed.append("full"))
    graphs.short_graphs[1] = SimpleNamespace(replay=lambda: replayed.append("short"))
    graphs.graphs[2] = SimpleNamespace(replay=lambda: replayed.append("full 2"))
    graphs.replay(1, 1, cuda_graphs.SHORT_CONTEXT)
    graphs.replay(1, 1, cuda_graphs.SHORT_CONTEXT + 1)
    graphs.replay(1, 1)
    graphs.replay(2, 2, 10)                          # a bucket without one
    assert replayed == ["short", "full", "full", "full 2"]
