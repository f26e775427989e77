"""Triton: GGUF weights kept packed (`replica/quantization/gguf_packed.py`) dequantised to a dense
[N, K] matrix in x's dtype, for prefill and decode batches above the GEMV's rows: then one cuBLAS
GEMM (`gguf_linear_triton.gguf_linear`). At 2048 rows that costs 1.05-1.14x bf16's time on an
H200 (bench/results/quant-issue15b-H200-8b-2026-11-28.json); the dequantisation itself writes
2.5-2.7 TB/s of bf16 (bench/results/quant-issue15c-H200-8b-2026-11-29.json).
Reference: `gguf_packed.dequantize_packed`, bit for bit (fp32 arithmetic, rounded once).
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl, q4_word_dot_triton
from replica.quantization.gguf_packed import GROUP_SIZE, PackedGGUF


@triton.jit
def _gguf_dequant_kernel(q_ptr, s_ptr, m_ptr, out_ptr, N, num_groups, stride_qn, stride_sn, stride_on,
                         BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr,
                         SUPER: tl.constexpr = False, PAIRED: tl.constexpr = False):
    pdl.wait_and_release(PDL)
    # GROUP: elements a scale covers (32; Q6_K's 8-bit codes 16)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    mask2 = (rows < N)[:, None] & (gs < num_groups)[None, :]
    mask3 = mask2[:, :, None]
    rows64 = rows.to(tl.int64)
    s_offs = rows64[:, None] * stride_sn + gs[None, :]
    if SUPER or PAIRED:         # Q4_K's layouts, read as the GEMV reads them
        scale, low = q4_word_dot_triton.load_scale_min(s_ptr, m_ptr, s_offs, mask2, False, True, SUPER, PAIRED)
        scale, low = scale[:, :, None], low[:, :, None]
    elif HAS_MIN:
        scale = tl.load(s_ptr + s_offs, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
        low = tl.load(m_ptr + s_offs, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    else:
        scale = tl.load(s_ptr + s_offs, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
        low = tl.zeros([1, 1, 1], dtype=tl.float32)
    if BITS == 4:
        # a group's 4 words to a lane (one 16-byte load); nibble i < 4 of a word holds its
        # element 2i, nibble 4 + i element 2i + 1: joined on a new last axis, [.., 4, 2] is the
        # word's 8 values in order
        w = tl.arange(0, 4)
        i = tl.arange(0, 4)
        words = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (gs * 4)[None, :, None]
                        + w[None, None, :], mask=mask3, other=0)[:, :, :, None]
        scale4, low4 = scale[:, :, :, None], low[:, :, :, None]
        even = (((words >> (4 * i)[None, None, None, :]) & 0xF).to(tl.float32) - ZERO_POINT) * scale4 + low4
        odd = (((words >> (16 + 4 * i)[None, None, None, :]) & 0xF).to(tl.float32) - ZERO_POINT) * scale4 + low4
        w_f = tl.reshape(tl.join(even, odd), [BLOCK_N, GROUPS, 32])
        j32 = tl.arange(0, 32)
        tl.store(out_ptr + rows64[:, None, None] * stride_on + (gs * 32)[None, :, None] + j32[None, None, :],
                 w_f.to(out_ptr.dtype.element_ty), mask=mask3)
    else:
        j = tl.arange(0, GROUP)
        codes = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (gs * GROUP)[None, :, None]
                        + j[None, None, :], mask=mask3, other=0)
        w = (codes.to(tl.float32) - ZERO_POINT) * scale + low
        dst = out_ptr + rows64[:, None, None] * stride_on + (gs * GROUP)[None, :, None] + j[None, None, :]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _gguf_dequant6_kernel(q_ptr, h_ptr, s_ptr, out_ptr, N, num_lanes, stride_qn, stride_hn, stride_sn, stride_on,
                          BLOCK_N: tl.constexpr, LANES: tl.constexpr, PDL: tl.constexpr):
    """The 6-bit layout: a lane is 32 elements (4 words of low nibbles, 2 words of top bits, two
    scales); the 4-bit branch's decoding with each code's top bits ORed in."""
    pdl.wait_and_release(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ls = tl.program_id(1) * LANES + tl.arange(0, LANES)
    mask3 = ((rows < N)[:, None] & (ls < num_lanes)[None, :])[:, :, None]
    rows64 = rows.to(tl.int64)
    w = tl.arange(0, 4)                                   # the lane's 4-bit word; its half is w // 2
    words = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (ls * 4)[None, :, None] + w[None, None, :],
                    mask=mask3, other=0)[:, :, :, None]
    half = (ls * 2)[None, :, None] + (w // 2)[None, None, :]
    high = tl.load(h_ptr + rows64[:, None, None] * stride_hn + half, mask=mask3, other=0)[:, :, :, None]
    scale = tl.load(s_ptr + rows64[:, None, None] * stride_sn + half, mask=mask3, other=0.0)
    scale4 = scale.to(tl.float32)[:, :, :, None]
    # element 2i of a word is nibble i, element 2i + 1 nibble 4 + i; nibble n's top bits sit at
    # bit 8 (n // 2) + 2 (n % 2) of its half's word, + 4 for the half's second word
    i = tl.arange(0, 4)[None, None, None, :]
    top = 8 * (i // 2) + 2 * (i % 2) + 4 * (w % 2)[None, None, :, None]
    even = ((words >> (4 * i)) & 0xF) | (((high >> top) & 0x3) << 4)
    odd = ((words >> (16 + 4 * i)) & 0xF) | (((high >> (top + 16)) & 0x3) << 4)
    w_f = tl.reshape(tl.join((even.to(tl.float32) - 32.0) * scale4, (odd.to(tl.float32) - 32.0) * scale4),
                     [BLOCK_N, LANES, 32])
    j32 = tl.arange(0, 32)
    tl.store(out_ptr + rows64[:, None, None] * stride_on + (ls * 32)[None, :, None] + j32[None, None, :],
             w_f.to(out_ptr.dtype.element_ty), mask=mask3)


def dequantize(packed: PackedGGUF, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight as a dense [N, K] tensor in `dtype` (same values as
    `gguf_packed.dequantize_packed`, computed in fp32 and rounded once)."""
    n, k = packed.shape
    out = torch.empty(n, k, dtype=dtype, device=packed.qweight.device)
    if packed.bits == 6:
        num_lanes, block_n, lanes = k // GROUP_SIZE, 16, 16
        qweight, high = packed.qweight.view(torch.int32), packed.qhigh.view(torch.int32)
        _gguf_dequant6_kernel[(triton.cdiv(n, block_n), triton.cdiv(num_lanes, lanes))](
            qweight, high, packed.scales, out, n, num_lanes, qweight.stride(0), high.stride(0),
            packed.scales.stride(0), out.stride(0), BLOCK_N=block_n, LANES=lanes,
            **pdl.launch_options(out.device), num_warps=4)
        return out
    num_groups = k // packed.group_size
    block_n, groups = 16, 16 * GROUP_SIZE // packed.group_size
    qweight = packed.qweight.view(torch.int32) if packed.bits == 4 else packed.qweight
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(num_groups, groups))](
        qweight, packed.scales, packed.min_operand, out, n, num_groups, qweight.stride(0),
        packed.scales.stride(0), out.stride(0),
        BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.has_min, SUPER=packed.super_scales is not None,
        PAIRED=packed.is_paired,
        BLOCK_N=block_n, GROUPS=groups, GROUP=packed.group_size, **pdl.launch_options(out.device), num_warps=4,
    )
    return out
