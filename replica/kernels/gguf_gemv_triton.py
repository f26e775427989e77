"""Triton, GGUF weights kept packed (`replica/quantization/gguf_packed.py`): the decode GEMV for
1..4 rows of x (more rows: `gguf_mm_triton`, then `gguf_dequant_triton` + cuBLAS).

Decode reads each weight byte once, so its floor is packed bytes / memory bandwidth: at 4 bits
an H200 must turn ~9 G weights a microsecond into products, so both the load instructions and
the arithmetic per weight decide the speed. On CUDA the 4-bit GEMV rounds x to int8 first and
multiplies with dp4a (`gguf_gemv_x8_triton`, X_INT8 below); this module's 4-bit kernel, for bf16
or other x as it is (numbers: bench/NOTES.md, "The 4-bit GEMV"):

    lane   one group of one row: its 4 words (32 codes) in one 16-byte load, split into 4 words
           in registers; the group's scale (and min) one 2-byte load; BLOCK_N rows a program,
           lanes along the groups, warps along the rows
    x      each word's 8 values as 4 bf16 pairs, one 16-byte load (int32 pairs), shared by the
           thread's rows (x's pointers are built with the weights' shape, row stride 0, so the
           load lands in the words' layout: no conversion through shared memory)
    word   bf16 x (CUDA, sm_80 and later): inline PTX. (word >> 4i) & 0x000F000F holds the
           codes of elements 2i and 2i + 1 in its two halves (the packed layout's pair order);
           OR-ed into 128.0's mantissa they are the bf16 pair (128 + q, 128 + q'); one SUB of 136
           (an FMA before sm_90) leaves q − 8, exact; bf16x2 FMAs with x, summed to fp32 a word
           other x (fp16, fp32, Triton's interpreter): the same codes as exact fp32 products,
           per element (OR into 2^23's mantissa, one FADD), summed in fp32

Per group the scale is factored out of the sum (exact algebra); codes are centred at 8 for every
type (Q4_K's 0..15 included), so the bf16 products stay small and do not cancel against the
min term:

    Σ_i w_i x_i = scale · Σ_i (q_i − 8) x_i + (min + (8 − zero_point) · scale) · Σ_i x_i

Rows of x (1..4, a constexpr) reuse each loaded word: the weight is read once whatever the
batch. 6-bit (Q6_K) runs this kernel on int8 x with SIX_BIT (`gguf_gemv_x8_triton.six_bit_tile`);
8-bit (Q8_0, the 5-bit types and Q6_K widened to bytes) has its own kernel of the same shape
(`gguf_gemv8_triton.py`). SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N], summed by
linear_triton's split-K kernel or, with `gguf_gemv_add_rms_norm`, by the next RMSNorm. GATED
(a [gate | up] projection) applies silu(gate) · up in the epilogue. The grid depends only on
shapes: launches are valid inside a CUDA graph.
"""
import functools

import torch
import triton
import triton.language as tl

from replica.kernels import gguf_gemv8_triton, gguf_gemv_x8_triton, linear_triton, pdl, q4_word_dot_triton
from replica.kernels.gguf_gemv_plan import MAX_UNROLLED_TILES, GemvPlan, num_sms, plan_gemv
from replica.kernels.gguf_gemv_plan import TUNED, GemvConfig, choose_gemv_config  # noqa: F401 (the GEMV's API)
from replica.kernels.gguf_linear import XInt8
from replica.quantization.gguf_packed import PackedGGUF

