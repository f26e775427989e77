"""Triton: out = x @ W^T (+ bias) with W kept in GGUF's 4- or 8-bit groups. `gguf_linear` is the
entry point the engine calls: by default it takes `gguf_gemv_triton`'s GEMV (few rows) or its
dequantise kernel + cuBLAS (more rows), both measured faster than this module's first kernel,
which now runs only when a caller passes a `GGUFLinearConfig` (tests, bench/quant.py).

The first kernel (the packed layout of `replica/quantization/gguf_packed.py`, dequantised in
registers, never written out; reference: `gguf_linear.gguf_linear_ref`), 0.4-0.6 TB/s at one
row on an H200 (bench/results/quant-issue15b-H200-8b-2026-11-28.json):

Decode at batch 1..8 reads each weight byte once: the floor is packed bytes / bandwidth, about
a third of bf16's at 4 bits (5.0 or 4.5 bits a weight with the scales). One kernel, three uses:

    W packed [N, K/2] bytes     program (n, s, m) of the grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))
    ┌──────────────────┐        owns BLOCK_N rows of W, the s-th run of k_per_split columns and
    │      │ s │       │ BLOCK_N  BLOCK_M rows of x; per BLOCK_K tile it loads BLOCK_K/2 bytes a row,
    └──────────────────┘        splits the nibbles, scales them by their group's fp16 scale (+ min)

A 4-bit tile's byte b holds columns (b//16)*32 + b%16 (low nibble) and that + 16 (high): the
tile is two half-tiles W_lo, W_hi [BLOCK_N, BLOCK_K/2] multiplied with the matching x columns.
- M == 1 ("fma", BLOCK_M = 1): W_lo * x_lo + W_hi * x_hi summed element-wise in fp32 registers,
  one reduction over K after the loop: nothing but the loads on the critical path.
- M > 1 ("dot"): tl.dot(W tile in x's dtype, x tileᵀ) on the tensor cores, W on the MMA's large
  side (swap-AB), x padded to BLOCK_M ≥ 16 rows with zeros. With a grid over M this is also the
  prefill GEMM (dequantised tiles, never a dequantised matrix).
SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N] summed by linear_triton's split-K kernel.
K is a multiple of 32 (GGUF's groups) and BLOCK_K of 32, so a group never straddles tiles.
Accumulation is fp32; the output is rounded once to x's dtype. The grid depends only on shapes:
the launch is valid inside a CUDA graph.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import gguf_gemv_triton, linear_triton
from replica.kernels.checks import (
    FLOAT_DTYPES, check_contiguous, check_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape, dot_precision,
)
from replica.quantization.gguf_packed import GROUP_SIZE, PackedGGUF

MAX_GEMV_ROWS = 8     # rows of x for the decode tilings; more rows use the GEMM tiling


@dataclass(frozen=True)
class GGUFLinearConfig:
    block_n: int
    block_k: int          # columns of W a tile (a multiple of 32)
    block_m: int = 1      # 1: the fma path (x must have one row); ≥ 16: the dot path
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


# (GGML type, num_rows bucket, N, K) → config, filled by a measured sweep (bench/quant.py runs
# one and reports it); shapes not listed use the heuristic in choose_config.
TUNED: dict[tuple[str, int, int, int], GGUFLinearConfig] = {}


@triton.jit
def _gguf_linear_kernel(
    x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, k_per_split, stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # W rows = output columns
    n_mask = rows < N
    rows64 = rows.to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ms < M
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * k_per_split
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        b = tl.arange(0, HALF)
        col_lo = (b // 16) * 32 + b % 16                    # W column of each byte's low nibble
    else:
        col_lo = tl.arange(0, BLOCK_K)
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif BITS == 4:
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        cols = k0 + col_lo
        k_mask = cols < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        scale = tl.load(s_ptr + rows64[:, None] * stride_sn + (cols // 32)[None, :],
                        mask=w_mask, other=0.0).to(tl.float32)
        if HAS_MIN:
            low = tl.load(m_ptr + rows64[:, None] * stride_sn + (cols // 32)[None, :],
                          mask=w_mask, other=0.0).to(tl.float32)
        x_mask = m_mask[:, None] & k_mask[None, :]
        if BITS == 4:
            packed = tl.load(q_ptr + rows64[:, None] * stride_qn + (k0 // 2 + b)[None, :],
                             mask=w_mask, other=0)
            w_lo = ((packed & 0x0F).to(tl.float32) - ZERO_POINT) * scale
            w_hi = ((packed >> 4).to(tl.float32) - ZERO_POINT) * scale
            if HAS_MIN:
                w_lo += low
                w_hi += low
            x_lo = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
            x_hi = tl.load(x_rows + (cols + 16)[None, :], mask=x_mask, other=0.0)
            if USE_DOT:
                acc = tl.dot(w_lo.to(x_lo.dtype), tl.trans(x_lo), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(w_hi.to(x_hi.dtype), tl.trans(x_hi), acc, input_precision=DOT_PRECISION)
            else:
                acc += w_lo * x_lo.to(tl.float32) + w_hi * x_hi.to(tl.float32)
        else:
            codes = tl.load(q_ptr + rows64[:, None] * stride_qn + cols[None, :], mask=w_mask, other=0)
            w = (codes.to(tl.float32) - ZERO_POINT) * scale
            if HAS_MIN:
                w += low
            x = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
            if USE_DOT:
                acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
            else:
                acc += w * x.to(tl.float32)

    if USE_DOT:
        result = acc                                        # [BLOCK_N, BLOCK_M]
    else:
        result = tl.sum(acc, 1)[:, None]                    # [BLOCK_N, 1]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + ms.to(tl.int64)[None, :] * stride_om + rows[:, None],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial_ptr + (pid_k * M + ms[None, :]).to(tl.int64) * N + rows[:, None], result,
                 mask=out_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8   # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_bucket(num_rows: int) -> int:
    return 1 if num_rows == 1 else (8 if num_rows <= MAX_GEMV_ROWS else 64)


def choose_config(num_rows: int, n: int, k: int, bits: int, device: torch.device,
                  qtype: str = "") -> GGUFLinearConfig:
    """A measured entry of TUNED, else a heuristic from linear_triton's bf16 sweep (4 rows x 2048
    columns, 8 warps, 16 KiB of weight a tile) kept at 2048 columns a tile: 8 rows at 4 bits
    (8 KiB of nibbles), 4 rows at 8 bits; split-K while N gives fewer than ~4 programs per SM.
    Not yet measured on a GPU: bench/quant.py sweeps tiles at the 8B shapes and reports both.
    2..8 rows: 64 x 128 dot tiles as linear_triton. More rows (prefill): 64 x 64 tiles over N
    and 64 rows of x, 3 stages."""
    tuned = TUNED.get((qtype, _row_bucket(num_rows), n, k))
    if tuned is not None:
        return tuned
    if num_rows == 1:
        block_n, block_k = (8, 2048) if bits == 4 else (4, 2048)
        num_programs = triton.cdiv(n, block_n)
        split_k = 1
        while (num_programs * split_k < 4 * _num_sms(device)
               and k >= 2 * split_k * block_k and split_k < 8):
            split_k *= 2
        return GGUFLinearConfig(block_n, block_k, 1, split_k, num_warps=8)
    if num_rows <= MAX_GEMV_ROWS:
        split_k = 4 if k >= 2 * n and k >= 8 * 128 else 1
        return GGUFLinearConfig(64, 128, 16, split_k, num_warps=4, num_stages=4)
    return GGUFLinearConfig(64, 64, 64, 1, num_warps=4, num_stages=3)


def check_packed(packed: PackedGGUF) -> None:
    n, k = packed.shape
    check_shape("scales", packed.scales, (n, k // GROUP_SIZE))
    check_dtype("scales", packed.scales, (torch.float16,))
    check_contiguous("scales", packed.scales)
    if packed.mins is not None:
        check_shape("mins", packed.mins, (n, k // GROUP_SIZE))
        check_dtype("mins", packed.mins, (torch.float16,))
        check_contiguous("mins", packed.mins)
    if packed.bits == 4:
        check_shape("qweight", packed.qweight, (n, k // 2))
        check_dtype("qweight", packed.qweight, (torch.uint8,))
    else:
        check_shape("qweight", packed.qweight, (n, k))
        check_dtype("qweight", packed.qweight, (torch.int8,))
    check_contiguous("qweight", packed.qweight)


def gguf_linear(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None,
                config: "GGUFLinearConfig | gguf_gemv_triton.GemvConfig | None" = None) -> torch.Tensor:
    """x: [M, K], last dim contiguous, 16-bit or float32; packed: W [N, K]; bias: [N] in x's dtype
    or None → new [M, N] in x's dtype.

    Without `config`, the fastest path measured on an H200 (bench/quant.py): up to
    `gguf_gemv_triton.GEMV_ROWS` rows the group-wise GEMV (weight read once, packed), more
    rows the weight dequantised by a Triton kernel into x's dtype and one cuBLAS GEMM (the tiled
    GEMM of this module's kernel was 10-30x slower than bf16 at prefill). A `GemvConfig` forces
    the GEMV, a `GGUFLinearConfig` this module's first kernel (tests, sweeps)."""
    check_shape("x", x, (None, None))
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    check_packed(packed)
    num_rows, k = x.shape
    n = packed.shape[0]
    if packed.shape[1] != k:
        raise ValueError(f"x: expected {packed.shape[1]} columns (the weight's K), got {k}")
    if bias is not None:
        check_shape("bias", bias, (n,))
        check_same_dtype(x=x, bias=bias)
        check_contiguous("bias", bias)
        check_same_device(x=x, qweight=packed.qweight, bias=bias)
    else:
        check_same_device(x=x, qweight=packed.qweight)
    if isinstance(config, gguf_gemv_triton.GemvConfig):
        if num_rows > gguf_gemv_triton.MAX_ROWS:
            raise ValueError(f"config: the GEMV takes at most {gguf_gemv_triton.MAX_ROWS} rows "
                             f"of x, got {num_rows}")
        return gguf_gemv_triton.gguf_gemv(x, packed, bias, config)
    if config is None:
        if num_rows <= gguf_gemv_triton.GEMV_ROWS:
            return gguf_gemv_triton.gguf_gemv(x, packed, bias)
        return torch.nn.functional.linear(x, gguf_gemv_triton.dequantize(packed, x.dtype), bias)
    use_dot = config.block_m > 1
    if config.block_k % GROUP_SIZE:
        raise ValueError(f"config: block_k must be a multiple of {GROUP_SIZE}, got {config.block_k}")
    if use_dot and (config.block_m < 16 or config.block_n < 16):
        raise ValueError("config: the dot path needs block_m ≥ 16 and block_n ≥ 16")
    if not use_dot and num_rows != 1:
        raise ValueError(f"config: block_m 1 (the fma path) takes one row of x, got {num_rows}")
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    num_k_tiles = max(1, triton.cdiv(k, config.block_k))
    split_k = min(config.split_k, num_k_tiles)
    k_per_split = triton.cdiv(num_k_tiles, split_k) * config.block_k
    split_k = triton.cdiv(num_k_tiles * config.block_k, k_per_split)     # no empty split
    partial = (torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(num_rows, config.block_m))
    mins = packed.mins if packed.mins is not None else packed.scales
    _gguf_linear_kernel[grid](
        x, packed.qweight, packed.scales, mins, bias if bias is not None else out, out, partial,
        num_rows, n, k, k_per_split, x.stride(0), packed.qweight.stride(0), packed.scales.stride(0),
        out.stride(0),
        BITS=packed.bits, ZERO_POINT=packed.zero_point, HAS_MIN=packed.mins is not None,
        HAS_BIAS=bias is not None, USE_DOT=use_dot, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        block = 1024
        linear_triton._split_k_sum_kernel[(num_rows, triton.cdiv(n, block))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, num_warps=4,
        )
    return out
