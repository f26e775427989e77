"""Triton: rotary embedding (neox layout) of the new tokens' queries and keys, with the rotated
keys and the values written straight into the paged KV cache (reference:
`rotary_kv_write.apply_rotary_and_write_kv_ref`).

Unfused, a decode step ran two launches per layer over the same rows: rotary (read q, k; write
rotated q, k) and the cache write (read rotated k and v; write the cache). Fused, one program per
token reads its cos/sin row once, rotates q into a new tensor, rotates k and copies v into the
cache slot. At batch 1 each launch is ~1.5–2 µs of latency for ~10 KB of data, so the saving is
one launch per layer. A negative slot skips the cache write (padding rows of a CUDA-graph
bucket); the query is rotated regardless.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_dtype, check_kv_cache_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape,
)
from replica.kernels.kv_cache_write_triton import to_cache_dtype


@triton.jit
def _rotate_rows(src, dst, stride_src_h, stride_dst_h, cos, sin,
                 NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    # src, dst: this token's first head; heads NUM_HEADS apart by the given strides
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    src_row = src + heads[:, None] * stride_src_h + dims[None, :]
    x1 = tl.load(src_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_row + HALF, mask=mask, other=0.0).to(tl.float32)
    dst_row = dst + heads[:, None] * stride_dst_h + dims[None, :]
    # rounded once into dst's dtype: q's, or the cache's (the model dtype or FP8)
    tl.store(dst_row, to_cache_dtype(x1 * cos - x2 * sin, dst), mask=mask)
    tl.store(dst_row + HALF, to_cache_dtype(x2 * cos + x1 * sin, dst), mask=mask)


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    slot_mapping_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos_sin,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr,      # PDL: positions, slots and cos/sin (no kernel of the step writes them) before the wait
):
    if not EARLY:
        pdl.wait_and_release(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(row + dims, mask=dims < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + dims, mask=dims < HALF, other=0.0)[None, :]
    if EARLY:
        pdl.wait_and_release(PDL)
    # q_out is contiguous [T, NUM_HEADS, 2 * HALF]
    _rotate_rows(q_ptr + token * stride_qt, q_out_ptr + token * (NUM_HEADS * 2 * HALF),
                 stride_qh, 2 * HALF, cos, sin, NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF)
    if slot >= 0:
        # slot = block_id * BLOCK_SIZE + offset → k_cache[block_id, offset, :, :]
        block_id = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block_id * stride_kc_block + offset * stride_kc_slot
        _rotate_rows(k_ptr + token * stride_kt, k_dst, stride_kh, stride_kc_head, cos, sin,
                     NUM_KV_HEADS, HALF, BLOCK_KV_H, BLOCK_HALF)
        heads = tl.arange(0, BLOCK_KV_H)
        full_dims = tl.arange(0, 2 * BLOCK_HALF)
        mask = (heads[:, None] < NUM_KV_HEADS) & (full_dims[None, :] < 2 * HALF)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + full_dims[None, :],
                    mask=mask)
        v_dst = v_cache_ptr + block_id * stride_vc_block + offset * stride_vc_slot
        tl.store(v_dst + heads[:, None] * stride_vc_head + full_dims[None, :], to_cache_dtype(v, v_cache_ptr),
                 mask=mask)


def apply_rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (any token/head strides,
    e.g. views of a fused qkv; last dim contiguous); positions: [T] int32/int64, each
    < max_positions (not checked: that would need a host sync); cos_sin_cache:
    [max_positions, head_dim] float32; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping: [T] int32/int64, negative = skip. Returns the rotated q (new, contiguous) and
    writes rotated k and v into the caches in place; no host synchronisation."""
    check_shape("q", q, (None, None, None))
    num_tokens, num_heads, head_dim = q.shape
    check_shape("k_cache", k_cache, (None, None, None, head_dim))
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("k", k, (num_tokens, num_kv_heads, head_dim))
    check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    check_shape("positions", positions, (num_tokens,))
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_shape("cos_sin_cache", cos_sin_cache, (None, head_dim))
    if head_dim % 2:
        raise ValueError(f"q: head_dim must be even for rotary embedding, got {head_dim}")
    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype(q=q, k=k, v=v)
    check_kv_cache_dtype(q, k_cache, v_cache)
    check_dtype("positions", positions, (torch.int32, torch.int64))
    check_dtype("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    check_dtype("cos_sin_cache", cos_sin_cache, (torch.float32,))
    for name, t in (("q", q), ("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    check_same_device(q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache,
                      k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    launch = pdl.launch_options(q.device)
    _rotary_kv_write_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, q_out, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), **launch, EARLY=launch["PDL"] and pdl.EARLY_LOADS,
        num_warps=4,
    )
    return q_out
