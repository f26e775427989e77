"""Triton, GGUF weights kept packed (`replica/quantization/gguf_packed.py`): out = x @ W^T for
decode batches above the GEMV's rows (`gguf_gemv_triton.GEMV_ROWS` < M ≤ MM_ROWS).

The GEMV makes each row's products with CUDA-core instructions, so its time grows with the rows
(Q4_0 8B decode step on an H200: 1.76 ms at 1 row, 3.73 at 4); dequantising W to bf16 for cuBLAS
writes and reads 15 GB a step (10.7 ms at 8 rows against bf16's 4.6;
bench/results/decode-batch-H200-2026-11-30.json). Here W is read once, packed, and multiplied
on the tensor cores where it is decoded:

    program (n, k)   BLOCK_N rows of W × all M rows of x, over split k's range of K
    per K tile       W [BLOCK_N, BLOCK_K]: decoded in registers by the dequantiser's own tile
                     decoders (`gguf_dequant_triton.tile`, fp32, rounded once to x's dtype:
                     the values dequantise + cuBLAS multiplies)
                     x [BLOCK_M, BLOCK_K]: M rows padded to BLOCK_M (≥ 16, the MMA's minimum)
                     acc [BLOCK_N, BLOCK_M] += W · xᵀ   (W is the MMA's wide operand: "swap AB")
    split K          while the grid has fewer than PROGRAMS_PER_SM programs an SM (_WIDE above
                     WIDE_ROWS rows): fp32 partials
                     [SPLIT_K, M, N] summed by linear_triton's split-K kernel

The grid depends only on shapes: launches are valid inside a CUDA graph.
Reference: `gguf_linear.gguf_linear_ref` (the tests, over every packed type).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import linear_triton, pdl
from replica.kernels.gguf_dequant_triton import tile, tile4_16, tile6_16, weight_operands
from replica.quantization.gguf_packed import PackedGGUF

MM_ROWS = 64            # rows of x up to which `gguf_linear_triton.gguf_linear` takes this kernel
# 4- and 6-bit codes decoded straight into x's 16-bit dtype (`tile4_16`, `tile6_16`); False: fp32 decode rounded once
DECODE_16 = True
# fp16 scales read two a 4-byte load, which the loop's pipeliner copies ahead (`load_fp16_pairs`)
SCALE_PAIRS = True
# split K until the grid has this many programs an SM: 8 up to WIDE_ROWS rows of x, 4 above
# (H200 8B step, the same process, 8 → 4: Q4_0 at batch 64 7.34 → 7.13 and 7.29 → 7.18 ms, Q4_K_M
# 8.98 → 8.64 and 8.91 → 8.66; at 32 once better, once not: 5.45 → 5.38, 5.39 → 5.47; at 8 worse)
PROGRAMS_PER_SM = 8
PROGRAMS_PER_SM_WIDE = 4
WIDE_ROWS = 32


@dataclass(frozen=True)
class MmConfig:
    block_n: int = 64     # rows of W a program owns
    block_k: int = 128    # columns of W a K tile (a multiple of 32; lowered to divide K)
    split_k: int = 0      # 0: chosen from the grid (PROGRAMS_PER_SM)
    num_warps: int = 4
    num_stages: int = 2    # Q4_0 8B step at batch 8: 5.12-5.20 ms; 3 stages 5.37, 4 5.66, 1 5.74


DEFAULT = MmConfig()
# (GGML type, N, K) → config, where a measured sweep found better than DEFAULT
TUNED: dict[tuple[str, int, int], MmConfig] = {}


@triton.jit
def _gguf_mm_kernel(x_ptr, q_ptr, h_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, partial_ptr,
                    M, N, K, k_per_split, stride_xm, stride_qn, stride_hn, stride_sn, stride_om,
                    BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, SUPER: tl.constexpr,
                    PAIRED: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    IEEE: tl.constexpr, DECODE_16: tl.constexpr, SCALE_PAIRS: tl.constexpr, PDL: tl.constexpr):
    # K is a multiple of BLOCK_K and k_per_split of BLOCK_K: no mask along K
    rows, n_mask, rows64 = linear_triton.gemv_program_rows(N, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    pdl.wait_and_release(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if BITS == 4 and DECODE_16:           # 16-bit x: codes decoded two an instruction
            w = tile4_16(q_ptr, s_ptr, m_ptr, rows64, n_mask, k0 // 32, K // 32, stride_qn, stride_sn,
                         ZERO_POINT, HAS_MIN, SUPER, PAIRED, BLOCK_N, BLOCK_K // 32, x_ptr.dtype.element_ty,
                         SCALE_PAIRS)
        elif BITS == 6 and DECODE_16:
            w = tile6_16(q_ptr, h_ptr, s_ptr, rows64, n_mask, k0 // 32, K // 32, stride_qn, stride_hn, stride_sn,
                         BLOCK_N, BLOCK_K // 32, x_ptr.dtype.element_ty, SCALE_PAIRS)
        else:
            w = tile(q_ptr, h_ptr, s_ptr, m_ptr, rows64, n_mask, k0, K, stride_qn, stride_hn, stride_sn, BITS,
                     ZERO_POINT, HAS_MIN, SUPER, PAIRED, GROUP, BLOCK_N, BLOCK_K, SCALE_PAIRS and BITS == 8)
        cols = k0 + tl.arange(0, BLOCK_K)
        # x row-major as it lies (a transposed load would fetch a 32-byte sector for each element)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
        if IEEE:                                          # fp32 x: no TF32 rounding
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
    linear_triton.gemv_store_tile(acc, rows, n_mask, ms, m_mask, pid_k, bias_ptr, out_ptr, partial_ptr, M, N,
                                  stride_om, HAS_BIAS, SPLIT_K)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class _Plan:
    block_m: int
    block_k: int
    split_k: int
    k_per_split: int      # columns of K a split covers (a multiple of block_k)


def _plan(num_rows: int, packed: PackedGGUF, config: MmConfig, device: torch.device) -> _Plan:
    n, k = packed.shape
    block_k = config.block_k
    while k % block_k:                # K is a multiple of 32 (every packed type's lane)
        block_k //= 2
    num_tiles = k // block_k
    split_k = config.split_k
    if split_k == 0:
        split_k = 1
        per_sm = PROGRAMS_PER_SM if num_rows <= WIDE_ROWS else PROGRAMS_PER_SM_WIDE
        while (triton.cdiv(n, config.block_n) * split_k < per_sm * _num_sms(device)
               and num_tiles >= 2 * split_k and split_k < 16):
            split_k *= 2
    k_per_split = triton.cdiv(num_tiles, min(split_k, num_tiles)) * block_k
    return _Plan(max(16, triton.next_power_of_2(num_rows)), block_k, triton.cdiv(k, k_per_split), k_per_split)


def _scale_pairs_fit(packed: PackedGGUF, block_k: int) -> bool:
    """Whether the tile decoders can read the fp16 scales (and mins) in pairs: a tile's groups
    and a row's groups even, every pair 4-byte aligned (a 6-bit lane's two scales always are,
    rows being multiples of 32)."""
    if packed.is_paired or packed.super_scales is not None:
        return False
    tensors = [packed.scales] + ([packed.min_operand] if packed.has_min else [])
    group = 32 if packed.bits == 4 else packed.group_size
    groups_even = packed.bits == 6 or (block_k // group >= 2 and block_k // group % 2 == 0
                                       and packed.shape[1] // group % 2 == 0)
    return groups_even and all(t.dtype == torch.float16 and t.stride(0) % 2 == 0 and t.data_ptr() % 4 == 0
                               for t in tensors)


def gguf_mm(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None, config: MmConfig | None = None) -> torch.Tensor:
    """x: [M ≤ MM_ROWS, K] (checked by the caller, `gguf_linear_triton.gguf_linear`) → [M, N] in
    x's dtype, written into `out` when given (any [M, N] view whose last dim is contiguous)."""
    num_rows, k = x.shape
    n = packed.shape[0]
    if num_rows > MM_ROWS:
        raise ValueError(f"x: gguf_mm takes at most {MM_ROWS} rows, got {num_rows} (dequantise + GEMM)")
    if out is None:
        out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    config = config or TUNED.get((packed.qtype, n, k)) or DEFAULT
    plan = _plan(num_rows, packed, config, x.device)
    partial = (torch.empty(plan.split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if plan.split_k > 1 else out)
    qweight, high, scales, mins = weight_operands(packed)
    decode_16 = DECODE_16 and x.dtype != torch.float32
    # the 16-bit decoders read paired scales for 4 and 6 bits; the fp32 decoder for 8 bits only
    scale_pairs = SCALE_PAIRS and (decode_16 or packed.bits == 8) and _scale_pairs_fit(packed, plan.block_k)
    launch = pdl.launch_options(x.device)
    _gguf_mm_kernel[(triton.cdiv(n, config.block_n), plan.split_k)](
        x, qweight, high, scales, mins, bias if bias is not None else out, out, partial,
        num_rows, n, k, plan.k_per_split, x.stride(0), qweight.stride(0), high.stride(0), scales.stride(0),
        out.stride(0), BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.has_min,
        SUPER=packed.super_scales is not None, PAIRED=packed.is_paired, GROUP=packed.group_size,
        HAS_BIAS=bias is not None, BLOCK_M=plan.block_m, BLOCK_N=config.block_n, BLOCK_K=plan.block_k,
        SPLIT_K=plan.split_k, IEEE=x.dtype == torch.float32, DECODE_16=decode_16, SCALE_PAIRS=scale_pairs,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch)
    if plan.split_k > 1:
        block = 1024
        linear_triton._split_k_sum_kernel[(num_rows, triton.cdiv(n, block))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=plan.split_k, BLOCK=block, num_warps=4, **launch)
    return out