MAX_ROWS = 16         # rows of x the GEMV takes (its cost grows with the rows)
ROWS_PER_LAUNCH = 4   # the kernels' accumulators; more rows take several launches
# rows up to which `gguf_linear_triton.gguf_linear` takes the GEMV, else the small-batch GEMM
# (`gguf_mm_triton`). H200, Q4_0 8B decode step: 4 rows 3.7 ms here against 5.15 there
# (bench/results/decode-batch-H200-8b-2026-11-30.json)
GEMV_ROWS = 4
USE_BF16_ASM = True   # 4-bit, bf16 x on CUDA: the bf16x2 word products (else the exact fp32 path)
# 4-bit: x rounded to int8 per 32-element group and multiplied with dp4a (`gguf_gemv_x8_triton`).
# None: on CUDA, sm_61 and later (W2 on an H200, bench/NOTES.md "x in 8 bits": Q4_0 469 tok/s
# against 452 with bf16 x); True: also under the interpreter, which emulates dp4a; False: never.
X_INT8: bool | None = None
# Under PDL the first PREFETCH_WAVE programs an SM ask L2 for their weights before their wait
# (`pdl.prefetch_l2`): W2 +0.8-1.1 % (4-bit formats); every program: -3-4 %. 0: none. With the
# unrolled one-warp tiles, W2 Q4_0: 0 593.6, 2 601.6, 3 600.5, 4 597.5, 8 579.6 tok/s.
PREFETCH_WAVE = 2
# The int8-x GEMV's code loads, read once a step while every program reads x, evicted first from L1
# and L2 (`eviction_policy`). W2 Q4_0 (one process): no hint 601.0, evict-first 608.4, cached in L2
# only (.cg, measured and removed) 601.6 tok/s.
STREAM_WEIGHTS = True
# The same evict-first hint for the 6-bit codes (the Q6_K head, Q4_K_M's Q6_K layers): W2 Q4_K 586.2
# against 586.3 tok/s without (bench/results/decode-parts-ab-six-bit-stream-H200-2026-12-01.json), so off.
STREAM_SIX_BIT = False
# Measured and dropped (bench/NOTES.md, "Moving short kernels' work into their neighbours
# lost"): the first wave prefetching whole small matrices (o_proj's 9.4 MB during attention):
# W2 Q4_0 -1.8%, with qkv -4.6%.
@triton.jit(do_not_specialize=["one"])
def _q4_gemv_kernel(
    x_ptr, x2_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, partial_ptr, sumsq_ptr, h_ptr,
    N, num_groups, groups_per_split, one, stride_xm, stride_qn, stride_sn, stride_om, eps, prefetch_programs,
    stride_hn,
    ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BF16_ASM: tl.constexpr,          # x as it is: 0 exact fp32 products; 80 or 90 bf16x2 PTX for that arch
    X8: tl.constexpr,                # x rounded to int8 (`gguf_gemv_x8_triton`): x_ptr its codes as int32
                                     # words, x2_ptr its (dx, xsum) as int64, stride_xm in words
    DP4A: tl.constexpr,              # X8: dp4a (CUDA) or its emulation (the interpreter)
    NUM_PARTS: tl.constexpr,         # X8 from `rms_norm_x8_triton`: the parts of Σ s² a row at sumsq_ptr,
    PARTS: tl.constexpr,             # whose rstd scales the products (PARTS: a power of two ≥ NUM_PARTS); 0: none
    GATED: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr,          # PDL: programs below prefetch_programs (launch order) prefetch
    SIX_BIT: tl.constexpr = False,   # X8, 6-bit codes: top bits at h_ptr, s_ptr the scales as int32 pairs
    SUPER: tl.constexpr = False,     # Q4_K: s_ptr its int16 sub-scales, m_ptr its superblocks' (d, -dmin)
    PAIRED: tl.constexpr = False,    # s_ptr int32: a group's fp16 scale and min in one word
    TILES: tl.constexpr = 0,         # > 0: the split's tiles, unrolled (every load issued up front); 0: a loop
    STREAM: tl.constexpr = False,    # the codes' loads evicted first (`q4_word_dot_triton.load_words4`)
):
    rows, n_mask, rows64, row_zero, g, g_start, g_end = q4_word_dot_triton.packed_gemv_lanes(
        N, groups_per_split, num_groups, BLOCK_N, GROUPS, GATED)
    if PREFETCH:
        if tl.program_id(0) + tl.program_id(1) * tl.num_programs(0) < prefetch_programs:   # the first wave
            q4_word_dot_triton.prefetch_packed(q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, g_start, g_end,
                                               GROUPS, 1, HAS_MIN, SUPER, PAIRED)
            if SIX_BIT:
                gguf_gemv_x8_triton.prefetch_high(h_ptr, rows64, stride_hn, g_start, g_end, GROUPS)
    pdl.wait_and_release(PDL)
    if NUM_PARTS > 0:   # the norm's 1/rms first: its loads overlap the weights' instead of ending the program
        rstd0 = _row_rstd(sumsq_ptr, 0, num_groups, eps, NUM_PARTS, PARTS)
        rstd1 = _row_rstd(sumsq_ptr, tl.minimum(1, M - 1), num_groups, eps, NUM_PARTS, PARTS)
        rstd2 = _row_rstd(sumsq_ptr, tl.minimum(2, M - 1), num_groups, eps, NUM_PARTS, PARTS)
        rstd3 = _row_rstd(sumsq_ptr, tl.minimum(3, M - 1), num_groups, eps, NUM_PARTS, PARTS)
    pid_k = tl.program_id(1)
    tot0 = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    tot1 = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    tot2 = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    tot3 = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    if TILES > 0:
        for t in tl.static_range(TILES):
            tot0, tot1, tot2, tot3 = _tile_step(
                tot0, tot1, tot2, tot3, g_start + t * GROUPS, g, g_end, x_ptr, x2_ptr, q_ptr, s_ptr, m_ptr, h_ptr,
                rows64, row_zero, stride_qn, stride_sn, stride_hn, stride_xm, num_groups, one, M, EVEN_K,
                ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A, SIX_BIT, SUPER, PAIRED, STREAM)
    else:
        for g0 in range(g_start, g_end, GROUPS):
            tot0, tot1, tot2, tot3 = _tile_step(
                tot0, tot1, tot2, tot3, g0, g, g_end, x_ptr, x2_ptr, q_ptr, s_ptr, m_ptr, h_ptr,
                rows64, row_zero, stride_qn, stride_sn, stride_hn, stride_xm, num_groups, one, M, EVEN_K,
                ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A, SIX_BIT, SUPER, PAIRED, STREAM)

    if NUM_PARTS > 0:         # x was rounded before the norm's 1/rms: scale the dot products (before bias, SiLU)
        tot0, tot1, tot2, tot3 = tot0 * rstd0, tot1 * rstd1, tot2 * rstd2, tot3 * rstd3
    linear_triton.gemv_store_rows(tot0, tot1, tot2, tot3, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr,
                                  N, stride_om, M, HAS_BIAS, SPLIT_K, GATED)


