"""KV-cache write by slot mapping: exactly the reference's cache, every other slot untouched."""
import pytest
import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.kv_cache_write_triton import write_kv_cache
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

# (num_tokens, num_kv_heads, head_dim, block_size, num_blocks)
CASES = [(300, 8, 128, 16, 64), (1000, 8, 128, 32, 40), (77, 2, 64, 16, 9)] if ON_GPU else [
    (10, 2, 64, 4, 5), (21, 2, 128, 16, 3), (7, 3, 64, 32, 2)]


def _random_cache(num_blocks, block_size, num_kv_heads, head_dim, gen):
    return torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)


@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,block_size,num_blocks", CASES)
def test_write_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, num_blocks):
    gen = torch.Generator().manual_seed(num_tokens)
    k_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, gen)
    v_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, gen)
    # k and v as strided views of one fused qkv row, as the model produces them
    kv_width = num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, 3 * kv_width, generator=gen).to(DTYPE).to(DEVICE)
    k = qkv[:, kv_width:2 * kv_width].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * kv_width:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, ref_k, ref_v, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k)
    assert torch.equal(v_cache, ref_v)


def test_negative_slots_write_nothing():
    gen = torch.Generator().manual_seed(1)
    k_cache = _random_cache(3, 4, 2, 64, gen)
    v_cache = _random_cache(3, 4, 2, 64, gen)
    k = torch.randn(3, 2, 64, generator=gen).to(DTYPE).to(DEVICE)
    v = torch.randn(3, 2, 64, generator=gen).to(DTYPE).to(DEVICE)
    slots = torch.tensor([5, -1, 11], device=DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k[[0, 2]], v[[0, 2]], ref_k, ref_v, slots[[0, 2]])
    write_kv_cache(k, v, k_cache, v_cache, slots.int())
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_rejects_bad_arguments():
    k_cache = torch.randn(2, 4, 2, 64, device=DEVICE)
    k = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="k: expected shape"):
        write_kv_cache(k[:, :1], k, k_cache, k_cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping: expected shape"):
        write_kv_cache(k, k, k_cache, k_cache.clone(), slots[:2])
    with pytest.raises(ValueError, match="slot_mapping: dtype float32"):
        write_kv_cache(k, k, k_cache, k_cache.clone(), slots.float())
    with pytest.raises(ValueError, match="k_cache: dtype float32 does not hold float16 values"):
        write_kv_cache(k.half(), k.half(), k_cache, k_cache.clone(), slots)
