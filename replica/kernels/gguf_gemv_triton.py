"""Triton, GGUF weights kept packed (`replica/quantization/gguf_packed.py`): the decode GEMV for
1..8 rows of x, and a dequantise-to-bf16 kernel for everything larger (then one cuBLAS GEMM).

Decode reads each weight byte once, so its floor is packed bytes / memory bandwidth. The first
kernel (`gguf_linear_triton._gguf_linear_kernel`) reached only 0.4-0.6 TB/s on an H200: it
gathered one fp16 scale (and min) per weight element through a computed column index, so its
loads were neither vectorised nor few. This one works on whole 32-element groups:

    packed [N, K/2] bytes seen as [N, K/32 groups, 16 bytes]     (8-bit: [N, K/32, 32] int8)
    a tile is [BLOCK_N rows, GROUPS groups, 16 bytes]: the last axis is 16 contiguous bytes, one
    16-byte load per thread and group; scales (and mins) are [BLOCK_N, GROUPS], one load a group.

Per group the scale is factored out of the sum (exact algebra, fp32 throughout):

    Σ_i w_i x_i = scale · Σ_i (q_i − zero_point) x_i + min · Σ_i x_i

so the per-element work is a nibble → float conversion (done with integer ops and one FADD: the
hardware conversion's quarter rate capped the first version at ~1.6 TB/s) and one FMA. Rows of x (1..16, a
constexpr) reuse the tile in registers: the weight is read once whatever the batch.
SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N] summed by linear_triton's split-K kernel.
The grid depends only on shapes: launches are valid inside a CUDA graph.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import linear_triton
from replica.quantization.gguf_packed import GROUP_SIZE, PackedGGUF

MAX_ROWS = 16         # rows of x the GEMV takes (its cost grows with the rows: a loop over them)
# rows up to which `gguf_linear_triton.gguf_linear` takes the GEMV; above, dequantise + cuBLAS.
# Measured on an H200 at the 8B shapes (bench/quant.py, gguf_kernels): the crossover.
GEMV_ROWS = 4


@dataclass(frozen=True)
class GemvConfig:
    block_n: int          # rows of W a program owns
    groups: int           # 32-column groups of W a tile (a power of two)
    split_k: int = 1
    num_warps: int = 4


# (GGML type, rows of x, N, K) → config, filled by a measured sweep (bench/quant.py).
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {}


@triton.jit
def _gguf_gemv_kernel(
    x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, partial_ptr,
    N, num_groups, groups_per_split, stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    BYTES: tl.constexpr = 16 if BITS == 4 else 32       # bytes of one group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    rows64 = tl.minimum(rows, N - 1).to(tl.int64)       # clamped: loads need no row mask
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, BYTES)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    ms = tl.arange(0, BLOCK_M)                          # BLOCK_M: M up to a power of two
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in range(g_start, g_end, GROUPS):
        gs = g0 + g                                     # [GROUPS] group indices
        q_offs = rows64[:, None, None] * stride_qn + (gs * BYTES)[None, :, None] + j[None, None, :]
        s_offs = rows64[:, None] * stride_sn + gs[None, :]
        if EVEN_K:
            packed = tl.load(q_ptr + q_offs)
            scale = tl.load(s_ptr + s_offs).to(tl.float32)
            if HAS_MIN:
                low = tl.load(m_ptr + s_offs).to(tl.float32)
        else:
            g_mask = gs < g_end
            packed = tl.load(q_ptr + q_offs, mask=g_mask[None, :, None], other=0)
            scale = tl.load(s_ptr + s_offs, mask=g_mask[None, :], other=0.0).to(tl.float32)
            if HAS_MIN:
                low = tl.load(m_ptr + s_offs, mask=g_mask[None, :], other=0.0).to(tl.float32)
        if BITS == 4:
            # nibble → float without the int→float conversion unit (a quarter of the FMA rate,
            # it capped the first version at ~1.6 TB/s): OR the code into the mantissa of 2^23
            # and subtract 2^23 + zero_point, exact in fp32
            bits = packed.to(tl.int32)
            w_lo = ((bits & 0x0F) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO_POINT)
            w_hi = ((bits >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO_POINT)
        else:
            bits = packed.to(tl.int32) + 128            # int8 → 0..255, then the same trick
            w = (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 128.0 + ZERO_POINT)
        for mi in tl.static_range(M):
            x_offs = mi * stride_xm + (gs * 32)[:, None] + j[None, :]
            if EVEN_K:
                x_mask = gs[:, None] >= 0                   # all true: one code path for loads
            else:
                x_mask = (gs < g_end)[:, None]
            if BITS == 4:
                x_lo = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + x_offs + 16, mask=x_mask, other=0.0).to(tl.float32)
                dots = tl.sum(w_lo * x_lo[None, :, :] + w_hi * x_hi[None, :, :], axis=2)
                if HAS_MIN:
                    x_sum = tl.sum(x_lo + x_hi, axis=1)
            else:
                xg = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32)
                dots = tl.sum(w * xg[None, :, :], axis=2)
                if HAS_MIN:
                    x_sum = tl.sum(xg, axis=1)
            part = scale * dots                         # the zero point is in the codes
            if HAS_MIN:
                part += low * x_sum[None, :]
            contrib = tl.sum(part, axis=1)              # [BLOCK_N]
            acc = tl.where(ms[None, :] == mi, acc + contrib[:, None], acc)

    out_mask = n_mask[:, None] & (ms < M)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + ms[None, :] * stride_om + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(partial_ptr + (pid_k * M + ms[None, :]).to(tl.int64) * N + rows[:, None], acc,
                 mask=out_mask)


@triton.jit
def _gguf_dequant_kernel(q_ptr, s_ptr, m_ptr, out_ptr, N, num_groups, stride_qn, stride_sn, stride_on,
                         BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    BYTES: tl.constexpr = 16 if BITS == 4 else 32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, BYTES)
    mask2 = (rows < N)[:, None] & (gs < num_groups)[None, :]
    mask3 = mask2[:, :, None]
    rows64 = rows.to(tl.int64)
    packed = tl.load(q_ptr + rows64[:, None, None] * stride_qn + (gs * BYTES)[None, :, None]
                     + j[None, None, :], mask=mask3, other=0)
    s_offs = rows64[:, None] * stride_sn + gs[None, :]
    scale = tl.load(s_ptr + s_offs, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    if HAS_MIN:
        low = tl.load(m_ptr + s_offs, mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    else:
        low = 0.0
    dst = out_ptr + rows64[:, None, None] * stride_on + (gs * 32)[None, :, None] + j[None, None, :]
    if BITS == 4:
        lo = ((packed & 0x0F).to(tl.float32) - ZERO_POINT) * scale + low
        hi = ((packed >> 4).to(tl.float32) - ZERO_POINT) * scale + low
        tl.store(dst, lo.to(out_ptr.dtype.element_ty), mask=mask3)
        tl.store(dst + 16, hi.to(out_ptr.dtype.element_ty), mask=mask3)
    else:
        w = (packed.to(tl.float32) - ZERO_POINT) * scale + low
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask3)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_gemv_config(num_rows: int, n: int, k: int, bits: int, device: torch.device,
                       qtype: str = "") -> GemvConfig:
    """A measured entry of TUNED, else 8 rows x 32 groups (1024 columns: 4 KiB of nibbles a
    tile), 4 warps, split-K while the grid has fewer than ~8 programs per SM. On an H200 at the
    8B shapes that is the sweep's winner for every Q4 shape but one (o_proj: 16 rows, within 2 %)."""
    tuned = TUNED.get((qtype, num_rows, n, k))
    if tuned is not None:
        return tuned
    block_n, groups = (8, 32) if bits == 4 else (8, 16)
    num_groups = k // GROUP_SIZE
    split_k = 1
    while (triton.cdiv(n, block_n) * split_k < 8 * _num_sms(device)
           and num_groups >= 2 * split_k * groups and split_k < 16):
        split_k *= 2
    return GemvConfig(block_n, groups, split_k, num_warps=4)


