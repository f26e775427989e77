"""Decode attention's combine done by each group's last split (`FUSE_DECODE_REDUCE`) against the
reduce kernel it replaces: the same output and int8 rounding bit for bit, no reduce launch, and
the arrival counters left at zero for the next launch."""
import pytest
import torch

from replica.kernels import decode_reduce_triton
from replica.kernels.gguf_linear import XInt8
from replica.kernels.paged_decode_triton import paged_decode_attention
from tests.kernels.paged_batch import DEVICE, ON_GPU, assert_close_rel, head_scale, make_batch, reference_attention

# (seq_lens, num_heads, num_kv_heads, head_dim, num_splits)
if ON_GPU:
    CASES = [([600], 32, 8, 128, 32), ([1, 17, 300, 4096, 1025], 32, 8, 128, 8), ([1000, 64, 0], 28, 4, 128, 5)]
else:
    CASES = [([40], 8, 2, 64, 4), ([1, 50, 0, 9], 6, 2, 64, 3), ([70, 3], 4, 4, 32, 2)]


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the reduce kernel was launched")


def _attend(batch, num_splits, out_x8=None):
    return paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                  head_scale(batch.q.shape[-1]), num_splits=num_splits,
                                  block_n=64 if ON_GPU else 16, out_x8=out_x8)


def _x8(num_seqs: int, width: int, dtype) -> XInt8:
    return XInt8(torch.full((num_seqs, width), 99, dtype=torch.int8, device=DEVICE),
                 torch.full((num_seqs, width // 32, 2), float("nan"), device=DEVICE), dtype)


@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim,num_splits", CASES)
def test_the_last_split_combines_as_the_reduce_kernel_does(seq_lens, num_heads, num_kv_heads, head_dim, num_splits,
                                                           monkeypatch):
    """A seq_len 0 row (a graph bucket's padding) gives zeros either way; a group of 3 pads."""
    batch = make_batch(seq_lens, [1] * len(seq_lens), num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=16, seed=len(seq_lens))
    width = num_heads * head_dim
    want_x8 = _x8(len(seq_lens), width, batch.q.dtype)
    want = _attend(batch, num_splits, want_x8)

    monkeypatch.setattr(decode_reduce_triton, "FUSE_DECODE_REDUCE", True)
    monkeypatch.setattr(decode_reduce_triton, "decode_reduce_kernel", _NoLaunch())
    for _ in range(3):          # each launch leaves the counters at zero for the next
        got_x8 = _x8(len(seq_lens), width, batch.q.dtype)
        got = _attend(batch, num_splits, got_x8)
        assert torch.equal(got, want)
        assert torch.equal(got_x8.codes, want_x8.codes) and torch.equal(got_x8.dx_sum, want_x8.dx_sum)
        assert torch.equal(_attend(batch, num_splits), want)
    assert not decode_reduce_triton.arrival_counters(batch.q.device, 1).any()
    assert_close_rel(got, reference_attention(batch), batch.q.dtype)


def test_more_groups_than_counters_run_the_reduce_kernel(monkeypatch):
    batch = make_batch([40, 9], [1, 1], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
    want = _attend(batch, 3)
    monkeypatch.setattr(decode_reduce_triton, "FUSE_DECODE_REDUCE", True)
    monkeypatch.setattr(decode_reduce_triton, "_NUM_COUNTERS", 3)      # 2 seqs x 2 KV heads = 4 groups
    assert decode_reduce_triton.arrival_counters(batch.q.device, 4) is None
    launched = []
    kernel = decode_reduce_triton.decode_reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]
    monkeypatch.setattr(decode_reduce_triton, "decode_reduce_kernel", Spy())
    assert torch.equal(_attend(batch, 3), want)
    assert launched == [(2, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_a_graph_of_the_fused_combine_replays_with_new_lengths(monkeypatch):
    monkeypatch.setattr(decode_reduce_triton, "FUSE_DECODE_REDUCE", True)
    batch = make_batch([100, 2000, 7, 900], [1] * 4, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                       spare_blocks=200, seed=1)
    q, seq_lens = batch.q.clone(), batch.seq_lens.clone()
    out = torch.empty_like(q)

    def step():
        paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, head_scale(128),
                               num_splits=16, out=out)

    step()                                   # eager first: the counters are allocated outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lengths in ([101, 1500, 8, 1999], [3, 64, 2000, 1]):
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
        q.copy_(torch.randn_like(q))
        graph.replay()
        monkeypatch.setattr(decode_reduce_triton, "FUSE_DECODE_REDUCE", False)
        eager = paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens,
                                       head_scale(128), num_splits=16)
        monkeypatch.setattr(decode_reduce_triton, "FUSE_DECODE_REDUCE", True)
        assert torch.equal(out, eager)
