"""--kv-cache-dtype fp8: the kernels that write the cache round keys and values to e4m3 (saturated
at ±448) exactly as the torch reference does, and the attention kernels read an FP8 cache as the
reference reads it widened to the model dtype (exact)."""
import dataclasses

import pytest
import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.kv_cache_write_triton import write_kv_cache
from replica.kernels.paged_decode_triton import paged_decode_attention
from replica.kernels.paged_prefill_triton import paged_prefill_attention
from replica.kernels.rotary_kv_write import apply_rotary_and_write_kv_ref
from replica.kernels.rotary_kv_write_triton import apply_rotary_and_write_kv
from tests.kernels.paged_batch import (
    DEVICE, DTYPE, ON_GPU, assert_close_rel, head_scale, make_batch, reference_attention,
)
from tests.kernels.test_rotary import llama3_cos_sin_cache

FP8 = torch.float8_e4m3fn


def _fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return tuple(torch.randn(*shape, generator=gen).to(FP8).to(DEVICE) for _ in range(2))


def test_writes_round_to_e4m3_and_saturate_as_the_reference_does():
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(6, 2, 64, generator=gen) * 50).to(DTYPE).to(DEVICE)
    v = (torch.randn(6, 2, 64, generator=gen) * 50).to(DTYPE).to(DEVICE)
    k[0, 0, :4] = torch.tensor([1000.0, -600.0, 448.0, 0.0])       # beyond e4m3's range: ±448
    k_cache, v_cache = _fp8_caches(4, 4, 2, 64, gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, 0, 9, 15, 4, 12], device=DEVICE)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_ref(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))
    written = k_cache.view(-1, 2, 64)[3, 0, :4].float()
    assert written.tolist() == [448.0, -448.0, 448.0, 0.0]
    assert not k_cache.float().isnan().any()


def test_rotary_write_into_an_fp8_cache_rounds_each_value_once():
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, num_kv_heads, head_dim, max_positions = 9, 4, 2, 64, 64
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    k_cache, v_cache = _fp8_caches(5, 4, num_kv_heads, head_dim, gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    positions = torch.randint(0, max_positions, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(20, generator=gen)[:num_tokens].to(DEVICE)
    cos_sin = llama3_cos_sin_cache(head_dim, max_positions)
    ref_q = apply_rotary_and_write_kv_ref(q, k, v, positions, cos_sin, ref_k, ref_v, slots)
    out_q = apply_rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    torch.testing.assert_close(out_q, ref_q, **({"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))    # values: one rounding each
    # keys: the kernel rounds fp32 to e4m3 once; the reference rounds to the model dtype first, so
    # in bf16 a few land one e4m3 step apart; in float32 they agree bit for bit
    same = (k_cache.view(torch.uint8) == ref_k.view(torch.uint8)).float().mean().item()
    assert same == 1.0 if DTYPE == torch.float32 else same > 0.98, same
    torch.testing.assert_close(k_cache.float(), ref_k.float(), rtol=0.13, atol=2 ** -9)


def _fp8_batch(batch):
    """The same batch with its caches rounded to e4m3 (the attention then reads FP8)."""
    return dataclasses.replace(batch, k_cache=batch.k_cache.to(FP8), v_cache=batch.v_cache.to(FP8))


# 16-bit queries over an e4m3 cache compute in fp16 (`checks.kv_as_f16`): bf16 in the interpreter too
Q_DTYPES = sorted({DTYPE, torch.bfloat16}, key=str)


@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_decode_reads_an_fp8_cache_as_the_reference_reads_it_widened(q_dtype):
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16) if ON_GPU else \
        dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=4)
    batch = _fp8_batch(make_batch([1, 37, 150], [1, 1, 1], dtype=q_dtype, **shape))
    out = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                 batch.seq_lens, head_scale(batch.q.shape[-1]), num_splits=3,
                                 block_n=None if ON_GPU else 16)     # the GPU: the default tile
    assert_close_rel(out, reference_attention(batch), batch.q.dtype)


@pytest.mark.parametrize("q_dtype", Q_DTYPES)
def test_prefill_reads_an_fp8_cache_as_the_reference_reads_it_widened(q_dtype):
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16) if ON_GPU else \
        dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    batch = _fp8_batch(make_batch([40, 70, 1], [8, 30, 1], dtype=q_dtype, **shape))
    out = torch.full_like(batch.q, float("nan"))
    tiles = {} if ON_GPU else {"block_m": 16, "block_n": 16}
    paged_prefill_attention(batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc,
                            batch.seq_lens, batch.block_tables, batch.max_query_len,
                            head_scale(batch.q.shape[-1]), out=out, **tiles)
    assert_close_rel(out, reference_attention(batch), batch.q.dtype)


def test_a_cache_of_another_dtype_is_refused():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 64, generator=gen).to(DTYPE).to(DEVICE)
    caches = tuple(torch.zeros(2, 4, 2, 64, dtype=torch.float16 if DTYPE != torch.float16 else torch.float32,
                               device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="does not hold"):
        write_kv_cache(k, k, *caches, torch.arange(2, device=DEVICE))