def gguf_gemv(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None) -> torch.Tensor:
    """x: [M ≤ MAX_ROWS, K] (checked by the caller, `gguf_linear_triton.gguf_linear`) → [M, N]."""
    num_rows, k = x.shape
    n = packed.shape[0]
    config = config or choose_gemv_config(num_rows, n, k, packed.bits, x.device, packed.qtype)
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    num_groups = k // GROUP_SIZE
    groups = min(config.groups, triton.next_power_of_2(num_groups))
    num_tiles = triton.cdiv(num_groups, groups)
    split_k = max(1, min(config.split_k, num_tiles))
    groups_per_split = triton.cdiv(num_tiles, split_k) * groups
    split_k = triton.cdiv(num_groups, groups_per_split)                 # no empty split
    even_k = num_groups % groups == 0
    partial = (torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    mins = packed.mins if packed.mins is not None else packed.scales
    _gguf_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, packed.qweight, packed.scales, mins, bias if bias is not None else out, out, partial,
        n, num_groups, groups_per_split, x.stride(0), packed.qweight.stride(0),
        packed.scales.stride(0), out.stride(0),
        BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.mins is not None,
        HAS_BIAS=bias is not None, M=num_rows,
        BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=config.block_n, GROUPS=groups,
        SPLIT_K=split_k, EVEN_K=even_k, num_warps=config.num_warps, num_stages=1,
    )
    if split_k > 1:
        block = 1024
        linear_triton._split_k_sum_kernel[(num_rows, triton.cdiv(n, block))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, num_warps=4,
        )
    return out


def dequantize(packed: PackedGGUF, dtype: torch.dtype) -> torch.Tensor:
    """The packed weight as a dense [N, K] tensor in `dtype` (same values as
    `gguf_packed.dequantize_packed`, computed in fp32 and rounded once)."""
    n, k = packed.shape
    out = torch.empty(n, k, dtype=dtype, device=packed.qweight.device)
    num_groups = k // GROUP_SIZE
    block_n, groups = 16, 16
    mins = packed.mins if packed.mins is not None else packed.scales
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(num_groups, groups))](
        packed.qweight, packed.scales, mins, out, n, num_groups, packed.qweight.stride(0),
        packed.scales.stride(0), out.stride(0),
        BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.mins is not None,
        BLOCK_N=block_n, GROUPS=groups, num_warps=4,
    )
    return out
