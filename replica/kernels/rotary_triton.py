"""Triton: rotary position embedding, neox layout (reference: `rotary.apply_rotary_ref`).

One program per token rotates all of its query and key heads, so the token's cos/sin row is read
once. cos_sin_cache: [max_positions, head_dim] float32, first half cos, second half sin; any rope
scaling (Llama 3, linear) is already in its values. The rotation is done in float32 and rounded
once to the input dtype, as in the reference.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_same_device, check_same_dtype,
    check_shape,
)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_t, stride_h, token, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
    src = src_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out_dtype = x1.dtype
    x1 = x1.to(tl.float32)
    # dst is contiguous [T, NUM_HEADS, 2 * HALF]
    dst = dst_ptr + token * (NUM_HEADS * 2 * HALF) + heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait_and_release(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + position * stride_cache
    cos = tl.load(row + dims, mask=dims < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + dims, mask=dims < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, token, cos, sin,
                  NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, token, cos, sin,
                  NUM_KV_HEADS, HALF, BLOCK_KV_H, BLOCK_HALF)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim] (any token/head strides, last
    dim contiguous); positions: [T] int32/int64, each < max_positions (not checked: that would
    need a host sync); cos_sin_cache: [max_positions, head_dim] float32 → new (q, k), contiguous."""
    check_shape("q", q, (None, None, None))
    num_tokens, num_heads, head_dim = q.shape
    check_shape("k", k, (num_tokens, None, head_dim))
    check_shape("positions", positions, (num_tokens,))
    check_shape("cos_sin_cache", cos_sin_cache, (None, head_dim))
    if head_dim % 2:
        raise ValueError(f"q: head_dim must be even for rotary embedding, got {head_dim}")
    check_dtype("q", q, FLOAT_DTYPES)
    check_same_dtype(q=q, k=k)
    check_dtype("positions", positions, (torch.int32, torch.int64))
    check_dtype("cos_sin_cache", cos_sin_cache, (torch.float32,))
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(name, t)
    check_same_device(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1], HALF=half,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV_H=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half), **pdl.launch_options(q.device), num_warps=4,
        )
    return q_out, k_out
