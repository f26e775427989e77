"""Rotary embedding of the new tokens' queries and keys, fused with the KV-cache write: the
reference is the composition of the two unfused references, in the order the model ran them."""
import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.rotary import apply_rotary_ref


def apply_rotary_and_write_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    # q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]; positions, slot_mapping: [T]
    # caches: [num_blocks, block_size, num_kv_heads, head_dim] → rotated q; rotated k and v in the cache
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q
