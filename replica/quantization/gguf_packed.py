"""GGUF weights kept quantised on the device: the raw GGML blocks → one packed layout the
Triton kernels read (`replica/kernels/gguf_linear_triton.py`), and its torch dequantisation.

Every supported type is a grid of G-element groups along K (a weight row; G = 32, 16 for Q6_K),
each with one scale and, for the asymmetric types, one offset ("min"):

    w[n, G g + i] = (q[n, G g + i] - zero_point) * scales[n, g]  (+ mins[n, g])

    type   bits  G   zero_point  mins   from the GGML block
    Q4_0    4    32      8        -      d
    Q4_1    4    32      0       yes     d, m
    Q4_K    4    32      0       yes     d·sc_j, -dmin·m_j  (kept apart: see "Q4_K" below)
    Q8_0    8    32      0        -      d (q signed)
    Q6_K    6    16     32        -      d·sc_j (the 256-superblock's int8 sub-scales folded in)
    Q5_0    8    32      0        -      d (q − 16 stored signed)
    Q5_1    8    32      0       yes     d, m
    Q5_K    8    32      0       yes     d·sc_j, -dmin·m_j (as Q4_K)

Q6_K is what llama.cpp's Q4_K_M (Ollama's default) keeps for the output head and for attn_v and
ffn_down in half the layers, and what its Q4_0 files keep for the output head. Its 6-bit codes
(0..63) stay 6 bits: their low nibbles in the 4-bit layout below, their top 2 bits in a second
plane `qhigh` (7 bits a weight with the scales, 6.56 in the file; widened to bytes, as until
2026-11-30 and still with SIX_BIT_Q6_K off, 9). The 6-bit GEMV rounds x to int8 and rebuilds each
code as a byte for dp4a (`replica/kernels/gguf_gemv_x8_triton.py`). The 5-bit types (Ollama's
q5_K_M, q5_0, q5_1) are widened to bytes (8.5 bits a weight, 9 with mins) for the 8-bit kernels.

Layout (row-major, one row per output feature n):

    4-bit  qweight uint8 [N, K/2], seen as little-endian int32 words of 8 elements each
           (word w = elements 8w..8w+7 of the row): the low 16 bits hold the even elements, the
           high 16 bits the odd ones, one nibble each:

               word w:  bits 31..28  27..24  23..20  19..16 | 15..12  11..8  7..4   3..0
                        elem 8w+7    8w+5    8w+3    8w+1   | 8w+6    8w+4   8w+2   8w

           so (word >> 4i) & 0x000F000F is the pair (element 2i, element 2i + 1) in the two
           16-bit halves, the order of a bf16x2 pair of x: the decode GEMV
           (`replica/kernels/gguf_gemv_triton.py`) turns each such pair into bf16 codes with one
           LOP3 and multiplies it with x two elements an instruction. GGML's Q4_0/Q4_1 order
           (byte b of a block: elements b and b + 16) and Q4_K's are re-nibbled at repack.
    6-bit  qweight: the codes' low nibbles, laid out as 4-bit; qhigh uint8 [N, K/4], seen as
           int32 words of 16 elements (word h: the high 2 bits of 4-bit words 2h and 2h + 1).
           Byte j of word h holds, from bit 0: word 2h's element A_j, its B_j, word 2h + 1's
           A_j, its B_j, where A = (0, 4, 1, 5) and B = (2, 6, 3, 7) are the elements whose low
           nibbles byte j of a 4-bit word holds (low nibble A_j, high B_j). So a shift and a mask
           of word h put the top bits beside the bytes `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F`
           of a 4-bit word: one OR makes the 4 codes bytes
    8-bit  qweight int8  [N, K]
    scales fp16 [N, K/G]; mins fp16 [N, K/G] or None
    Q4_K   three layouts (`Q4_K_LAYOUT`), one load a lane fastest:
           "paired" (the default): scales int32 [N, K/32], a group's fp16 d·sc_j in the low half,
             its fp16 -dmin·m_j in the high half, one 4-byte load a lane; mins None. 5 bits a weight.
           "super": scales int16 [N, K/32], a group's 6-bit sub-scale sc_j | its 6-bit sub-min
             m_j << 8; super_scales fp16 [N, K/256, 2], its 256-superblock's (d, -dmin); mins None.
             Row-major and K a multiple of 256, so a group's superblock is at (its offset in
             scales) >> 3. 4.625 bits a weight; the kernels form d·sc_j and -dmin·m_j in fp32, so
             its values are gguf's exactly.
           "flat": the two fp16 apart (scales, mins), two 2-byte loads a lane; 5 bits. What a
             fused projection mixing Q4_K with Q4_0/Q4_1 parts uses (`with_mins`).
           W2 on an 8B (H200, one process): paired 529.5 / 530.1 tok/s, flat 518.2, super 514.7 /
           511.4 (bench/results/quant-q4k-layout-H200-8b-2026-11-30.json): a 1-row GEMV gains
           more from one load fewer than from 0.31 GiB fewer bytes.

Exactness: Q4_0, Q4_1 and Q8_0 keep GGML's fp16 d and m, and "super" Q4_K its sub-scales as
integers, so the dequantised values equal gguf's. The other Q4_K layouts' group scale d·sc
(fp16 × 6-bit int) is rounded to fp16 once at repack: a relative error ≤ 2⁻¹¹ of the group's
scale, under 0.05 % of one quantisation step; Q6_K's d·sc (fp16 × int8) and Q5_K's likewise.
"""
from dataclasses import dataclass

