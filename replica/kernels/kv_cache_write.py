"""Scatter the new tokens' keys and values into the paged KV cache."""
import torch

from replica.kernels.fp8_linear import FP8_DTYPE, FP8_MAX


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    # k, v: [T, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    # slot_mapping: [T] int64; slot = block_id * block_size + offset
    # an FP8 (e4m3) cache takes the values saturated at ±448, as the kernels store them, copied
    # as bytes (index_copy_ has no float8 kernels)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for x, cache in ((k, k_cache), (v, v_cache)):
        x = to_cache_dtype_ref(x, cache.dtype)
        if cache.dtype == FP8_DTYPE:
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, x)


def to_cache_dtype_ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == FP8_DTYPE:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)
