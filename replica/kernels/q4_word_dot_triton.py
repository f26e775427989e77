"""Triton helpers of the 4-bit GEMV (`gguf_gemv_triton._q4_gemv_kernel`): one 32-bit word of
packed codes (8 elements in `replica/quantization/gguf_packed.py`'s pair order) times the 8 matching
values of x, summed. Two ways: bf16x2 inline PTX for bf16 x on sm_80 and later (two elements an
instruction; one version for sm_90, one for sm_80-89), and exact fp32 products for any other x and Triton's interpreter. The tests compare
the GEMV built on them with the torch reference (tests/kernels/test_quant_gguf.py).
"""
import triton
import triton.language as tl

from replica.kernels import linear_triton, pdl


# One 32-bit word of packed codes (8 elements, the packed layout's pair order) times 4 pairs of
# bf16 x → the fp32 sum of the 8 products. Each LOP3 turns 2 nibbles into the bf16 pair
# (128 + q_lo, 128 + q_hi) by OR-ing them into the mantissa of 128.0 (7 bits: exact); one SUB
# of 136 leaves q − 8 exactly; products and their sum are bf16x2 MUL/FMAs (2 elements an
# instruction), rounded once more to fp32 per word. sub.rn/mul.rn.bf16x2 are sm_90 PTX.
_Q4_WORD_DOT_SM90_ASM = """{
.reg .b32 m, k, t, c0, c1, c2, c3, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x000F000F;
mov.b32 k, 0x43004300;
lop3.b32 c0, $1, m, k, 0xEA;
shr.u32 t, $1, 4;
lop3.b32 c1, t, m, k, 0xEA;
shr.u32 t, $1, 8;
lop3.b32 c2, t, m, k, 0xEA;
shr.u32 t, $1, 12;
lop3.b32 c3, t, m, k, 0xEA;
mov.b32 k, 0x43084308;
sub.rn.bf16x2 c0, c0, k;
sub.rn.bf16x2 c1, c1, k;
sub.rn.bf16x2 c2, c2, k;
sub.rn.bf16x2 c3, c3, k;
mul.rn.bf16x2 acc, c0, $2;
fma.rn.bf16x2 acc, c1, $3, acc;
fma.rn.bf16x2 acc, c2, $4, acc;
fma.rn.bf16x2 acc, c3, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.bf16 flo, lo;
cvt.f32.bf16 fhi, hi;
add.f32 $0, flo, fhi;
}"""
# The same for sm_80-sm_89, whose PTX has fma.rn.bf16x2 only: c·1 − 136 and x·c + 0. Same bits;
# on an H200 25 % slower at down_proj (15.9 against 12.2 us), so sm_90 takes the version above.
_Q4_WORD_DOT_SM80_ASM = (_Q4_WORD_DOT_SM90_ASM
                         .replace("mov.b32 k, 0x43084308;\n",
                                  "mov.b32 one, 0x3F803F80;\nmov.b32 k, 0xC308C308;\n")
                         .replace("mul.rn.bf16x2 acc, c0, $2;", "mov.b32 k, 0;\nfma.rn.bf16x2 acc, c0, $2, k;")
                         .replace(".reg .b32 m, k, t,", ".reg .b32 m, k, one, t,"))
for _c in ("c0", "c1", "c2", "c3"):
    _Q4_WORD_DOT_SM80_ASM = _Q4_WORD_DOT_SM80_ASM.replace(f"sub.rn.bf16x2 {_c}, {_c}, k;",
                                                          f"fma.rn.bf16x2 {_c}, {_c}, one, k;")
_Q4_WORD_DOT_SM90: tl.constexpr = tl.constexpr(_Q4_WORD_DOT_SM90_ASM)
_Q4_WORD_DOT_SM80: tl.constexpr = tl.constexpr(_Q4_WORD_DOT_SM80_ASM)


