"""Triton, the 8-bit decode GEMV of GGUF weights kept packed (`replica/quantization/gguf_packed.py`:
Q8_0's codes, and the 5-bit types' and, with SIX_BIT_Q6_K off, Q6_K's widened to bytes), for 1..4 rows of x a launch
(`gguf_gemv_triton.gguf_gemv` picks it and splits larger batches).

A byte a weight halves the arithmetic a byte that the 4-bit kernel needs, but a plain tile
([rows, groups, 32] int8 against x in its own layout) still spent ~8 instructions an element
and reached 3.2 TB/s where bf16 streams 4.4 (bench/NOTES.md, "Q6_K, the output head, and an
8-bit GEMV"). So the 4-bit kernel's shape:

    lane   16 codes of one row (one 16-byte load: 4 words, split in registers); the scale of
           its group (Q6_K: the chunk is the group; Q8_0: two chunks share one) one 2-byte load
    x      the chunk's 16 values as 8 bf16 pairs (two 16-byte loads, int32), pointers built in the
           codes' shape with row stride 0, so no conversion through shared memory
    word   bf16 x on CUDA: inline PTX, per element one PRMT (the byte, XOR-ed to code + 128, into
           the mantissa of 2^23), one FADD (− 2^23 − 128: the signed code, exact), x's half of its
           pair as fp32 (one shift or AND), one fp32 FMA: ~4 instructions, products exact
           other x (fp16, fp32, Triton's interpreter): the same arithmetic in Triton ops

    Σ_i w_i x_i = scale · Σ_i q_i x_i (+ min · Σ_i x_i for Q5_1 and Q5_K)     (per group)
"""
import triton
import triton.language as tl

from replica.kernels import linear_triton, pdl, q4_word_dot_triton

CHUNK = 16            # codes a lane loads at once (16 bytes)
# the codes' loads evicted first from L1 and L2 (`q4_word_dot_triton.load_words4`'s STREAM): not yet
# measured on a GPU (the 4-bit kernel's gained 1.2%: bench/NOTES.md, "Weights evicted first")
STREAM_WEIGHTS = False

# One word of 4 signed 8-bit codes times 2 bf16 pairs of x → the fp32 sum of the 4 products.
_Q8_WORD_DOT_ASM = """{
.reg .b32 w, f0, f1, f2, f3, x0, x1, x2, x3;
.reg .f32 acc;
xor.b32 w, $1, 0x80808080;
prmt.b32 f0, w, 0x4B000000, 0x7540;
prmt.b32 f1, w, 0x4B000000, 0x7541;
prmt.b32 f2, w, 0x4B000000, 0x7542;
prmt.b32 f3, w, 0x4B000000, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
shl.b32 x0, $2, 16;
and.b32 x1, $2, 0xFFFF0000;
shl.b32 x2, $3, 16;
and.b32 x3, $3, 0xFFFF0000;
mul.f32 acc, f0, x0;
fma.rn.f32 acc, f1, x1, acc;
fma.rn.f32 acc, f2, x2, acc;
fma.rn.f32 $0, f3, x3, acc;
}"""
_Q8_WORD_DOT: tl.constexpr = tl.constexpr(_Q8_WORD_DOT_ASM)


