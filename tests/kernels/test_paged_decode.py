"""Split-KV paged decode attention against the torch reference."""
import pytest
import torch

from replica.kernels.paged_decode_triton import choose_num_splits, paged_decode_attention
from tests.kernels.paged_batch import (
    DEVICE, ON_GPU, assert_close_rel, head_scale, make_batch, reference_attention,
)

# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits); None = the heuristic
if ON_GPU:
    CASES = [
        ([1, 17, 300, 4096, 1025], 32, 8, 128, 16, None),      # Llama-3-8B shapes, ragged
        ([1, 17, 300, 4096, 1025], 32, 8, 128, 16, 1),
        ([8191, 77], 32, 8, 128, 32, 7),                          # few seqs, long context
        ([5, 2000, 513] * 11, 32, 8, 128, 16, None),             # 33 seqs
        ([33, 700, 1500], 16, 16, 64, 16, 3),                     # no GQA, head_dim 64
        ([1000, 64, 3], 28, 4, 128, 32, None),                   # group of 7 (not a power of 2)
    ]
else:
    CASES = [
        ([1, 9, 30], 2, 2, 64, 4, None),
        ([1, 17, 150], 8, 2, 128, 16, 1),
        ([1, 17, 150], 8, 2, 128, 16, 4),                        # more splits than some seqs have tiles
        ([33, 64, 5, 200], 8, 2, 64, 32, 3),
        ([70, 3], 6, 2, 64, 4, 2),                                # group of 3 (padded rows)
    ]


@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim,block_size,num_splits", CASES)
def test_decode_matches_reference(seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits):
    batch = make_batch(seq_lens, [1] * len(seq_lens), num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    out = torch.full_like(batch.q, float("nan"))
    block_n = 64 if ON_GPU else 16          # small tiles on the CPU: several tiles per split
    paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                           batch.seq_lens, head_scale(head_dim), num_splits=num_splits,
                           max_seq_len=batch.max_seq_len, out=out, block_n=block_n)
    assert_close_rel(out, reference_attention(batch), batch.q.dtype)


def test_float32_is_exact_to_float32_rounding():
    batch = make_batch([40, 200, 3], [1, 1, 1], num_heads=8, num_kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.float32)
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                 batch.seq_lens, head_scale(64), num_splits=3)
    assert_close_rel(out, reference_attention(batch), torch.float32)


def test_zero_length_padding_rows_give_zeros():
    # CUDA-graph buckets pad the batch with seq_len 0 rows: they must not produce NaN.
    batch = make_batch([20, 1], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 2):
        out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                     seq_lens, 0.125, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out.isnan().any()


def test_num_splits_heuristic_fills_the_gpu_only_when_needed():
    device = torch.device("cuda") if ON_GPU else torch.device("cpu")
    assert choose_num_splits(64, 8, 8192, device) == 1 or not ON_GPU
    assert choose_num_splits(1, 8, 8192, device) > 1
    assert choose_num_splits(1, 8, 64, device) == 1         # one tile of context: no split
    assert choose_num_splits(1, 8, 100, device) <= 2        # never a split without a whole tile
    assert 1 <= choose_num_splits(1, 1, 10 ** 6, device) <= 64