@triton.jit
def _tile_step(tot0, tot1, tot2, tot3, g0, g, g_end, x_ptr, x2_ptr, q_ptr, s_ptr, m_ptr, h_ptr, rows64, row_zero,
               stride_qn, stride_sn, stride_hn, stride_xm, num_groups, one, M: tl.constexpr, EVEN_K: tl.constexpr,
               ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, BF16_ASM: tl.constexpr, X8: tl.constexpr,
               DP4A: tl.constexpr, SIX_BIT: tl.constexpr, SUPER: tl.constexpr, PAIRED: tl.constexpr,
               STREAM: tl.constexpr):
    """One tile (groups gs = g0 + g of the program's rows) added to the accumulators."""
    gs = g0 + g
    g_mask = (gs < g_end)[None, :]
    if SIX_BIT:
        return gguf_gemv_x8_triton.six_bit_tile(
            tot0, tot1, tot2, tot3, q_ptr, h_ptr, s_ptr, rows64, stride_qn, stride_hn, stride_sn, gs, g_mask,
            one, x_ptr, x2_ptr, stride_xm, num_groups, M, EVEN_K, DP4A, STREAM, g0)
    # int8 x: lane-major tiles (`load_words4`), a thread's x loaded once for all its rows
    words0, words1, words2, words3, scale, low = q4_word_dot_triton.load_tile(
        q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, gs, g_mask, one, 1, EVEN_K, HAS_MIN, SUPER, PAIRED, STREAM,
        X8, g0)
    return _q4_tile(tot0, tot1, tot2, tot3, words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs,
                    g_mask, stride_xm, num_groups, one, M, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A)


