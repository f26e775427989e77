"""Triton: the int8 side of the 4- and 6-bit decode GEMV: x rounded to 8 bits, and the integer
dot products (`dp4a`) of `gguf_gemv_triton._q4_gemv_kernel` with X8 set (6-bit: `six_bit_tile`
below, which the 6-bit layout always takes).

The bf16 GEMV (`gguf_gemv_triton._q4_gemv_kernel`) turns every code into a bf16 and multiplies
two elements an instruction: ~3 instructions an element, which at one row of x bounds it
below the H200's bandwidth (bench/NOTES.md, "The 4-bit GEMV"). Here, as llama.cpp's CUDA path
does, x is first rounded to int8 per 32-element group (one fp32 scale dx each, `quantize_x`),
and then one `dp4a` multiplies 4 codes by 4 bytes of x and adds them, exact in int32:

    word (8 codes, gguf_packed's pair order)       x8 (the same 8 elements, bytes reordered)
    lo = word & 0x0F0F0F0F  → codes of elements 0 4 1 5   ·  int32 A = x0 x4 x1 x5  (dp4a)
    hi = (word >> 4) & 0x0F0F0F0F → elements    2 6 3 7   ·  int32 B = x2 x6 x3 x7  (dp4a)

so a word costs 5 instructions (AND, SHR, AND, 2 dp4a) for 8 elements, and x is 32 bytes a group
instead of bf16's 64. Per group, with the codes q in 0..15 as stored:

    Σ_i w_i x_i ≈ scale · dx · Σ_i q_i x8_i + (min − zero_point · scale) · xsum,   xsum = dx · Σ_i x8_i

i.e. exactly W times x rounded (x̂ = dx · x8): the only error is x's rounding, ≤ dx / 2 an element,
the same for every type (Q4_K's min term uses the same x̂, so it cancels as it should).

The GEMV keeps the bf16 kernel's lanes, split-K and gated epilogue, with this module's
`row_part` for the products. Its tiles are lane-major (`q4_word_dot_triton.load_words4` with
LANE_MAJOR): a thread holds one group of every row of its tile and loads that group's x once
(row-major tiles loaded it once a row: W2 Q4_0 609 → 637 tok/s, bench/NOTES.md "x loaded once a
thread"). Its default tiles differ: programs of one warp, one lane a thread,
each taking a 4,096-column row whole with its tiles unrolled (`gguf_gemv_plan.choose_gemv_config`;
W2 Q4_0 469 tok/s against 427 with 4 warps over 4 rows x 64 groups, then 597 against 565 with
the tiles unrolled). x is rounded by `quantize_x` (~1.5 us at one row) only before
down_proj: the RMSNorm before qkv and gate_up writes it rounded in several programs a row
(`rms_norm_x8_triton`; a one-program norm doing so was slower, commit 06edf0b), and decode
attention's reduce writes o_proj's (`paged_decode_triton`): W2 Q4_0 481 against 470 tok/s.
On the CPU (Triton's interpreter) dp4a is emulated with shifts and masks, bit for bit the same.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl, q4_word_dot_triton
from replica.kernels.gguf_linear import GROUP, XInt8

_GROUP: tl.constexpr = tl.constexpr(GROUP)      # the kernels' copy (Triton reads constexpr globals only)

# 4 words (32 codes) of one group against its 8 int32 of x8 → the int32 Σ q·x8, exact.
_DOT_GROUP_ASM = """{
.reg .b32 lo, hi, acc;
and.b32 lo, $1, 0x0F0F0F0F;
shr.u32 hi, $1, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 acc, lo, $5, 0;
dp4a.u32.s32 acc, hi, $6, acc;
and.b32 lo, $2, 0x0F0F0F0F;
shr.u32 hi, $2, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 acc, lo, $7, acc;
dp4a.u32.s32 acc, hi, $8, acc;
and.b32 lo, $3, 0x0F0F0F0F;
shr.u32 hi, $3, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 acc, lo, $9, acc;
dp4a.u32.s32 acc, hi, $10, acc;
and.b32 lo, $4, 0x0F0F0F0F;
shr.u32 hi, $4, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 acc, lo, $11, acc;
dp4a.u32.s32 $0, hi, $12, acc;
}"""
_DOT_GROUP: tl.constexpr = tl.constexpr(_DOT_GROUP_ASM)


@triton.jit
def round_groups(x, codes_ptr, ds_ptr, g_offs, g_mask):
    """x: [G, 32] fp32, groups of one row → its codes (int8, dp4a byte order) at codes_ptr +
    32 g_offs, and (dx, xsum) at ds_ptr + 2 g_offs."""
    e = tl.arange(0, _GROUP)
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    v = x * inv[:, None]
    q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))        # half away from zero
    # element e of each 8-element word goes to byte 2 (e % 4) + (e % 8) // 4 of its 8 (the
    # order the words' nibble pairs meet in dp4a: 0 4 1 5 2 6 3 7)
    pos = (e // 8) * 8 + 2 * (e % 4) + (e % 8) // 4
    tl.store(codes_ptr + g_offs[:, None] * _GROUP + pos[None, :], q.to(tl.int8), mask=g_mask[:, None])
    dx = amax * (1.0 / 127.0)
    tl.store(ds_ptr + 2 * g_offs, dx, mask=g_mask)
    tl.store(ds_ptr + 2 * g_offs + 1, dx * tl.sum(q, axis=1), mask=g_mask)


@triton.jit
def _quantize_x_kernel(x_ptr, q_ptr, ds_ptr, num_groups, stride_xm, stride_qm,
                       GROUPS: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    m = tl.program_id(0)
    gs = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    g_mask = gs < num_groups
    e = tl.arange(0, _GROUP)
    offs = gs[:, None] * _GROUP + e[None, :]
    x = tl.load(x_ptr + m * stride_xm + offs, mask=g_mask[:, None], other=0.0).to(tl.float32)
    round_groups(x, q_ptr + m * stride_qm, ds_ptr + 2 * m * num_groups, gs, g_mask)


def quantize_x(x: torch.Tensor) -> XInt8:
    """x: [M, K] float, K a multiple of 32, last dim contiguous → its `XInt8`."""
    num_rows, k = x.shape
    num_groups = k // GROUP
    out = XInt8.empty(num_rows, k, x.dtype, x.device)
    groups = 16
    _quantize_x_kernel[(num_rows, triton.cdiv(num_groups, groups))](
        x, out.codes, out.dx_sum, num_groups, x.stride(0), out.codes.stride(0), GROUPS=groups, num_warps=4,
        **pdl.launch_options(x.device))
    return out


@triton.jit
def _word_dot_emulated(word, a, b):
    """dp4a's arithmetic in plain integer ops (the interpreter): Σ_j lo_j · a_j + hi_j · b_j over
    the word's 4 bytes j, a and b's bytes signed."""
    shift = (8 * tl.arange(0, 4))[None, None, :]     # byte j on a new last axis: few interpreter ops
    lo = (word[:, :, None] >> shift) & 0xF
    hi = (word[:, :, None] >> (shift + 4)) & 0xF
    a_j = (a[:, :, None] << (24 - shift)) >> 24      # arithmetic shift: byte j, sign-extended
    b_j = (b[:, :, None] << (24 - shift)) >> 24
    return tl.sum(lo * a_j + hi * b_j, axis=2)


@triton.jit
def _load_x8_lane(xq_ptr, ds_ptr, gs, x_mask, mi, stride_xq, num_groups, one, EVEN_K: tl.constexpr):
    """Row mi of x8 at the tile's groups, [1, LANES] each: group g is int32 words 8g .. 8g + 7 of its
    row, two 16-byte loads split into the 8 words (A, B per weight word), and its (dx, xsum) as one
    int64 (ds_ptr: int64), its group index through `one` as the scales'. Loaded once a thread: with
    the lane-major tiles (`q4_word_dot_triton.load_words4`) a thread holds one lane of every row."""
    k4 = tl.arange(0, 4)
    px = xq_ptr + mi * stride_xq + (gs * 8)[None, :, None] + k4[None, None, :]      # [1, LANES, 4]
    x_offs = mi * num_groups + (gs * one)[None, :]
    if EVEN_K:
        xa = tl.load(px)
        xb = tl.load(px + 4)
        ds = tl.load(ds_ptr + x_offs)
    else:
        xa = tl.load(px, mask=x_mask[:, :, None], other=0)
        xb = tl.load(px + 4, mask=x_mask[:, :, None], other=0)
        ds = tl.load(ds_ptr + x_offs, mask=x_mask, other=0)
    a0, b0, a1, b1 = q4_word_dot_triton.split4(xa)
    a2, b2, a3, b3 = q4_word_dot_triton.split4(xb)
    return a0, b0, a1, b1, a2, b2, a3, b3, ds


@triton.jit
def row_part(w0, w1, w2, w3, scale, low, xq_ptr, ds_ptr, gs, x_mask, mi, stride_xq, num_groups, one,
             EVEN_K: tl.constexpr, DP4A: tl.constexpr):
    """Row mi of x8 against the tile's groups → [BLOCK_N, GROUPS] fp32 (x_mask: [1, GROUPS])."""
    a0, b0, a1, b1, a2, b2, a3, b3, ds = _load_x8_lane(xq_ptr, ds_ptr, gs, x_mask, mi, stride_xq, num_groups, one,
                                                        EVEN_K)
    dx = ds.to(tl.int32).to(tl.float32, bitcast=True)               # low half: dx
    xsum = (ds >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    if DP4A:
        dot = tl.inline_asm_elementwise(_DOT_GROUP, "=r,r,r,r,r,r,r,r,r,r,r,r,r",
                                        [w0, w1, w2, w3, a0, b0, a1, b1, a2, b2, a3, b3],
                                        dtype=tl.int32, is_pure=True, pack=1)
    else:
        dot = (_word_dot_emulated(w0, a0, b0) + _word_dot_emulated(w1, a1, b1)
               + _word_dot_emulated(w2, a2, b2) + _word_dot_emulated(w3, a3, b3))
    return scale * (dx * dot.to(tl.float32)) + low * xsum


# 6-bit (Q6_K, `gguf_packed`'s 6-bit layout): half a lane (16 elements, one Q6_K scale) → the
# int32 Σ (u − 32)·x8 over it. $1, $2: the half's two 4-bit words; $3: its word of top bits;
# $4..$7: x8's A, B words of each. A shift and a mask put the top bits at bits 4-5 of each byte
# beside the low nibbles (ptxas makes each AND-OR one LOP3); the zero point 32 comes off through
# Σ x8, itself four dp4a against 0x01010101.
_DOT_SIX_HALF_ASM = """{
.reg .b32 u, t, acc, xs, ones;
mov.b32 ones, 0x01010101;
and.b32 u, $1, 0x0F0F0F0F;
shl.b32 t, $3, 4;
and.b32 t, t, 0x30303030;
or.b32 u, u, t;
dp4a.u32.s32 acc, u, $4, 0;
shr.u32 u, $1, 4;
and.b32 u, u, 0x0F0F0F0F;
shl.b32 t, $3, 2;
and.b32 t, t, 0x30303030;
or.b32 u, u, t;
dp4a.u32.s32 acc, u, $5, acc;
and.b32 u, $2, 0x0F0F0F0F;
and.b32 t, $3, 0x30303030;
or.b32 u, u, t;
dp4a.u32.s32 acc, u, $6, acc;
shr.u32 u, $2, 4;
and.b32 u, u, 0x0F0F0F0F;
shr.u32 t, $3, 2;
and.b32 t, t, 0x30303030;
or.b32 u, u, t;
dp4a.u32.s32 acc, u, $7, acc;
dp4a.s32.s32 xs, ones, $4, 0;
dp4a.s32.s32 xs, ones, $5, xs;
dp4a.s32.s32 xs, ones, $6, xs;
dp4a.s32.s32 xs, ones, $7, xs;
shl.b32 xs, xs, 5;
sub.s32 $0, acc, xs;
}"""
_DOT_SIX_HALF: tl.constexpr = tl.constexpr(_DOT_SIX_HALF_ASM)


@triton.jit
def _six_half_emulated(w_first, w_second, high, a_first, b_first, a_second, b_second):
    """The PTX above in plain integer ops (the interpreter), bit for bit."""
    shift = (8 * tl.arange(0, 4))[None, None, :]     # byte j on a new last axis
    a1 = (a_first[:, :, None] << (24 - shift)) >> 24  # byte j, sign-extended
    b1 = (b_first[:, :, None] << (24 - shift)) >> 24
    a2 = (a_second[:, :, None] << (24 - shift)) >> 24
    b2 = (b_second[:, :, None] << (24 - shift)) >> 24
    w1, w2, top = w_first[:, :, None] >> shift, w_second[:, :, None] >> shift, high[:, :, None] >> shift
    dot = ((((w1 & 0xF) | ((top & 0x3) << 4)) - 32) * a1 + ((((w1 >> 4) & 0xF) | (top & 0xC) << 2) - 32) * b1
           + (((w2 & 0xF) | (top & 0x30)) - 32) * a2 + ((((w2 >> 4) & 0xF) | ((top >> 2) & 0x30)) - 32) * b2)
    return tl.sum(dot, axis=2)


@triton.jit
def _half_scales(pair):
    """An int32 of two fp16 scales (the lane's halves) → both as fp32."""
    lo = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _six_bit_row(w0, w1, w2, w3, high0, high1, scale_a, scale_b, xq_ptr, ds_ptr, gs, x_mask, mi,
                 stride_xq, num_groups, one, EVEN_K: tl.constexpr, DP4A: tl.constexpr):
    """Row mi of x8 against the tile's 6-bit lanes → [BLOCK_N, GROUPS] fp32."""
    a0, b0, a1, b1, a2, b2, a3, b3, ds = _load_x8_lane(xq_ptr, ds_ptr, gs, x_mask, mi, stride_xq, num_groups, one,
                                                        EVEN_K)
    dx = ds.to(tl.int32).to(tl.float32, bitcast=True)
    if DP4A:
        dot_a = tl.inline_asm_elementwise(_DOT_SIX_HALF, "=r,r,r,r,r,r,r,r", [w0, w1, high0, a0, b0, a1, b1],
                                          dtype=tl.int32, is_pure=True, pack=1)
        dot_b = tl.inline_asm_elementwise(_DOT_SIX_HALF, "=r,r,r,r,r,r,r,r", [w2, w3, high1, a2, b2, a3, b3],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        dot_a = _six_half_emulated(w0, w1, high0, a0, b0, a1, b1)
        dot_b = _six_half_emulated(w2, w3, high1, a2, b2, a3, b3)
    return dx * (scale_a * dot_a.to(tl.float32) + scale_b * dot_b.to(tl.float32))


@triton.jit
def six_bit_tile(tot0, tot1, tot2, tot3, q_ptr, h_ptr, s_ptr, rows64, stride_qn, stride_hn, stride_sn, gs, g_mask,
                 one, xq_ptr, ds_ptr, stride_xq, num_groups, M: tl.constexpr, EVEN_K: tl.constexpr,
                 DP4A: tl.constexpr, STREAM: tl.constexpr, g0):
    """A 6-bit GEMV tile (lanes gs = g0 + tl.arange): each lane's 4 words of low nibbles (one 16-byte
    load), its 2 words of top bits (one 8-byte load, h_ptr int64 [N, K/32]) and its two scales (one
    4-byte load, s_ptr the fp16 scales seen as int32 [N, K/32]), times each row of x8, added to the
    accumulators. Lane-major, as `q4_word_dot_triton.load_tile` with LANE_MAJOR: the codes as a
    contiguous run along the lanes, the top bits and scales contiguous but unaligned (`one - 1`)."""
    w0, w1, w2, w3 = q4_word_dot_triton.load_words4(q_ptr, rows64, stride_qn, gs, g_mask, EVEN_K, STREAM, True, g0)
    offs = rows64[:, None] * stride_sn + (gs + (one - 1))[None, :]
    h_offs = rows64[:, None] * stride_hn + (gs + (one - 1))[None, :]
    if EVEN_K:
        high = tl.load(h_ptr + h_offs)
        pair = tl.load(s_ptr + offs)
    else:
        high = tl.load(h_ptr + h_offs, mask=g_mask, other=0)
        pair = tl.load(s_ptr + offs, mask=g_mask, other=0)
    high0 = high.to(tl.int32)                  # the low word (truncation keeps its bits)
    high1 = (high >> 32).to(tl.int32)
    scale_a, scale_b = _half_scales(pair)
    tot0 += _six_bit_row(w0, w1, w2, w3, high0, high1, scale_a, scale_b, xq_ptr, ds_ptr, gs, g_mask, 0,
                         stride_xq, num_groups, one, EVEN_K, DP4A)
    if M > 1:
        tot1 += _six_bit_row(w0, w1, w2, w3, high0, high1, scale_a, scale_b, xq_ptr, ds_ptr, gs, g_mask, 1,
                             stride_xq, num_groups, one, EVEN_K, DP4A)
    if M > 2:
        tot2 += _six_bit_row(w0, w1, w2, w3, high0, high1, scale_a, scale_b, xq_ptr, ds_ptr, gs, g_mask, 2,
                             stride_xq, num_groups, one, EVEN_K, DP4A)
    if M > 3:
        tot3 += _six_bit_row(w0, w1, w2, w3, high0, high1, scale_a, scale_b, xq_ptr, ds_ptr, gs, g_mask, 3,
                             stride_xq, num_groups, one, EVEN_K, DP4A)
    return tot0, tot1, tot2, tot3


@triton.jit
def prefetch_high(h_ptr, rows64, stride_hn, start, end, LANES: tl.constexpr):
    """The 6-bit lanes' top bits (h_ptr int64, a lane's two words) of [start, end), into L2 (as
    `prefetch_packed` does the rest)."""
    lane = tl.arange(0, LANES)
    for l0 in range(start, end, LANES):
        lanes = tl.minimum(l0 + lane, end - 1)
        pdl.prefetch_l2(h_ptr + rows64[:, None] * stride_hn + lanes[None, :])
