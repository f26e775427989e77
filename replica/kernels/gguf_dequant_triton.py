"""Triton: GGUF weights kept packed (`replica/quantization/gguf_packed.py`) dequantised to a dense
[N, K] matrix in x's dtype, for prefill and decode batches above the GEMV's rows: then one cuBLAS
GEMM (`gguf_linear_triton.gguf_linear`). At 2048 rows that costs 1.05-1.14x bf16's time on an
H200 (bench/results/quant-issue15b-H200-8b-2026-11-28.json); the dequantisation itself writes
2.5-2.7 TB/s of bf16 (bench/results/quant-issue15c-H200-8b-2026-11-29.json).
The tile decoders (`tile`, by layout `tile4`, `tile6`, `tile8`: a [BLOCK_N, K-tile] block of W in fp32) are shared
with the small-batch GEMM (`gguf_mm_triton`), which multiplies the tile where it is decoded.
Reference: `gguf_packed.dequantize_packed`, bit for bit (fp32 arithmetic, rounded once).
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl, q4_word_dot_triton
from replica.quantization.gguf_packed import PackedGGUF


@triton.jit
def _group_words(q_ptr, rows64, gs, mask2, stride_qn):
    """The 4-bit layout's 4 int32 words of each group gs (one 16-byte load a lane), masked groups
    zero: [BLOCK_N, GROUPS, 4 words, 1]."""
    w = tl.arange(0, 4)
    return tl.load(q_ptr + rows64[:, None, None] * stride_qn + (gs * 4)[None, :, None] + w[None, None, :],
                   mask=mask2[:, :, None], other=0)[:, :, :, None]


@triton.jit
def tile4(q_ptr, s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_qn, stride_sn, ZERO_POINT: tl.constexpr,
          HAS_MIN: tl.constexpr, SUPER: tl.constexpr, PAIRED: tl.constexpr, BLOCK_N: tl.constexpr,
          GROUPS: tl.constexpr):
    """4-bit: groups g0 .. g0 + GROUPS of rows rows64 → [BLOCK_N, GROUPS · 32] fp32, element order.
    A group's 4 words go to a lane (one 16-byte load); nibble i < 4 of a word holds its element
    2i, nibble 4 + i element 2i + 1: joined on a new last axis, [.., 4, 2] is the word's 8 values
    in order. Masked-out groups and rows give zeros."""
    gs = g0 + tl.arange(0, GROUPS)
    mask2 = n_mask[:, None] & (gs < num_groups)[None, :]
    s_offs = rows64[:, None] * stride_sn + gs[None, :]
    # Q4_K's layouts are read as the GEMV reads them (HAS_MIN is set for them)
    scale, low = q4_word_dot_triton.load_scale_min(s_ptr, m_ptr, s_offs, mask2, False, HAS_MIN, SUPER, PAIRED)
    i = tl.arange(0, 4)
    words = _group_words(q_ptr, rows64, gs, mask2, stride_qn)
    scale4 = scale[:, :, None, None]
    even = (((words >> (4 * i)[None, None, None, :]) & 0xF).to(tl.float32) - ZERO_POINT) * scale4
    odd = (((words >> (16 + 4 * i)[None, None, None, :]) & 0xF).to(tl.float32) - ZERO_POINT) * scale4
    if HAS_MIN:
        even += low[:, :, None, None]
        odd += low[:, :, None, None]
    return tl.reshape(tl.join(even, odd), [BLOCK_N, GROUPS * 32])


@triton.jit
def load_fp16_pairs(ptr, offs, mask):
    """fp16 values 2j and 2j + 1 from one 4-byte load at int32 offset j: [...] → [..., 2]. A
    GEMM's loop pipelines its loads with cp.async, which copies 4, 8 or 16 bytes: a 2-byte scale
    load is left synchronous, and each K tile would wait a memory round trip for its scales."""
    words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + offs, mask=mask, other=0)
    lo = (words & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = ((words >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def load_scale_min_pairs(s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_sn, HAS_MIN: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Groups g0 .. g0 + GROUPS' fp16 scales (and mins, else 0.0) read two a load: [BLOCK_N,
    GROUPS] fp16. g0, GROUPS and each row's groups are even."""
    ps = g0 // 2 + tl.arange(0, GROUPS // 2)
    p_offs = rows64[:, None] * (stride_sn // 2) + ps[None, :]
    p_mask = n_mask[:, None] & (ps < num_groups // 2)[None, :]
    scale = tl.reshape(load_fp16_pairs(s_ptr, p_offs, p_mask), [BLOCK_N, GROUPS])
    low = 0.0
    if HAS_MIN:
        low = tl.reshape(load_fp16_pairs(m_ptr, p_offs, p_mask), [BLOCK_N, GROUPS])
    return scale, low


@triton.jit
def codes_16(pairs, ZERO_POINT: tl.constexpr, DTYPE: tl.constexpr):
    """int32 words holding two codes < 128, one a 16-bit half → [..., 2] DTYPE (code - ZERO_POINT),
    exactly: ORed with the bits of BASE (2^7 in bf16, 2^10 in fp16, whose last mantissa bit is
    worth 1) each half is the number BASE + code."""
    if DTYPE == tl.bfloat16:
        base_bits: tl.constexpr = 0x43004300
        base: tl.constexpr = 128.0
    else:
        base_bits: tl.constexpr = 0x64006400
        base: tl.constexpr = 1024.0
    pairs = pairs | base_bits
    even = (pairs & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    odd = ((pairs >> 16) & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    return tl.join(even, odd) - (base + ZERO_POINT)


@triton.jit
def tile4_16(q_ptr, s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_qn, stride_sn, ZERO_POINT: tl.constexpr,
             HAS_MIN: tl.constexpr, SUPER: tl.constexpr, PAIRED: tl.constexpr, BLOCK_N: tl.constexpr,
             GROUPS: tl.constexpr, DTYPE: tl.constexpr, SCALE_PAIRS: tl.constexpr = False):
    """`tile4` decoded straight into a 16-bit DTYPE (bf16 or fp16), two codes an instruction, for
    the tensor-core GEMM: no int→float conversions (quarter-rate on the SM), no fp32 → 16-bit
    rounding. `(word >> 4i) & 0x000F000F` holds elements 2i and 2i + 1 in its two halves, which
    `codes_16` makes exact 16-bit numbers; · scale (+ min) runs as bf16x2 / fp16x2 arithmetic.
    The scale and min are rounded to DTYPE first: fp16 Q4_0 equals `tile4` rounded to fp16 bit
    for bit; bf16 differs by the scale's rounding (≤ 2^-9 relative, far below the 4-bit codes'
    own error). SCALE_PAIRS: fp16 scales (and mins) read two groups a 4-byte load
    (`load_scale_min_pairs`; even groups a row and GROUPS)."""
    gs = g0 + tl.arange(0, GROUPS)
    mask2 = n_mask[:, None] & (gs < num_groups)[None, :]
    if SCALE_PAIRS:
        scale, low = load_scale_min_pairs(s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_sn, HAS_MIN,
                                          BLOCK_N, GROUPS)
    else:
        s_offs = rows64[:, None] * stride_sn + gs[None, :]
        scale, low = q4_word_dot_triton.load_scale_min(s_ptr, m_ptr, s_offs, mask2, False, HAS_MIN, SUPER, PAIRED)
    i = tl.arange(0, 4)
    words = _group_words(q_ptr, rows64, gs, mask2, stride_qn)
    codes = tl.reshape(codes_16((words >> (4 * i)[None, None, None, :]) & 0x000F000F, ZERO_POINT, DTYPE),
                       [BLOCK_N, GROUPS, 32])
    out = codes * scale.to(DTYPE)[:, :, None]
    if HAS_MIN:
        out += low.to(DTYPE)[:, :, None]
    return tl.reshape(out, [BLOCK_N, GROUPS * 32])


@triton.jit
def tile8(q_ptr, s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_qn, stride_sn, ZERO_POINT: tl.constexpr,
          HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
          SCALE_PAIRS: tl.constexpr = False):
    """8-bit (one signed byte a code, GROUP of them a scale): groups g0 .. g0 + GROUPS →
    [BLOCK_N, GROUPS · GROUP] fp32. SCALE_PAIRS as in `tile4_16`."""
    gs = g0 + tl.arange(0, GROUPS)
    mask2 = n_mask[:, None] & (gs < num_groups)[None, :]
    if SCALE_PAIRS:
        scale, low = load_scale_min_pairs(s_ptr, m_ptr, rows64, n_mask, g0, num_groups, stride_sn, HAS_MIN,
                                          BLOCK_N, GROUPS)
        scale = scale.to(tl.float32)
        if HAS_MIN:
            low = low.to(tl.float32)
    else:
        scale, low = q4_word_dot_triton.load_scale_min(s_ptr, m_ptr, rows64[:, None] * stride_sn + gs[None, :],
                                                       mask2, False, HAS_MIN)
    j = tl.arange(0, GROUP)
    codes = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (gs * GROUP)[None, :, None] + j[None, None, :],
                    mask=mask2[:, :, None], other=0)
    w = (codes.to(tl.float32) - ZERO_POINT) * scale[:, :, None]
    if HAS_MIN:
        w += low[:, :, None]
    return tl.reshape(w, [BLOCK_N, GROUPS * GROUP])


@triton.jit
def tile6(q_ptr, h_ptr, s_ptr, rows64, n_mask, l0, num_lanes, stride_qn, stride_hn, stride_sn,
          BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """The 6-bit layout: lanes l0 .. l0 + LANES of 32 elements (4 words of low nibbles, 2 words
    of top bits, two scales) → [BLOCK_N, LANES · 32] fp32; `tile4`'s decoding with each code's
    top bits ORed in."""
    ls = l0 + tl.arange(0, LANES)
    mask3 = (n_mask[:, None] & (ls < num_lanes)[None, :])[:, :, None]
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
    return tl.reshape(tl.join((even.to(tl.float32) - 32.0) * scale4, (odd.to(tl.float32) - 32.0) * scale4),
                      [BLOCK_N, LANES * 32])


@triton.jit
def tile6_16(q_ptr, h_ptr, s_ptr, rows64, n_mask, l0, num_lanes, stride_qn, stride_hn, stride_sn,
             BLOCK_N: tl.constexpr, LANES: tl.constexpr, DTYPE: tl.constexpr, SCALE_PAIRS: tl.constexpr = False):
    """`tile6` decoded straight into a 16-bit DTYPE as `tile4_16` decodes 4-bit codes: a pair's
    top bits sit 16 bits apart in the plane's word, so one shift and mask give both halves'.
    SCALE_PAIRS: a lane's two fp16 scales in one 4-byte load (`load_fp16_pairs`)."""
    ls = l0 + tl.arange(0, LANES)
    mask3 = (n_mask[:, None] & (ls < num_lanes)[None, :])[:, :, None]
    w = tl.arange(0, 4)
    words = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (ls * 4)[None, :, None] + w[None, None, :],
                    mask=mask3, other=0)[:, :, :, None]
    half = (ls * 2)[None, :, None] + (w // 2)[None, None, :]
    high = tl.load(h_ptr + rows64[:, None, None] * stride_hn + half, mask=mask3, other=0)[:, :, :, None]
    if SCALE_PAIRS:                                       # [BLOCK_N, LANES, 2 halves, 1]
        scale = load_fp16_pairs(s_ptr, rows64[:, None] * (stride_sn // 2) + ls[None, :],
                                n_mask[:, None] & (ls < num_lanes)[None, :])[:, :, :, None]
    else:                                                 # [BLOCK_N, LANES, 4 words]
        scale = tl.load(s_ptr + rows64[:, None, None] * stride_sn + half, mask=mask3, other=0.0)
    i = tl.arange(0, 4)[None, None, None, :]
    top = 8 * (i // 2) + 2 * (i % 2) + 4 * (w % 2)[None, None, :, None]
    codes = codes_16(((words >> (4 * i)) & 0x000F000F) | (((high >> top) & 0x00030003) << 4), 32, DTYPE)
    if SCALE_PAIRS:                                       # word w is in half w // 2
        out = tl.reshape(codes, [BLOCK_N, LANES, 2, 16]) * scale.to(DTYPE)
    else:
        out = tl.reshape(codes, [BLOCK_N, LANES, 4, 8]) * scale.to(DTYPE)[:, :, :, None]
    return tl.reshape(out, [BLOCK_N, LANES * 32])


@triton.jit
def tile(q_ptr, h_ptr, s_ptr, m_ptr, rows64, n_mask, k0, K, stride_qn, stride_hn, stride_sn, BITS: tl.constexpr,
         ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, SUPER: tl.constexpr, PAIRED: tl.constexpr,
         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_PAIRS: tl.constexpr = False):
    """Columns k0 .. k0 + BLOCK_K of rows rows64, any packed layout → [BLOCK_N, BLOCK_K] fp32.
    SCALE_PAIRS: the 8-bit types' fp16 scales read two a load (the 4- and 6-bit layouts' pairs
    are read by their 16-bit decoders)."""
    if BITS == 4:
        w = tile4(q_ptr, s_ptr, m_ptr, rows64, n_mask, k0 // 32, K // 32, stride_qn, stride_sn, ZERO_POINT,
                  HAS_MIN, SUPER, PAIRED, BLOCK_N, BLOCK_K // 32)
    elif BITS == 6:
        w = tile6(q_ptr, h_ptr, s_ptr, rows64, n_mask, k0 // 32, K // 32, stride_qn, stride_hn, stride_sn,
                  BLOCK_N, BLOCK_K // 32)
    else:
        w = tile8(q_ptr, s_ptr, m_ptr, rows64, n_mask, k0 // GROUP, K // GROUP, stride_qn, stride_sn,
                  ZERO_POINT, HAS_MIN, BLOCK_N, BLOCK_K // GROUP, GROUP, SCALE_PAIRS)
    return w


@triton.jit
def _gguf_dequant_kernel(q_ptr, h_ptr, s_ptr, m_ptr, out_ptr, N, K, stride_qn, stride_hn, stride_sn, stride_on,
                         BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr,
                         SUPER: tl.constexpr = False, PAIRED: tl.constexpr = False):
    # a program: BLOCK_N rows x BLOCK_K columns of W; GROUP: elements a scale covers (8-bit)
    pdl.wait_and_release(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    rows64 = rows.to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    w = tile(q_ptr, h_ptr, s_ptr, m_ptr, rows64, n_mask, k0, K, stride_qn, stride_hn, stride_sn, BITS, ZERO_POINT,
             HAS_MIN, SUPER, PAIRED, GROUP, BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows64[:, None] * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (cols < K)[None, :])


def weight_operands(packed: PackedGGUF) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, top bits, scales, mins) as the tile decoders take them: 4- and 6-bit codes as int32
    words; a type without a plane gets the codes in its place (never read)."""
    qweight = packed.qweight.view(torch.int32) if packed.bits in (4, 6) else packed.qweight
    high = packed.qhigh.view(torch.int32) if packed.bits == 6 else qweight
    return qweight, high, packed.scales, packed.min_operand


def dequantize(packed: PackedGGUF, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight as a dense [N, K] tensor in `dtype` (same values as
    `gguf_packed.dequantize_packed`, computed in fp32 and rounded once)."""
    n, k = packed.shape
    out = torch.empty(n, k, dtype=dtype, device=packed.qweight.device)
    qweight, high, scales, mins = weight_operands(packed)
    block_n, block_k = 16, 512                # 16 groups of 32 a program (widened Q6_K: 32 of 16)
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, high, scales, mins, out, n, k, qweight.stride(0), high.stride(0), scales.stride(0), out.stride(0),
        BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.has_min, SUPER=packed.super_scales is not None,
        PAIRED=packed.is_paired, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=packed.group_size,
        **pdl.launch_options(out.device), num_warps=4,
    )
    return out