@triton.jit
def q4_word_dot_bf16(words, x01, x23, x45, x67, ARCH: tl.constexpr):
    """ARCH: 90 (sm_90 and later) or 80 (sm_80-sm_89)."""
    if ARCH >= 90:
        return tl.inline_asm_elementwise(_Q4_WORD_DOT_SM90, "=f,r,r,r,r,r", [words, x01, x23, x45, x67],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_Q4_WORD_DOT_SM80, "=f,r,r,r,r,r", [words, x01, x23, x45, x67],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def q4_word_dot_fp32(words, x):
    """The exact path (any x dtype, and Triton's interpreter): words [BN, G], x [BN, G, 8] fp32
    → each word's 8 products summed in fp32, every product exact. Element e of a word is nibble
    n(e) = e // 2 + 4 (e % 2); its code becomes the float 2^23 + q·2^P by OR-ing the word (or
    word >> 20, for the nibbles at bits 20-31, so that the code stays below the float's
    exponent bits) masked to the nibble into 2^23's mantissa; one FADD of 2^23 + 8·2^P leaves
    (q − 8)·2^P, and x is scaled by 2^−P (exact). The element axis lives in one
    thread's registers, so these per-element constants fold into immediates."""
    e = tl.arange(0, 8)
    nibble = e // 2 + 4 * (e % 2)
    is_hi = (nibble >= 5)[None, None, :]
    shift = tl.where(nibble >= 5, 4 * nibble - 20, 4 * nibble)
    nibble_mask = (0xF << shift)[None, None, :]
    code_bias = (8388608.0 + 8 * (1 << shift).to(tl.float32))[None, None, :]
    x_scale = (1.0 / (1 << shift).to(tl.float32))[None, None, :]
    words = words.to(tl.uint32, bitcast=True)[:, :, None]                    # [BN, G, 1]
    src = tl.where(is_hi, words >> 20, words)
    magic = tl.full([1, 1, 1], 0x4B000000, tl.uint32)         # 2^23 as fp32
    codes = ((src & nibble_mask) | magic).to(tl.float32, bitcast=True) - code_bias
    return tl.sum(codes * (x * x_scale), axis=2)


@triton.jit
def packed_gemv_lanes(N, per_split, total, BLOCK_N: tl.constexpr, LANES: tl.constexpr, GATED: tl.constexpr):
    """The tile of a packed GEMV program: BLOCK_N rows of W, LANES lanes along K (a 16-byte run
    of a row each), and this split's range [start, end) of lanes. row_zero: zeros [BLOCK_N, 1],
    added to x's offsets so that x's loads take the weights' layout.
    GATED (W = [gate | up], N rows): the program's rows alternate gate j, up j, gate j + 1, ...
    for BLOCK_N / 2 output columns j (`linear_triton.gemv_store_row` multiplies the pairs)."""
    if GATED:
        r = tl.arange(0, BLOCK_N)
        cols = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        rows = cols + (r % 2) * (N // 2)
        n_mask = cols < N // 2
        rows64 = tl.where(n_mask, rows, 0).to(tl.int64)       # loads need no mask: a valid row
    else:
        rows, n_mask, rows64 = linear_triton.gemv_program_rows(N, BLOCK_N)
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, total)
    return rows, n_mask, rows64, (rows64 * 0)[:, None], tl.arange(0, LANES), start, end


@triton.jit
def prefetch_packed(q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, start, end, LANES: tl.constexpr,
                    LANES_PER_SCALE: tl.constexpr, HAS_MIN: tl.constexpr, SUPER: tl.constexpr = False,
                    PAIRED: tl.constexpr = False):
    """The program's weights, before its PDL wait: the 16-byte runs of lanes [start, end) of its
    rows (the addresses `load_words4` reads), their scales and mins, into L2 (`pdl.prefetch_l2`).
    The first wave of programs thus streams its weights while the kernel before it runs."""
    lane = tl.arange(0, LANES)
    for l0 in range(start, end, LANES):
        lanes = tl.minimum(l0 + lane, end - 1)
        pdl.prefetch_l2(q_ptr + rows64[:, None] * stride_qn + (lanes * 4)[None, :])
        s_offs = rows64 * stride_sn + l0 // LANES_PER_SCALE       # a tile's scales: 64-128 bytes a row
        pdl.prefetch_l2(s_ptr + s_offs)
        if SUPER:
            pdl.prefetch_l2(m_ptr + (s_offs >> 3))
        elif HAS_MIN and not PAIRED:
            pdl.prefetch_l2(m_ptr + s_offs)


@triton.jit
def load_words4(q_ptr, rows64, stride_qn, lane_idx, lane_mask, EVEN_K: tl.constexpr, STREAM: tl.constexpr = False,
                LANE_MAJOR: tl.constexpr = False, lane0=0):
    """Each lane's 16 bytes of its row (int32 words 4·lane .. 4·lane + 3) in one load, split
    into its 4 words in registers: 4 × [BLOCK_N, LANES] int32. STREAM: the codes are read once a
    step, so they are evicted first from L1 and L2.

    Which thread holds which (row, lane) is the compiler's choice, made for each load from its
    addresses' contiguity. Built [BLOCK_N, LANES, 4], rows and lanes are equally non-contiguous, and
    Triton breaks the tie by dimension order (3.6 gave rows threads first: a thread held one row of
    several lanes). LANE_MAJOR builds the load [BLOCK_N, LANES·4], a contiguous run along the lanes
    (lanes are contiguous when lane_idx is, as the GEMVs' are), so in any version the threads go
    along the lanes, 16 bytes each, and a thread holds one lane of every row: what x needs once.
    LANE_MAJOR takes the lanes as lane0 + tl.arange (lane0 a scalar; lane_idx is that tensor)."""
    policy: tl.constexpr = "evict_first" if STREAM else ""
    if LANE_MAJOR:
        words = tl.arange(0, 4 * lane_idx.shape[0])
        offs = rows64[:, None] * stride_qn + (lane0 * 4 + words)[None, :]
        if EVEN_K:
            flat = tl.load(q_ptr + offs, eviction_policy=policy)
        else:
            word_mask = (tl.reshape(tl.broadcast_to(lane_mask[:, :, None], [lane_mask.shape[0], lane_mask.shape[1], 4]),
                                    [lane_mask.shape[0], 4 * lane_mask.shape[1]]))
            flat = tl.load(q_ptr + offs, mask=word_mask, other=0, eviction_policy=policy)
        return split4(tl.reshape(flat, [rows64.shape[0], lane_idx.shape[0], 4]))
    w = tl.arange(0, 4)
    offs = rows64[:, None, None] * stride_qn + (lane_idx * 4)[None, :, None] + w[None, None, :]
    if EVEN_K:
        words4 = tl.load(q_ptr + offs, eviction_policy=policy)
    else:
        words4 = tl.load(q_ptr + offs, mask=lane_mask[:, :, None], other=0, eviction_policy=policy)
    return split4(words4)


@triton.jit
def load_tile(q_ptr, s_ptr, m_ptr, rows64, stride_qn, stride_sn, lanes, lane_mask, one,
              LANES_PER_SCALE: tl.constexpr, EVEN_K: tl.constexpr, HAS_MIN: tl.constexpr,
              SUPER: tl.constexpr = False, PAIRED: tl.constexpr = False, STREAM: tl.constexpr = False,
              LANE_MAJOR: tl.constexpr = False, lane0=0):
    """A GEMV tile: each lane's 16 bytes of codes of each row (4 words, one load) and its group's
    scale and min. The scales' column goes through `one` (a runtime 1) so that the compiler does
    not vectorise them across lanes, which would give them another layout than the words'.
    LANE_MAJOR (`load_words4`; lanes contiguous, one lane a scale): the scales' columns stay
    contiguous, so that their threads too go along the lanes, but `one - 1` hides their alignment,
    so that each thread loads one."""
    words0, words1, words2, words3 = load_words4(q_ptr, rows64, stride_qn, lanes, lane_mask, EVEN_K, STREAM,
                                                 LANE_MAJOR, lane0)
    if LANE_MAJOR:
        tl.static_assert(LANES_PER_SCALE == 1, "lane-major tiles: one scale a lane")
        s_offs = rows64[:, None] * stride_sn + (lanes + (one - 1))[None, :]
    else:
        s_offs = rows64[:, None] * stride_sn + ((lanes * one) // LANES_PER_SCALE)[None, :]
    scale, low = load_scale_min(s_ptr, m_ptr, s_offs, lane_mask, EVEN_K, HAS_MIN, SUPER, PAIRED)
    return words0, words1, words2, words3, scale, low


@triton.jit
def load_scale_min(s_ptr, m_ptr, offs, lane_mask, EVEN_K: tl.constexpr, HAS_MIN: tl.constexpr,
                   SUPER: tl.constexpr = False, PAIRED: tl.constexpr = False):
    """Each lane's group scale and, for the types with one, its min (else 0.0), as fp32.
    SUPER (Q4_K): s_ptr the int16 sub-scales (sc | m << 8), m_ptr the superblocks' fp16 (d, -dmin)
    as int32, a group's at its offset >> 3; the products d·sc, -dmin·m are exact in fp32.
    PAIRED: s_ptr int32, a group's fp16 scale | its fp16 min << 16 (one load)."""
    low = 0.0
    if PAIRED:
        if EVEN_K:
            pair = tl.load(s_ptr + offs)
        else:
            pair = tl.load(s_ptr + offs, mask=lane_mask, other=0)
        scale = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        low = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    elif SUPER:
        if EVEN_K:
            sub = tl.load(s_ptr + offs).to(tl.int32)
            pair = tl.load(m_ptr + (offs >> 3))
        else:
            sub = tl.load(s_ptr + offs, mask=lane_mask, other=0).to(tl.int32)
            pair = tl.load(m_ptr + (offs >> 3), mask=lane_mask, other=0)
        d = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        neg_dmin = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = d * (sub & 0xFF).to(tl.float32)
        low = neg_dmin * ((sub >> 8) & 0xFF).to(tl.float32)
    elif EVEN_K:
        scale = tl.load(s_ptr + offs).to(tl.float32)
        if HAS_MIN:
            low = tl.load(m_ptr + offs).to(tl.float32)
    else:
        scale = tl.load(s_ptr + offs, mask=lane_mask, other=0.0).to(tl.float32)
        if HAS_MIN:
            low = tl.load(m_ptr + offs, mask=lane_mask, other=0.0).to(tl.float32)
    return scale, low


@triton.jit
def split4(t):
    """[A, B, 4] → its 4 slices [A, B] along the last axis (registers of one thread)."""
    even, odd = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], 2, 2]))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def word_part(words, x_ptr, x32_ptr, word_x, x_mask, mi, stride_xm, EVEN_K: tl.constexpr,
              ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, BF16_ASM: tl.constexpr):
    """One word of each (row, group) against row mi of x → (Σ of its 8 products (q − 8)·x, Σ of
    its 8 x when the group needs it), [BN, G] fp32 each. word_x: [BN, G], the word's first element."""
    x_sum = 0.0
    if BF16_ASM:
        # x as bf16 pairs (int32): pair k of the word is x[8w + 2k], x[8w + 2k + 1]; one 16-byte
        # load, split in registers
        k4 = tl.arange(0, 4)
        px = x32_ptr + mi * (stride_xm // 2) + (word_x // 2)[:, :, None] + k4[None, None, :]
        if EVEN_K:
            pairs = tl.load(px)
        else:
            pairs = tl.load(px, mask=x_mask[:, :, None], other=0)
        if HAS_MIN or ZERO_POINT != 8:                  # bf16 → fp32 is a shift of its bits
            x_lo = (pairs << 16).to(tl.float32, bitcast=True)
            x_hi = (pairs & -65536).to(tl.float32, bitcast=True)
            x_sum = tl.sum(x_lo + x_hi, axis=2)
        x01, x23, x45, x67 = split4(pairs)
        dots = q4_word_dot_bf16(words, x01, x23, x45, x67, BF16_ASM)
    else:
        e = tl.arange(0, 8)
        x_ptrs = x_ptr + mi * stride_xm + word_x[:, :, None] + e[None, None, :]
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
        else:
            x = tl.load(x_ptrs, mask=x_mask[:, :, None], other=0.0).to(tl.float32)
        if HAS_MIN or ZERO_POINT != 8:
            x_sum = tl.sum(x, axis=2)
        dots = q4_word_dot_fp32(words, x)
    return dots, x_sum


@triton.jit
def row_part(words0, words1, words2, words3, scale, low, x_ptr, x32_ptr, group_x, x_mask, mi,
             stride_xm, EVEN_K: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr,
                 BF16_ASM: tl.constexpr):
    """Row mi of x as it is (not rounded) against the GEMV's tile: [BLOCK_N, GROUPS], scaled (+ min · Σx)."""
    d0, s0 = word_part(words0, x_ptr, x32_ptr, group_x, x_mask, mi, stride_xm, EVEN_K, ZERO_POINT,
                           HAS_MIN, BF16_ASM)
    d1, s1 = word_part(words1, x_ptr, x32_ptr, group_x + 8, x_mask, mi, stride_xm, EVEN_K, ZERO_POINT,
                           HAS_MIN, BF16_ASM)
    d2, s2 = word_part(words2, x_ptr, x32_ptr, group_x + 16, x_mask, mi, stride_xm, EVEN_K, ZERO_POINT,
                           HAS_MIN, BF16_ASM)
    d3, s3 = word_part(words3, x_ptr, x32_ptr, group_x + 24, x_mask, mi, stride_xm, EVEN_K, ZERO_POINT,
                           HAS_MIN, BF16_ASM)
    part = scale * ((d0 + d1) + (d2 + d3))
    if HAS_MIN or ZERO_POINT != 8:
        part += low * ((s0 + s1) + (s2 + s3))
    return part
