"""Rotary embedding (neox layout) against the reference, with a Llama-3-scaled cos/sin cache."""
import math

import pytest
import torch

from replica.kernels.rotary import apply_rotary_ref
from replica.kernels.rotary_triton import apply_rotary
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

# (num_tokens, num_heads, num_kv_heads, head_dim, max_positions)
CASES = [(300, 32, 8, 128, 8192), (65, 14, 2, 64, 4096)] if ON_GPU else [
    (7, 4, 2, 64, 100), (5, 6, 2, 128, 50), (3, 3, 1, 32, 10)]


def llama3_cos_sin_cache(head_dim: int, max_positions: int) -> torch.Tensor:
    # Llama 3.1 scaling (factor 8, low 1, high 4, original 8192), as the model builds it
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > 8192 / 1.0, inv_freq / 8, inv_freq)
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    smoothed = (1 - smooth) * scaled / 8 + smooth * scaled
    inv_freq = torch.where((wavelen >= 8192 / 4.0) & (wavelen <= 8192 / 1.0), smoothed, scaled)
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,max_positions", CASES)
def test_rotary_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, max_positions):
    gen = torch.Generator().manual_seed(num_tokens)
    # q and k as strided views of a fused qkv projection, as the model passes them
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width, generator=gen).to(DTYPE).to(DEVICE)
    q = qkv[:, :q_width].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_width:q_width + kv_width].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=gen).to(DEVICE)
    cache = llama3_cos_sin_cache(head_dim, max_positions)
    q_out, k_out = apply_rotary(q, k, positions, cache)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    exact = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}
    torch.testing.assert_close(q_out, q_ref, **exact)
    torch.testing.assert_close(k_out, k_ref, **exact)


def test_int32_positions():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, 2, 64, generator=gen).to(DEVICE)
    k = torch.randn(4, 1, 64, generator=gen).to(DEVICE)
    positions = torch.tensor([0, 3, 9, 1], device=DEVICE)
    cache = llama3_cos_sin_cache(64, 10)
    out = apply_rotary(q, k, positions.int(), cache)
    ref = apply_rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rejects_bad_arguments():
    q = torch.randn(4, 2, 64, device=DEVICE)
    k = torch.randn(4, 1, 64, device=DEVICE)
    positions = torch.arange(4, device=DEVICE)
    cache = llama3_cos_sin_cache(64, 10)
    with pytest.raises(ValueError, match="cos_sin_cache: expected shape"):
        apply_rotary(q, k, positions, cache[:, :32])
    with pytest.raises(ValueError, match="cos_sin_cache: dtype float16"):
        apply_rotary(q, k, positions, cache.half())
    with pytest.raises(ValueError, match="positions: expected shape"):
        apply_rotary(q, k, positions[:3], cache)
    with pytest.raises(ValueError, match="k: expected shape"):
        apply_rotary(q, k[:, :, :32], positions, cache)