@triton.jit
def _q8_word_dot_bf16(words, x01, x23):
    return tl.inline_asm_elementwise(_Q8_WORD_DOT, "=f,r,r,r", [words, x01, x23],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _q8_word_dot_fp32(words, x):
    """words [BN, C] (4 codes, byte i = element i), x [BN, C, 4] fp32 → Σ of the 4 products."""
    e = tl.arange(0, 4)
    magic = tl.full([1, 1, 1], 0x4B000000, tl.uint32)             # 2^23 as fp32
    biased = ((words.to(tl.uint32, bitcast=True)[:, :, None] >> (8 * e)[None, None, :]) & 0xFF) ^ 0x80
    codes = (biased | magic).to(tl.float32, bitcast=True) - 8388736.0      # 2^23 + 128
    return tl.sum(codes * x, axis=2)


@triton.jit
def _q8_row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, chunk_x, x_mask, mi,
                 stride_xm, EVEN_K: tl.constexpr, HAS_MIN: tl.constexpr, BF16_ASM: tl.constexpr):
    """Row mi of x against the tile: [BLOCK_N, CHUNKS], scaled (+ min · Σx). chunk_x: each
    chunk's first column."""
    x_sum = 0.0
    if BF16_ASM:
        k4 = tl.arange(0, 4)
        px = x32_ptr + mi * (stride_xm // 2) + (chunk_x // 2)[:, :, None] + k4[None, None, :]
        if EVEN_K:
            lo, hi = tl.load(px), tl.load(px + 4)
        else:
            lo = tl.load(px, mask=x_mask[:, :, None], other=0)
            hi = tl.load(px + 4, mask=x_mask[:, :, None], other=0)
        if HAS_MIN:                                     # bf16 → fp32 is a shift of its bits
            x_sum = tl.sum(((lo << 16).to(tl.float32, bitcast=True) + (lo & -65536).to(tl.float32, bitcast=True))
                           + ((hi << 16).to(tl.float32, bitcast=True) + (hi & -65536).to(tl.float32, bitcast=True)),
                           axis=2)
        p0, p1, p2, p3 = q4_word_dot_triton.split4(lo)
        p4, p5, p6, p7 = q4_word_dot_triton.split4(hi)
        dots = ((_q8_word_dot_bf16(words0, p0, p1) + _q8_word_dot_bf16(words1, p2, p3))
                + (_q8_word_dot_bf16(words2, p4, p5) + _q8_word_dot_bf16(words3, p6, p7)))
    else:
        e = tl.arange(0, 4)[None, None, :]
        base = x_ptr + mi * stride_xm + chunk_x[:, :, None] + e
        m3 = x_mask[:, :, None]
        x0 = tl.load(base, mask=m3, other=0.0).to(tl.float32)
        x1 = tl.load(base + 4, mask=m3, other=0.0).to(tl.float32)
        x2 = tl.load(base + 8, mask=m3, other=0.0).to(tl.float32)
        x3 = tl.load(base + 12, mask=m3, other=0.0).to(tl.float32)
        dots = ((_q8_word_dot_fp32(words0, x0) + _q8_word_dot_fp32(words1, x1))
                + (_q8_word_dot_fp32(words2, x2) + _q8_word_dot_fp32(words3, x3)))
        if HAS_MIN:
            x_sum = tl.sum((x0 + x1) + (x2 + x3), axis=2)
    if HAS_MIN:
        return scale * dots + low * x_sum
    return scale * dots


@triton.jit
def _q8_tile(tot0, tot1, tot2, tot3, words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, row_zero, cs,
             c_mask, stride_xm, M: tl.constexpr, EVEN_K: tl.constexpr, HAS_MIN: tl.constexpr, BF16_ASM: tl.constexpr):
    """The tile's products with each row of x, added to its accumulator [BLOCK_N, CHUNKS]."""
    x_mask = c_mask & (row_zero == 0)
    chunk_x = row_zero + cs[None, :] * 16
    tot0 += _q8_row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, chunk_x, x_mask, 0,
                         stride_xm, EVEN_K, HAS_MIN, BF16_ASM)
    if M > 1:
        tot1 += _q8_row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, chunk_x, x_mask, 1,
                             stride_xm, EVEN_K, HAS_MIN, BF16_ASM)
    if M > 2:
        tot2 += _q8_row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, chunk_x, x_mask, 2,
                             stride_xm, EVEN_K, HAS_MIN, BF16_ASM)
    if M > 3:
        tot3 += _q8_row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, chunk_x, x_mask, 3,
                             stride_xm, EVEN_K, HAS_MIN, BF16_ASM)
    return tot0, tot1, tot2, tot3


@triton.jit(do_not_specialize=["one"])
def q8_gemv_kernel(
    x_ptr, x32_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, partial_ptr,
    N, num_chunks, chunks_per_split, one, stride_xm, stride_qn, stride_sn, stride_om, prefetch_programs,
    CHUNKS_PER_GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BF16_ASM: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr,          # PDL: programs below prefetch_programs (launch order) prefetch
    STREAM: tl.constexpr = False,    # the codes' loads evicted first (`q4_word_dot_triton.load_words4`)
):
    # q_ptr: the codes as int32 words (4 a word); stride_qn in words
    rows, n_mask, rows64, row_zero, c, c_start, c_end = q4_word_dot_triton.packed_gemv_lanes(
        N, chunks_per_split, num_chunks, BLOCK_N, CHUNKS, GATED)
    if PREFETCH:
        if tl.program_id(0) + tl.program_id(1) * tl.num_programs(0) < prefetch_programs:   # the first wave
            q4_word_dot_triton.prefetch_packed(q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, c_start, c_end,
                                               CHUNKS, CHUNKS_PER_GROUP, HAS_MIN)
    pdl.wait_and_release(PDL)
    pid_k = tl.program_id(1)
    tot0 = tl.zeros([BLOCK_N, CHUNKS], dtype=tl.float32)
    tot1 = tl.zeros([BLOCK_N, CHUNKS], dtype=tl.float32)
    tot2 = tl.zeros([BLOCK_N, CHUNKS], dtype=tl.float32)
    tot3 = tl.zeros([BLOCK_N, CHUNKS], dtype=tl.float32)
    for c0 in range(c_start, c_end, CHUNKS):
        cs = c0 + c                                     # [CHUNKS] chunk indices
        c_mask = (cs < c_end)[None, :]
        words0, words1, words2, words3, scale, low = q4_word_dot_triton.load_tile(
            q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, cs, c_mask, one, CHUNKS_PER_GROUP, EVEN_K, HAS_MIN,
            STREAM=STREAM)
        tot0, tot1, tot2, tot3 = _q8_tile(tot0, tot1, tot2, tot3, words0, words1, words2, words3, scale, low, x_ptr,
                                          x32_ptr, row_zero, cs, c_mask, stride_xm, M, EVEN_K, HAS_MIN, BF16_ASM)

    linear_triton.gemv_store_rows(tot0, tot1, tot2, tot3, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr,
                                  N, stride_om, M, HAS_BIAS, SPLIT_K, GATED)
