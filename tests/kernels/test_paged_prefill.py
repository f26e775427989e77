"""Variable-length causal prefill attention over the paged cache against the torch reference:
whole prompts, chunks after a cached prefix, and decode rows mixed in."""
import pytest
import torch

from replica.kernels.paged_prefill_triton import paged_prefill_attention
from tests.kernels.paged_batch import (
    ON_GPU, assert_close_rel, head_scale, make_batch, reference_attention,
)

# (seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size)
if ON_GPU:
    CASES = [
        ([512] * 4, [512] * 4, 32, 8, 128, 16),                                # W1-like prompts
        ([1500, 2048, 77, 900], [300, 2048, 77, 1], 32, 8, 128, 16),          # chunk + cached prefix
        ([1, 4000, 65, 130, 9], [1, 1, 64, 129, 9], 32, 8, 128, 32),          # decodes mixed in
        ([700, 1024, 33], [700, 100, 33], 16, 16, 64, 16),                     # no GQA, head_dim 64
        ([600, 257], [250, 257], 28, 4, 128, 32),                             # group of 7
    ]
else:
    CASES = [
        ([7, 20, 1], [7, 20, 1], 2, 2, 64, 4),                    # whole prompts, no GQA
        ([40, 70], [8, 30], 8, 2, 128, 16),                       # chunks after a cached prefix
        ([50, 13, 90, 1], [1, 13, 20, 1], 8, 2, 64, 32),          # decodes mixed with prefills
        ([33, 18], [17, 18], 6, 2, 64, 4),                        # group of 3 (padded rows)
    ]


@pytest.mark.parametrize("seq_lens,query_lens,num_heads,num_kv_heads,head_dim,block_size", CASES)
def test_prefill_matches_reference(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size):
    batch = make_batch(seq_lens, query_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=block_size)
    out = torch.full_like(batch.q, float("nan"))
    tiles = {} if ON_GPU else {"block_m": 16, "block_n": 16}   # CPU: several tiles per sequence
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                            batch.seq_lens, batch.block_tables, batch.max_query_len,
                            head_scale(head_dim), out=out, **tiles)
    assert_close_rel(out, reference_attention(batch), batch.q.dtype)


def test_float32_is_exact_to_float32_rounding():
    batch = make_batch([60, 25], [30, 25], num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.float32, seed=3)
    out = paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                                  batch.seq_lens, batch.block_tables, batch.max_query_len,
                                  head_scale(64))
    assert_close_rel(out, reference_attention(batch), torch.float32)


def test_every_query_tile_of_many_short_and_straddling_sequences_is_computed():
    # Query lengths around the 4-token tile (block_m 16 / group 4) and starts that fall inside a
    # tile: a grid or tile offset that skipped a tile would leave NaN rows or attend from the
    # wrong sequence. Decode rows, a 1-token prompt and longer chunks mixed, as in a mixed step.
    query_lens = [1, 3, 4, 5, 1, 9, 1, 1, 7, 8, 2, 1, 13, 1, 4, 6]
    seq_lens = [n + extra for n, extra in zip(query_lens, [20, 0, 7, 3, 31, 0, 5, 12, 9, 0, 1, 40, 2, 8, 0, 11])]
    batch = make_batch(seq_lens, query_lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=4, seed=5)
    out = torch.full_like(batch.q, float("nan"))
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                            batch.seq_lens, batch.block_tables, batch.max_query_len, head_scale(64), out=out,
                            block_m=16, block_n=16)
    assert not out.isnan().any()
    assert_close_rel(out, reference_attention(batch), batch.q.dtype)


def test_larger_max_query_len_bound_changes_nothing():
    batch = make_batch([30, 12], [10, 12], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables)
    exact = paged_prefill_attention(*args, batch.max_query_len, 0.125)
    padded = paged_prefill_attention(*args, batch.max_query_len + 40, 0.125)
    assert torch.equal(exact, padded)


def test_rows_past_the_last_sequence_are_left_alone():
    # CUDA-graph-style padding: q has more rows than query_start_loc covers
    batch = make_batch([30, 12], [10, 12], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    q = torch.cat([batch.q, torch.zeros(6, *batch.q.shape[1:], dtype=batch.q.dtype, device=batch.q.device)])
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, batch.max_query_len, head_scale(64), out=out)
    assert torch.equal(out[22:], torch.full_like(out[22:], 7.0))
    assert_close_rel(out[:22], reference_attention(batch), batch.q.dtype)


def test_rejects_bad_arguments():
    batch = make_batch([5, 6], [2, 6], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    args = [batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.max_query_len, 0.125]
    with pytest.raises(ValueError, match="seq_lens: expected shape"):
        paged_prefill_attention(*args[:4], batch.seq_lens[:1], *args[5:])
    with pytest.raises(ValueError, match="block_tables: expected shape"):
        paged_prefill_attention(*args[:5], batch.block_tables[:1], *args[6:])
    with pytest.raises(ValueError, match="k_cache: expected shape"):
        paged_prefill_attention(args[0], batch.k_cache[..., :32], *args[2:])
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(*args[:6], -1, 0.125)