import torch

GROUP_SIZE = 32               # elements a scale covers, except for the types in GROUP_SIZES
GROUP_SIZES = {"Q6_K": 16}
# GGML type name → (bytes per block, elements per block)
BLOCK_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q8_0": (34, 32), "Q4_K": (144, 256),
               "Q6_K": (210, 256), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q5_K": (176, 256)}
EIGHT_BIT_TYPES = ("Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K")       # held as one signed byte a code
# Q6_K packed at 6 bits (qweight + qhigh, zero point 32); False: widened to signed bytes
SIX_BIT_Q6_K = True
# Q4_K's scales: "paired", "super" or "flat" (above)
Q4_K_LAYOUT = "paired"
SUPPORTED_TYPES = tuple(BLOCK_BYTES)


@dataclass
class GGUFTensor:
    """A GGUF tensor still in its GGML block encoding, as the loader yields it with
    `keep_quantized`. data: uint8 [rows, row_bytes]; shape: (rows, cols) as HF orients the weight
    (out_features, in_features); rows may be any subset of a projection's rows (fused parts)."""
    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.qtype not in BLOCK_BYTES:
            raise ValueError(f"GGUF type {self.qtype} cannot stay quantised (supported: {SUPPORTED_TYPES})")
        block_bytes, block_size = BLOCK_BYTES[self.qtype]
        rows, cols = self.shape
        if cols % block_size or tuple(self.data.shape) != (rows, cols // block_size * block_bytes):
            raise ValueError(f"{self.qtype} tensor of shape {self.shape}: expected uint8 data "
                             f"[{rows}, {cols // block_size * block_bytes}], got {list(self.data.shape)}")


@dataclass
class PackedGGUF:
    """The packed layout above. `qtype` names the GGML type it came from."""
    qtype: str
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    qhigh: torch.Tensor | None = None       # 6-bit: the codes' top 2 bits
    super_scales: torch.Tensor | None = None    # Q4_K: (d, -dmin) a 256-superblock; scales its sub-scales
    is_paired: bool = False     # scales int32 [N, K/G]: a group's fp16 scale | its fp16 min << 16; mins None

    @property
    def bits(self) -> int:
        if self.qhigh is not None:
            return 6
        return 8 if self.qtype in EIGHT_BIT_TYPES else 4

    @property
    def zero_point(self) -> int:
        return 8 if self.qtype == "Q4_0" else 32 if self.qhigh is not None else 0

    @property
    def group_size(self) -> int:
        return GROUP_SIZES.get(self.qtype, GROUP_SIZE)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * self.group_size

    @property
    def has_min(self) -> bool:
        return self.mins is not None or self.super_scales is not None or self.is_paired

    @property
    def min_operand(self) -> torch.Tensor:
        """What the Triton kernels take as their mins pointer: the superblocks' (d, -dmin) as int32
        ("super"), the mins, or, where there are none (or they sit in `scales`), the scales."""
        if self.super_scales is not None:
            return self.super_scales.view(torch.int32)
        return self.mins if self.mins is not None else self.scales

    def rows(self, start: int, stop: int) -> "PackedGGUF":
        """Rows start..stop of the matrix, as views (every tensor is row-major)."""
        def part(t):
            return None if t is None else t[start:stop]
        return PackedGGUF(self.qtype, self.qweight[start:stop], self.scales[start:stop], part(self.mins),
                          part(self.qhigh), part(self.super_scales), self.is_paired)

    @property
    def num_bytes(self) -> int:
        tensors = [t for t in (self.qweight, self.scales, self.mins, self.qhigh, self.super_scales) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def layout(self) -> tuple[int, int, int, bool, bool, bool]:
        """Parts with the same layout can share one fused matrix (qkv, gate_up)."""
        return (self.bits, self.group_size, self.zero_point, self.has_min, self.super_scales is not None,
                self.is_paired)

    def group_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's (scale, min) as fp32 [N, K/G] (min None for the types without one)."""
        if self.is_paired:
            pair = self.scales.view(torch.float16).reshape(*self.scales.shape, 2).float()
            return pair[..., 0], pair[..., 1]
        if self.super_scales is None:
            return self.scales.float(), None if self.mins is None else self.mins.float()
        sub = self.scales.view(torch.uint8).reshape(*self.scales.shape, 2).float()     # (sc, m), little-endian
        d_min = self.super_scales.float().repeat_interleave(8, dim=1)                  # [N, K/32, 2]
        return d_min[..., 0] * sub[..., 0], d_min[..., 1] * sub[..., 1]


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    # raw: uint8 [..., 2] little-endian halves → float16 [...]
    return raw.contiguous().view(torch.float16).squeeze(-1)


def pack(tensor: GGUFTensor) -> PackedGGUF:
    """GGML blocks (on any device) → the packed layout, on the same device."""
    rows, cols = tensor.shape
    block_bytes, block_size = BLOCK_BYTES[tensor.qtype]
    blocks = tensor.data.reshape(rows, cols // block_size, block_bytes)
    groups = cols // GROUP_SIZE
    if tensor.qtype == "Q6_K":
        return _pack_q6_k(blocks, rows, cols)
    if tensor.qtype in ("Q5_0", "Q5_1", "Q5_K"):
        return _pack_q5(tensor.qtype, blocks, rows, cols)
    if tensor.qtype == "Q8_0":
        qweight = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return PackedGGUF("Q8_0", qweight, _fp16(blocks[..., 0:2]), None)
    if tensor.qtype in ("Q4_0", "Q4_1"):
        # GGML's order: byte b of a block holds element b (low nibble) and b + 16 (high)
        head = 2 if tensor.qtype == "Q4_0" else 4
        qs = blocks[..., head:]
        values = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        mins = _fp16(blocks[..., 2:4]) if tensor.qtype == "Q4_1" else None
        return PackedGGUF(tensor.qtype, nibbles_from_values(values), _fp16(blocks[..., 0:2]), mins)
    # Q4_K: d, dmin (fp16), 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles where
    # byte 32c + l holds element 64c + l (sub-block 2c) low and 64c + 32 + l (sub-block 2c+1) high.
    d_min = blocks[..., 0:4].contiguous().view(torch.float16).clone()       # [rows, superblocks, 2]
    d_min[..., 1] = -d_min[..., 1]
    sc, mn = q4_k_scale_min(blocks[..., 4:16])
    sub = torch.stack([sc, mn], dim=-1).reshape(rows, groups, 2).view(torch.int16).reshape(rows, groups)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)
    values = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(rows, groups, GROUP_SIZE)
    packed = PackedGGUF("Q4_K", nibbles_from_values(values), sub.contiguous(), None, None, d_min.contiguous())
    if Q4_K_LAYOUT == "super":
        return packed
    flat = with_mins(packed)
    if Q4_K_LAYOUT == "flat":
        return flat
    pairs = torch.stack([flat.scales, flat.mins], dim=-1).view(torch.int32).squeeze(-1)
    return PackedGGUF("Q4_K", flat.qweight, pairs.contiguous(), None, is_paired=True)


def _pack_q6_k(blocks: torch.Tensor, rows: int, cols: int) -> PackedGGUF:
    # A 210-byte block: ql[128] low nibbles, qh[64] top 2 bits, int8 sub-scales[16] (one per 16
    # elements), fp16 d. In each 128-element half h: ql byte 64h + l holds element l (low nibble)
    # and 64 + l (high); qh byte 32h + l holds elements 32t + l in its bits 2t, 2t + 1 (t = 0..3).
    ql = blocks[..., :128].reshape(rows, -1, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32)
    low = ((ql >> torch.tensor([0, 4], dtype=torch.uint8, device=ql.device)[:, None]) & 0x0F)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device)[:, None]) & 0x03
    codes = low.reshape(rows, -1, 2, 128) | (high.reshape(rows, -1, 2, 128) << 4)    # 0..63
    sub_scales = blocks[..., 192:208].contiguous().view(torch.int8).float()
    d = _fp16(blocks[..., 208:210]).float()[..., None]
    scales = (d * sub_scales).reshape(rows, cols // 16).half()
    if SIX_BIT_Q6_K:
        return pack_six_bit("Q6_K", codes.reshape(rows, cols), scales)
    qweight = (codes.view(torch.int8) - 32).reshape(rows, cols)     # uint8 < 64 reads the same as int8
    return PackedGGUF("Q6_K", qweight, scales, None)


def pack_six_bit(qtype: str, codes: torch.Tensor, scales: torch.Tensor) -> PackedGGUF:
    """codes uint8 [N, K] (0..63, element order; K a multiple of 32) → the 6-bit layout above."""
    rows, cols = codes.shape
    qweight = nibbles_from_values((codes & 0x0F).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE))
    top = (codes >> 4).reshape(rows, cols // 16, 2, 8)              # [.., 4-bit word 2h + s, element]
    pairs = top[..., [0, 4, 1, 5]] | (top[..., [2, 6, 3, 7]] << 2)  # [.., s, byte j]: A_j | B_j << 2
    qhigh = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(rows, cols // 4)
    return PackedGGUF(qtype, qweight, scales, None, qhigh.contiguous())


def _pack_q5(qtype: str, blocks: torch.Tensor, rows: int, cols: int) -> PackedGGUF:
    # Q5_0 / Q5_1 (32-element blocks): d [, m] (fp16), qh (uint32: bit i is element i's 5th bit),
    # qs[16] (byte b: element b low nibble, b + 16 high). Q5_K (256): d, dmin, 12 bytes of 6-bit
    # (scale, min) pairs as Q4_K, qh[32] (bit j of byte l: element l of sub-block j), qs[128] (byte
    # 32c + l: element l of sub-block 2c low nibble, of 2c + 1 high).
    groups = cols // GROUP_SIZE
    if qtype == "Q5_K":
        qh = blocks[..., 16:48].reshape(rows, -1, 1, 32)
        qs = blocks[..., 48:].reshape(rows, -1, 4, 1, 32)
        high = (qh >> torch.arange(8, dtype=torch.uint8, device=qh.device)[:, None]) & 1    # [.., 8, 32]
        low = (qs >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device)[:, None]) & 0x0F
        codes = (low.reshape(rows, -1, 8, 32) | (high << 4)).reshape(rows, cols)
        d = _fp16(blocks[..., 0:2]).float()[..., None]
        dmin = _fp16(blocks[..., 2:4]).float()[..., None]
        sc, mn = q4_k_scale_min(blocks[..., 4:16])
        scales = (d * sc.float()).reshape(rows, groups).half()
        mins = (-(dmin * mn.float())).reshape(rows, groups).half()
        return PackedGGUF("Q5_K", codes.view(torch.int8), scales, mins)
    head = 2 if qtype == "Q5_0" else 4
    qh = blocks[..., head:head + 4].contiguous().view(torch.int32)                  # [rows, groups, 1]
    bit = torch.arange(32, dtype=torch.int32, device=qh.device)
    high = ((qh >> bit) & 1).to(torch.uint8)                                        # [rows, groups, 32]
    qs = blocks[..., head + 4:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1) | (high << 4)                   # 0..31
    if qtype == "Q5_0":
        return PackedGGUF("Q5_0", (codes.view(torch.int8) - 16).reshape(rows, cols), _fp16(blocks[..., 0:2]), None)
    return PackedGGUF("Q5_1", codes.view(torch.int8).reshape(rows, cols), _fp16(blocks[..., 0:2]),
                      _fp16(blocks[..., 2:4]))


def nibbles_from_values(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes in element order [rows, groups, 32] (uint8 0..15) → qweight uint8
    [rows, groups · 16] in the layout above. In bytes (little-endian), a word's bytes 0-3 hold
    elements (0, 2), (4, 6), (1, 3), (5, 7), low nibble first; uint8 arithmetic throughout, so a
    large projection needs no wider temporaries while it loads."""
    rows, groups, _ = values.shape
    v = values.reshape(rows, groups * 4, 8)
    lo, hi = v[..., [0, 4, 1, 5]], v[..., [2, 6, 3, 7]]
    return (lo | (hi << 4)).reshape(rows, groups * 16)


def q4_k_scale_min(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """raw: uint8 [..., 12] → (scales, mins) uint8 [..., 8]: sub-blocks 0-3 keep 6 bits of bytes
    0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take their low 4 bits from bytes 8-11 and their
    top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return scales, mins


def unpack_values(packed: PackedGGUF) -> torch.Tensor:
    """The integer codes in element order: [N, K] (4-bit: uint8 0..15; 6-bit: uint8 0..63;
    8-bit: int8)."""
    n, k = packed.shape
    if packed.bits == 8:
        return packed.qweight
    qbytes = packed.qweight.reshape(n, k // 8, 4)
    codes = torch.cat([qbytes & 0x0F, qbytes >> 4], dim=-1)     # elements 0, 4, 1, 5, 2, 6, 3, 7
    codes = codes[..., [0, 2, 4, 6, 1, 3, 5, 7]].reshape(n, k)
    if packed.bits == 6:
        hbytes = packed.qhigh.reshape(n, k // 16, 1, 4)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=hbytes.device)[:, None]
        top = (hbytes >> shifts) & 0x03                           # [.., (s, A|B), byte j]
        top = top.reshape(n, k // 16, 2, 8)                       # per word s: A_0..A_3, B_0..B_3
        order = torch.empty(8, dtype=torch.long)
        order[[0, 4, 1, 5, 2, 6, 3, 7]] = torch.arange(8)
        codes = codes | (top[..., order.to(hbytes.device)].reshape(n, k) << 4)
    return codes


def dequantize_packed(packed: PackedGGUF, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The torch reference of the packed layout (and the CPU path): float [N, K] in `dtype`,
    computed in fp32 as (q - zero_point) · scale (+ min), in place to keep the passes few."""
    n, k = packed.shape
    group = packed.group_size
    w = unpack_values(packed).to(torch.float32).reshape(n, k // group, group)
    if packed.zero_point:
        w -= packed.zero_point
    scales, mins = packed.group_scales()
    w *= scales[..., None]
    if mins is not None:
        w += mins[..., None]
    return w.reshape(n, k).to(dtype)


def with_mins(packed: PackedGGUF) -> PackedGGUF:
    """A 4-bit part in the flat layout (fp16 scales and mins a group), so that it can share a
    fused matrix with parts of other 4-bit types: Q4_0 gains explicit mins (-8·d, exact in fp16),
    Q4_K's d·sc_j and -dmin·m_j are rounded to fp16. Other layouts are returned unchanged."""
    if packed.super_scales is not None or packed.is_paired:
        scales, mins = packed.group_scales()
        return PackedGGUF(packed.qtype, packed.qweight, scales.half(), mins.half())
    if packed.qtype != "Q4_0":
        return packed
    return PackedGGUF("Q4_1", packed.qweight, packed.scales, -8 * packed.scales)
