"""Rotary + KV-cache write in one kernel against the composition of the two references: the
rotated queries, the rotated keys and the values in their slots, every other slot untouched."""
import pytest
import torch

from replica.kernels.rotary_kv_write import apply_rotary_and_write_kv_ref
from replica.kernels.rotary_kv_write_triton import apply_rotary_and_write_kv
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU
from tests.kernels.test_rotary import llama3_cos_sin_cache

# (num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks)
CASES = [(1, 32, 8, 128, 16, 64), (300, 32, 8, 128, 16, 64), (65, 14, 2, 64, 32, 9)] if ON_GPU else [
    (1, 4, 2, 64, 4, 5), (7, 6, 2, 128, 16, 3), (5, 3, 1, 32, 4, 4)]
MAX_POSITIONS = 4096 if ON_GPU else 64


def _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, gen):
    # q, k, v as strided views of one fused qkv projection, as the model passes them
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width, generator=gen).to(DTYPE).to(DEVICE)
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def _random_caches(num_blocks, block_size, num_kv_heads, head_dim, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(*shape, generator=gen).to(DTYPE).to(DEVICE),
            torch.randn(*shape, generator=gen).to(DTYPE).to(DEVICE))


@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,block_size,num_blocks", CASES)
def test_matches_rotary_then_cache_write(num_tokens, num_heads, num_kv_heads, head_dim, block_size,
                                         num_blocks):
    gen = torch.Generator().manual_seed(num_tokens)
    q, k, v = _fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, gen)
    k_cache, v_cache = _random_caches(num_blocks, block_size, num_kv_heads, head_dim, gen)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    cos_sin = llama3_cos_sin_cache(head_dim, MAX_POSITIONS)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    ref_q = apply_rotary_and_write_kv_ref(q, k, v, positions, cos_sin, ref_k_cache, ref_v_cache, slots)
    out_q = apply_rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    exact = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}
    torch.testing.assert_close(out_q, ref_q, **exact)
    torch.testing.assert_close(k_cache, ref_k_cache, **exact)   # rotated keys: fp32 math, one rounding
    assert torch.equal(v_cache, ref_v_cache)                     # values: a plain copy


def test_negative_slots_rotate_q_but_write_nothing():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _fused_qkv(3, 4, 2, 64, gen)
    k_cache, v_cache = _random_caches(3, 4, 2, 64, gen)
    positions = torch.tensor([4, 0, 9], device=DEVICE)
    slots = torch.tensor([5, -1, 11], device=DEVICE)
    cos_sin = llama3_cos_sin_cache(64, 16)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    keep = torch.tensor([0, 2], device=DEVICE)
    apply_rotary_and_write_kv_ref(q[keep], k[keep], v[keep], positions[keep], cos_sin,
                                  ref_k_cache, ref_v_cache, slots[keep])
    ref_q = apply_rotary_and_write_kv_ref(q, k, v, positions, cos_sin, k_cache.clone(),
                                          v_cache.clone(), slots.clamp(min=0))
    out_q = apply_rotary_and_write_kv(q, k, v, positions.int(), cos_sin, k_cache, v_cache, slots.int())
    exact = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}
    torch.testing.assert_close(out_q, ref_q, **exact)
    torch.testing.assert_close(k_cache, ref_k_cache, **exact)
    assert torch.equal(v_cache, ref_v_cache)


def test_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _fused_qkv(4, 4, 2, 64, gen)
    k_cache, v_cache = _random_caches(2, 4, 2, 64, gen)
    positions = torch.arange(4, device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    cos_sin = llama3_cos_sin_cache(64, 10)
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="v: expected shape"):
        apply_rotary_and_write_kv(q, k, v[:, :1], *args[3:])
    with pytest.raises(ValueError, match="slot_mapping: expected shape"):
        apply_rotary_and_write_kv(*args[:7], slots[:3])
    with pytest.raises(ValueError, match="cos_sin_cache: dtype float16"):
        apply_rotary_and_write_kv(*args[:4], cos_sin.half(), *args[5:])
    with pytest.raises(ValueError, match="k_cache: dtype float16 does not hold"):
        apply_rotary_and_write_kv(*args[:5], k_cache.half(), v_cache.half(), slots)