@triton.jit
def _q4_tile(tot0, tot1, tot2, tot3, words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs,
             g_mask, stride_xm, num_groups, one, M: tl.constexpr, EVEN_K: tl.constexpr, ZERO_POINT: tl.constexpr,
             HAS_MIN: tl.constexpr, BF16_ASM: tl.constexpr, X8: tl.constexpr, DP4A: tl.constexpr):
    """The tile's products with each row of x, added to its accumulator [BLOCK_N, GROUPS]."""
    if X8:     # codes stay 0..15 (dp4a's unsigned operand): the zero point joins the min term
        low = low - ZERO_POINT * scale
    else:
        # codes are decoded as q − 8 whatever the type (small, signed: the bf16 products round
        # less and do not cancel against the min term); the rest of (q − zero_point)·scale + min
        # is a per-group constant times Σx: (min + (8 − zero_point)·scale)
        low = low + (8 - ZERO_POINT) * scale
    x_mask = g_mask if X8 else g_mask & (row_zero == 0)      # int8 x: [1, GROUPS], else the tile's shape
    tot0 += _q4_row(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs, x_mask, 0,
                    stride_xm, num_groups, one, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A)
    if M > 1:
        tot1 += _q4_row(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs, x_mask, 1,
                        stride_xm, num_groups, one, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A)
    if M > 2:
        tot2 += _q4_row(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs, x_mask, 2,
                        stride_xm, num_groups, one, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A)
    if M > 3:
        tot3 += _q4_row(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs, x_mask, 3,
                        stride_xm, num_groups, one, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM, X8, DP4A)
    return tot0, tot1, tot2, tot3


@triton.jit
def _row_rstd(sumsq_ptr, mi, num_groups, eps, NUM_PARTS: tl.constexpr, PARTS: tl.constexpr):
    """1 / sqrt(Σ s² / K + eps) of row mi, from its NUM_PARTS parts (`rms_norm_x8_triton`)."""
    parts = tl.arange(0, PARTS)
    sumsq = tl.load(sumsq_ptr + mi * NUM_PARTS + parts, mask=parts < NUM_PARTS, other=0.0)
    return tl.rsqrt(tl.sum(sumsq, axis=0) / (num_groups * 32).to(tl.float32) + eps)


@triton.jit
def _q4_row(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, row_zero, gs, x_mask, mi, stride_xm,
            num_groups, one, EVEN_K: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr,
            BF16_ASM: tl.constexpr, X8: tl.constexpr, DP4A: tl.constexpr):
    """Row mi of x against the tile: [BLOCK_N, GROUPS] fp32, scaled, with the min term."""
    if X8:
        return gguf_gemv_x8_triton.row_part(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, gs, x_mask, mi,
                                            stride_xm, num_groups, one, EVEN_K, DP4A)
    group_x = row_zero + gs[None, :] * 32           # [BN, G]: first element of each group
    return q4_word_dot_triton.row_part(words0, words1, words2, words3, scale, low, x_ptr, x2_ptr, group_x, x_mask,
                                       mi, stride_xm, EVEN_K, ZERO_POINT, HAS_MIN, BF16_ASM)


@functools.cache
def _bf16x2_arch(device: torch.device) -> int:
    """Which bf16x2 word products the device runs: 90 (sub/mul/fma.rn.bf16x2, sm_90 and later),
    80 (fma.rn.bf16x2 only, sm_80-sm_89), or 0 (none: the exact fp32 path)."""
    capability = torch.cuda.get_device_capability(device)
    return 90 if capability >= (9, 0) else 80 if capability >= (8, 0) else 0