def test_rejects_bad_arguments():
    batch = make_batch([5, 6], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.125)
    with pytest.raises(ValueError, match="block_tables: dtype int64"):
        paged_decode_attention(*args[:3], batch.block_tables.long(), *args[4:])
    with pytest.raises(ValueError, match="seq_lens: expected shape"):
        paged_decode_attention(*args[:4], batch.seq_lens[:1], args[5])
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        paged_decode_attention(batch.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="does not hold float16 values"):
        paged_decode_attention(batch.q.half(), *args[1:])
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        paged_decode_attention(batch.q.transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(*args, num_splits=0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_replay_with_new_lengths_matches_eager():
    # Capture once with a static num_splits, then change seq_lens and block tables in place.
    num_heads, num_kv_heads, head_dim, block_size = 32, 8, 128, 16
    first = make_batch([100, 2000, 7, 900], [1] * 4, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=block_size, spare_blocks=200, seed=1)
    num_splits = choose_num_splits(4, num_kv_heads, 8192, DEVICE)
    q, seq_lens, block_tables = first.q.clone(), first.seq_lens.clone(), first.block_tables.clone()
    out = torch.empty_like(q)

    def step():
        paged_decode_attention(q, first.k_cache, first.v_cache, block_tables, seq_lens,
                               head_scale(head_dim), num_splits=num_splits, out=out)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    max_blocks = block_tables.shape[1]     # 125: contexts up to 2000 tokens
    seq_lens.copy_(torch.tensor([101, 1500, 8, 1999], dtype=torch.int32, device=DEVICE))
    block_tables.copy_(torch.randint(0, first.k_cache.shape[0], (4, max_blocks), device=DEVICE))
    q.copy_(torch.randn_like(q))
    graph.replay()
    replayed = out.clone()
    eager = paged_decode_attention(q, first.k_cache, first.v_cache, block_tables, seq_lens,
                                   head_scale(head_dim), num_splits=num_splits)
    assert torch.equal(replayed, eager)


def test_split_reduce_is_repeatable():
    # The same inputs give bit-identical outputs call after call (a race between the split
    # programs and the reduce would not). Batch 1 at W2's context with 32 splits (the CUDA-graph
    # bucket's split count), then a batch of 3 with an uneven split.
    cases = [([600], 32), ([1, 2000, 77], 5)] if ON_GPU else [([40], 4), ([1, 50, 9], 3)]
    shapes = ({"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16} if ON_GPU
              else {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 4})
    for seq_lens, num_splits in cases:
        batch = make_batch(seq_lens, [1] * len(seq_lens), seed=len(seq_lens), **shapes)
        block_n = 64 if ON_GPU else 16
        outs = [paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                       batch.seq_lens, head_scale(batch.q.shape[-1]),
                                       num_splits=num_splits, block_n=block_n)
                for _ in range(50 if ON_GPU else 3)]
        assert_close_rel(outs[0], reference_attention(batch), batch.q.dtype)
        assert all(torch.equal(out, outs[0]) for out in outs[1:])


def test_the_reduce_writes_the_output_rounded_as_quantize_x_rounds_it():
    """out_x8: the input of a 4-bit o_proj on int8 x, the same codes and scales bit for bit as
    rounding the stored output with its own kernel (one launch a layer fewer at decode)."""
    from replica.kernels.gguf_gemv_x8_triton import quantize_x
    from replica.kernels.gguf_linear import XInt8

    batch = make_batch([40, 200, 3], [1, 1, 1], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    num_seqs, width = 3, 8 * 64
    out_x8 = XInt8(torch.empty(num_seqs, width, dtype=torch.int8, device=DEVICE),
                   torch.empty(num_seqs, width // 32, 2, dtype=torch.float32, device=DEVICE), batch.q.dtype)
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                 batch.seq_lens, head_scale(64), num_splits=3, out_x8=out_x8)
    want = quantize_x(out.reshape(num_seqs, width))
    assert torch.equal(out_x8.codes, want.codes) and torch.equal(out_x8.dx_sum, want.dx_sum)
    with pytest.raises(ValueError, match="needs num_splits > 1"):
        paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                               batch.seq_lens, head_scale(64), num_splits=1, out_x8=out_x8)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_rotary_inside_the_split_equals_rotary_kernel_then_decode(num_splits):
    """`rotary=`: the kernel rotates q and the new key, and writes the new key and value into the
    caches itself; the same output and caches as rotary + KV write, then decode attention. A
    padding row (seq_len 0, slot -1) writes nothing."""
    from replica.kernels.paged_decode_triton import DecodeRotary
    from replica.kernels.rotary_kv_write_triton import apply_rotary_and_write_kv
    from tests.kernels.test_rotary import llama3_cos_sin_cache

    batch = make_batch([1, 40, 130, 9], [1, 1, 1, 1], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    seq_lens, slots = batch.seq_lens.clone(), batch.slot_mapping.clone()
    seq_lens[3], slots[3] = 0, -1                                  # a graph bucket's padding row
    positions = (seq_lens.long() - 1).clamp(min=0)
    cos_sin = llama3_cos_sin_cache(64, 256).to(DEVICE)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    q_rot = apply_rotary_and_write_kv(batch.q, batch.k, batch.v, positions, cos_sin, k_cache, v_cache, slots)
    expected = paged_decode_attention(q_rot, k_cache, v_cache, batch.block_tables, seq_lens, 0.125,
                                      num_splits=num_splits, block_n=16)
    fused_k, fused_v = batch.k_cache.clone(), batch.v_cache.clone()
    got = paged_decode_attention(batch.q, fused_k, fused_v, batch.block_tables, seq_lens, 0.125,
                                 num_splits=num_splits, block_n=16,
                                 rotary=DecodeRotary(batch.k, batch.v, positions, cos_sin, slots))
    torch.testing.assert_close(fused_k, k_cache, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_v, v_cache, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused_k[batch.block_tables[3, 0]], batch.k_cache[batch.block_tables[3, 0]])


@pytest.mark.parametrize("num_splits", [3, 8])
def test_splits_past_the_context_skip_their_stores_and_the_reduce_skips_them(num_splits, monkeypatch):
    """`SKIP_EMPTY_SPLITS`: the same output bit for bit (a seq_len 0 padding row: zeros), though the
    empty splits' partials are never written (NaN there would otherwise reach the output)."""
    from replica.kernels import paged_decode_triton

    batch = make_batch([1, 40, 150, 9], [1] * 4, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seed=4)
    seq_lens = batch.seq_lens.clone()
    seq_lens[3] = 0
    want = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, 0.125,
                                  num_splits=num_splits, block_n=16)
    monkeypatch.setattr(paged_decode_triton, "SKIP_EMPTY_SPLITS", True)
    real_empty = torch.empty

    def nan_partials(*shape, **kwargs):          # partials start as NaN: an unwritten one read would show
        t = real_empty(*shape, **kwargs)
        return t.fill_(float("nan")) if t.dtype == torch.float32 else t
    monkeypatch.setattr(paged_decode_triton.torch, "empty", nan_partials)
    got = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, 0.125,
                                 num_splits=num_splits, block_n=16)
    assert torch.equal(got, want)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
