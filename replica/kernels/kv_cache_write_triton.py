"""Triton: scatter the new tokens' keys and values into the paged KV cache (reference:
`kv_cache_write.write_kv_cache_ref`).

One program per new token copies all of its kv heads: slot = block_id * block_size + offset,
the row lands at k_cache[block_id, offset, :, :]. A negative slot is skipped, so a runner may pad
a batch (e.g. up to a CUDA-graph bucket) with slot -1 rows that write nothing.
"""
import os

import torch
import triton
import triton.language as tl

from replica.kernels import fp8_linear, pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_dtype, check_kv_cache_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape,
)

FP8_MAX: tl.constexpr = tl.constexpr(fp8_linear.FP8_MAX)       # e4m3's largest finite value, 448
# the GPU's own fp32 → e4m3 conversion (rounds to nearest even), except under the interpreter
_NATIVE_FP8_CAST: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def to_cache_dtype(x, cache_ptr):
    """Values on their way into the KV cache (or an FP8 activation), in the destination's dtype:
    the model dtype as is, or FP8 e4m3 saturated at ±448 and rounded to nearest even, as torch's
    cast of the clamped value. On the GPU that is one hardware conversion (cvt with rn); under
    Triton's interpreter, which converts fp32 → e4m3 without the carry into the exponent (31.5
    became 16, not 32), the rounding is done here in fp32 first (the conversion then only drops
    zero bits). Either way the GPU, the interpreter and the torch reference agree bit for bit."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        clamped = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
        if _NATIVE_FP8_CAST:
            return clamped.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        bits = clamped.to(tl.int32, bitcast=True)
        magnitude = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        # e4m3 keeps 3 mantissa bits: the step is 2^(e − 3) in the binade 2^e, 2^-9 below 2^-6
        step_exponent = tl.maximum((bits >> 23 & 0xFF) - 3, 127 - 9)
        step = (step_exponent << 23).to(tl.float32, bitcast=True)
        inv_step = ((254 - step_exponent) << 23).to(tl.float32, bitcast=True)
        # magnitude / step < 16: adding and removing 1.5 · 2^23 rounds it to an integer, ties to
        # even; the sign goes back on afterwards (so that −0 stays −0)
        rounded = ((magnitude * inv_step + 12582912.0) - 12582912.0) * step
        x = (rounded.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait_and_release(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = k_cache_ptr + block_id * stride_kc_block + offset * stride_kc_slot
    v_dst = v_cache_ptr + block_id * stride_vc_block + offset * stride_vc_slot
    tl.store(k_dst + heads[:, None] * stride_kc_head + dims[None, :], to_cache_dtype(k, k_cache_ptr), mask=mask)
    tl.store(v_dst + heads[:, None] * stride_vc_head + dims[None, :], to_cache_dtype(v, v_cache_ptr), mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, num_kv_heads, head_dim] (any token/head strides, e.g. views of a fused qkv);
    caches: [num_blocks, block_size, num_kv_heads, head_dim] in k's dtype or FP8 e4m3 (values
    saturated at ±448); slot_mapping: [T] int32/int64, negative = skip. Writes in place; no host
    synchronisation."""
    check_shape("k_cache", k_cache, (None, None, None, None))
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("k", k, (None, num_kv_heads, head_dim))
    num_tokens = k.shape[0]
    check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_dtype("k", k, FLOAT_DTYPES)
    check_same_dtype(k=k, v=v)
    check_kv_cache_dtype(k, k_cache, v_cache)
    check_dtype("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        **pdl.launch_options(k.device), num_warps=4,
    )