@functools.cache
def _has_dp4a(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (6, 1)


def uses_x_int8(x: torch.Tensor) -> bool:
    return _has_dp4a(x.device) if X_INT8 is None else X_INT8


def takes_x8(packed: PackedGGUF, x: torch.Tensor | XInt8) -> bool:
    """Whether the GEMV multiplies `packed` with x rounded to int8: always at 6 bits (the only
    kernel that reads them), at 4 where x comes rounded or X_INT8 says so."""
    return packed.bits == 6 or (packed.bits == 4 and (isinstance(x, XInt8) or uses_x_int8(x)))


def _launch(xm: torch.Tensor | XInt8, packed: PackedGGUF, bias: torch.Tensor | None, om: torch.Tensor,
            partial: torch.Tensor, plan: GemvPlan, gated: bool) -> None:
    """One GEMV launch for up to ROWS_PER_LAUNCH rows xm (a tensor, or already rounded): into
    om, or (split K) into partial."""
    n = packed.shape[0]
    config = plan.config
    launch = dict(num_warps=config.num_warps, num_stages=1, **pdl.launch_options(xm.device))
    launch["PREFETCH"] = PREFETCH_WAVE > 0 and launch["PDL"]
    prefetch_programs = PREFETCH_WAVE * num_sms(xm.device) if launch["PREFETCH"] else 0
    qweight32 = packed.qweight.view(torch.int32)
    # gated: a program's BLOCK_N rows are BLOCK_N / 2 output columns' gate and up
    grid = (triton.cdiv(n // 2 if gated else n, config.block_n // 2 if gated else config.block_n), plan.split_k)
    six_bit = packed.bits == 6            # its scales go as int32 pairs, one 4-byte load a lane
    s_arg = packed.scales.view(torch.int32) if six_bit else packed.scales
    scales = (s_arg, packed.min_operand,
              bias if bias is not None else om, om, partial)
    shape = (n, plan.num_groups, plan.groups_per_split, 1)
    strides = (qweight32.stride(0), s_arg.stride(0), om.stride(0))
    high = packed.qhigh.view(torch.int64) if six_bit else qweight32     # 6-bit: a lane's 2 words of top bits
    flags = dict(HAS_MIN=packed.has_min, HAS_BIAS=bias is not None, M=xm.shape[0],
                 BLOCK_N=config.block_n, SPLIT_K=plan.split_k, EVEN_K=plan.even_k, GATED=gated)
    if plan.x_int8:
        flags["TILES"] = plan.unrolled_tiles(MAX_UNROLLED_TILES) if config.unroll else 0
        flags["STREAM"] = (STREAM_SIX_BIT if six_bit else STREAM_WEIGHTS) and om.is_cuda
        x8 = xm if isinstance(xm, XInt8) else gguf_gemv_x8_triton.quantize_x(xm)   # ~1.5 us at 1 row
        num_parts = 0 if x8.sumsq is None else x8.sumsq.shape[1]
        _q4_gemv_kernel[grid](x8.codes.view(torch.int32), x8.dx_sum.view(torch.int64), qweight32, *scales,
                              om if x8.sumsq is None else x8.sumsq, high, *shape, x8.codes.stride(0) // 4, *strides,
                              x8.eps, prefetch_programs, high.stride(0), ZERO_POINT=packed.zero_point,
                              GROUPS=plan.groups, BF16_ASM=0, X8=True, DP4A=om.is_cuda, NUM_PARTS=num_parts,
                              PARTS=triton.next_power_of_2(num_parts), SIX_BIT=six_bit,
                              SUPER=packed.super_scales is not None, PAIRED=packed.is_paired, **flags, **launch)
        return
    # the bf16 paths read x as 4-byte pairs: bf16 rows on an even stride, 4-aligned
    bf16_pairs = (xm.dtype == torch.bfloat16 and xm.is_cuda and xm.stride(0) % 2 == 0
                  and xm.data_ptr() % 4 == 0)
    if packed.bits == 4:
        bf16_asm = _bf16x2_arch(xm.device) if USE_BF16_ASM and bf16_pairs else 0
        _q4_gemv_kernel[grid](xm, xm.view(torch.int32) if bf16_asm else xm, qweight32, *scales, om, high, *shape,
                              xm.stride(0), *strides, 0.0, prefetch_programs, 0, ZERO_POINT=packed.zero_point,
                              GROUPS=plan.groups, BF16_ASM=bf16_asm, X8=False, DP4A=False, NUM_PARTS=0, PARTS=1,
                              SUPER=packed.super_scales is not None, PAIRED=packed.is_paired, **flags, **launch)
    else:
        gguf_gemv8_triton.q8_gemv_kernel[grid](
            xm, xm.view(torch.int32) if bf16_pairs else xm, qweight32, *scales, *shape, xm.stride(0), *strides,
            prefetch_programs, CHUNKS_PER_GROUP=packed.group_size // gguf_gemv8_triton.CHUNK, CHUNKS=plan.groups,
            BF16_ASM=bf16_pairs, STREAM=gguf_gemv8_triton.STREAM_WEIGHTS and om.is_cuda, **flags, **launch)


def _rows(x: torch.Tensor | XInt8, start: int, stop: int) -> torch.Tensor | XInt8:
    return x.rows(start, stop) if isinstance(x, XInt8) else x[start:stop]


def gguf_gemv(x: torch.Tensor | XInt8, packed: PackedGGUF, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None, out: torch.Tensor | None = None,
              gated: bool = False) -> torch.Tensor:
    """x: [M ≤ MAX_ROWS, K] (checked by the caller, `gguf_linear_triton.gguf_linear`), or x
    already rounded for a 4-bit matrix (`XInt8`, from `rms_norm_x8_triton`) → [M, N] in x's
    dtype, written into `out` when given (any [M, N] view whose last dim is contiguous).
    gated (packed = [gate | up], N rows): silu(gate) · up [M, N / 2] instead, in the GEMV's
    epilogue (a split-K plan runs unfused: the GEMV, then `silu_mul_triton`)."""
    num_rows = x.shape[0]
    n = packed.shape[0]
    is_rounded = isinstance(x, XInt8)
    if is_rounded and packed.bits not in (4, 6):
        raise ValueError(f"x: rounded to int8 for a 4- or 6-bit matrix, but {packed.qtype} is {packed.bits}-bit")
    plan = plan_gemv(num_rows, packed, x.device, config, takes_x8(packed, x))
    if gated and plan.split_k > 1:
        from replica.kernels.silu_mul_triton import silu_and_mul
        act = silu_and_mul(gguf_gemv(x, packed, bias, config))
        return act if out is None else out.copy_(act)
    n_out = n // 2 if gated else n
    if out is None:
        out = torch.empty(num_rows, n_out, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    for m0 in range(0, num_rows, ROWS_PER_LAUNCH):
        xm = _rows(x, m0, m0 + ROWS_PER_LAUNCH)
        om = out[m0:m0 + xm.shape[0]]
        partial = (torch.empty(plan.split_k, xm.shape[0], n, dtype=torch.float32, device=x.device)
                   if plan.split_k > 1 else om)
        _launch(xm, packed, bias, om, partial, plan, gated)
        if plan.split_k > 1:
            block = 1024
            linear_triton._split_k_sum_kernel[(xm.shape[0], triton.cdiv(n, block))](
                partial, bias if bias is not None else om, om, xm.shape[0], n, om.stride(0),
                HAS_BIAS=bias is not None, SPLIT_K=plan.split_k, BLOCK=block, num_warps=4,
                **pdl.launch_options(x.device))
    return out


def gguf_gemv_add_rms_norm(x: torch.Tensor | XInt8, packed: PackedGGUF, residual: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float,
                           to_x8: bool = False) -> tuple[torch.Tensor | XInt8, torch.Tensor] | None:
    """x: [M ≤ ROWS_PER_LAUNCH, K] → (rms_norm(x @ W^T + residual), x @ W^T + residual), the
    GEMV's split-K partials summed by the norm kernel itself (`rms_norm_triton`, or with to_x8
    `rms_norm_x8_triton`, whose norm comes rounded for a 4-bit GEMV on int8 x): one kernel less
    than GEMV, sum, add + norm. None where the plan does not split K (nothing to fuse)."""
    num_rows = x.shape[0]
    plan = plan_gemv(num_rows, packed, x.device, None, takes_x8(packed, x))
    if plan.split_k == 1 or num_rows > ROWS_PER_LAUNCH or num_rows == 0:
        return None
    from replica.kernels.rms_norm_triton import split_k_sum_add_rms_norm
    partial = torch.empty(plan.split_k, num_rows, packed.shape[0], dtype=torch.float32, device=x.device)
    _launch(x, packed, None, partial[0], partial, plan, gated=False)   # om: only its stride is read
    if to_x8:
        from replica.kernels.rms_norm_x8_triton import add_rms_norm_x8
        return add_rms_norm_x8(None, residual, norm_weight, eps, partial=partial)
    return split_k_sum_add_rms_norm(partial, residual, norm_weight, eps)
