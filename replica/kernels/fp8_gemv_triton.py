"""Triton: out = x @ (w_q · w_scale)^T for a few rows of x, W held as e4m3 [N, K] with one fp32
scale per output row. Weight-only at decode: x stays in its 16-bit dtype (no per-token FP8
quantisation, so this is more accurate than the W8A8 path, never less).

Why: at 1..64 rows `torch._scaled_mm` (cuBLASLt FP8) was slower than the bf16 skinny GEMV on an
H200 (bench/quant.py: 0.58-0.87x at the 8B qkv and down shapes), although it reads half the
bytes. Decode is a weight stream; this kernel is the bf16 skinny kernel's fma path
(`linear_triton`) with 1-byte weights: a [BLOCK_N, BLOCK_K] e4m3 tile (16-byte loads), converted
to fp32 in registers, one FMA per element and x row, the row scale applied once at the end.
SPLIT_K > 1 writes scaled fp32 partials summed by linear_triton's split-K kernel.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import linear_triton, pdl

MAX_ROWS = 16         # rows of x the kernel takes (its cost grows with the rows)
# rows up to which `fp8_quant_triton.fp8_linear` takes this kernel; above, W8A8 _scaled_mm.
# Measured on an H200 at the 8B shapes (bench/quant.py, fp8_kernels): 1 and 2 rows win
# everywhere (1.1-1.8x bf16 at 1 row), 4 rows lose to _scaled_mm on gate_up.
GEMV_ROWS = 2
# rows up to which `fp8_linear` takes `fp8_dot` (after the GEMV's rows); 2 = off: not measured yet
DOT_ROWS = 2


@dataclass(frozen=True)
class Fp8GemvConfig:
    block_n: int = 8
    block_k: int = 1024
    split_k: int = 1
    num_warps: int = 4


TUNED: dict[tuple[int, int, int], Fp8GemvConfig] = {}    # (rows of x, N, K) → measured config


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr,
                     N, K, k_per_split, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    pid_k = tl.program_id(1)
    rows, n_mask, rows64 = linear_triton.gemv_program_rows(N, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    k_start = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :]).to(tl.float32)
        else:
            w = tl.load(w_ptr + rows64[:, None] * stride_wn + cols[None, :],
                        mask=(cols < K)[None, :], other=0.0).to(tl.float32)
        for mi in tl.static_range(M):
            x = tl.load(x_ptr + mi * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
            contrib = tl.sum(w * x[None, :], axis=1)
            acc = tl.where(ms[None, :] == mi, acc + contrib[:, None], acc)
    acc *= tl.load(scale_ptr + rows64)[:, None]
    linear_triton.gemv_store_tile(acc, rows, n_mask, ms, ms < M, pid_k, bias_ptr, out_ptr, partial_ptr,
                                  M, N, stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _fp8_dot_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr,
                    M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    # linear_triton's dot path (W on the MMA's large side, x padded to 16 rows) with e4m3 tiles
    # converted to x's dtype in registers and the row scale applied once at the end
    pid_k = tl.program_id(1)
    rows, n_mask, rows64 = linear_triton.gemv_program_rows(N, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows64[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + ms[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (offs_k + k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + rows64)[:, None]
    linear_triton.gemv_store_tile(acc, rows, n_mask, ms, m_mask, pid_k, bias_ptr, out_ptr, partial_ptr,
                                  M, N, stride_om, HAS_BIAS, SPLIT_K)


def fp8_dot(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """x: [M ≤ 16, K] bf16/fp16 → [M, N]: weight-only like `fp8_gemv`, on the tensor cores
    (64 x 128 tiles, 4 stages, as linear_triton's dot path). For 3..16 rows; not yet measured
    on a GPU, so `DOT_ROWS` keeps it off by default (bench/quant.py measures it)."""
    num_rows, k = x.shape
    n = w_q.shape[0]
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    block_n, block_k = 64, 128
    if split_k is None:
        split_k = 4 if k >= 2 * n and k >= 8 * block_k else 1
    num_k_tiles = triton.cdiv(k, block_k)
    split_k = max(1, min(split_k, num_k_tiles))
    k_per_split = triton.cdiv(num_k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    partial = (torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    _fp8_dot_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w_q, w_scale, bias if bias is not None else out, out, partial,
        num_rows, n, k, k_per_split, x.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=k % k_per_split == 0, **pdl.launch_options(x.device), num_warps=4, num_stages=4,
    )
    if split_k > 1:
        linear_triton._split_k_sum_kernel[(num_rows, triton.cdiv(n, 1024))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=1024, **pdl.launch_options(x.device), num_warps=4,
        )
    return out


def choose_config(num_rows: int, n: int, k: int, device: torch.device) -> Fp8GemvConfig:
    """A measured entry of TUNED, else 8 rows x 1024 columns (8 KiB of e4m3 a tile), split-K
    while the grid has fewer than ~8 programs per SM."""
    tuned = TUNED.get((num_rows, n, k))
    if tuned is not None:
        return tuned
    block_n, block_k = 8, 1024
    split_k = 1
    while (triton.cdiv(n, block_n) * split_k < 8 * linear_triton._num_sms(device)
           and k >= 2 * split_k * block_k and split_k < 16):
        split_k *= 2
    return Fp8GemvConfig(block_n, block_k, split_k)


def fp8_gemv(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, config: Fp8GemvConfig | None = None) -> torch.Tensor:
    """x: [M ≤ MAX_ROWS, K] 16-bit or fp32, last dim contiguous; w_q [N, K] e4m3 contiguous; w_scale [N]
    fp32 (checked by the caller, `fp8_quant_triton.fp8_linear`) → [M, N] in x's dtype."""
    num_rows, k = x.shape
    n = w_q.shape[0]
    config = config or choose_config(num_rows, n, k, x.device)
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0 or num_rows == 0:
        return out
    block_k = min(config.block_k, triton.next_power_of_2(k))
    num_k_tiles = triton.cdiv(k, block_k)
    split_k = max(1, min(config.split_k, num_k_tiles))
    k_per_split = triton.cdiv(num_k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    partial = (torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, w_q, w_scale, bias if bias is not None else out, out, partial,
        n, k, k_per_split, x.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, M=num_rows, BLOCK_M=triton.next_power_of_2(num_rows),
        BLOCK_N=config.block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=k % k_per_split == 0,      # else the last split's tiles may run past K: masked
        **pdl.launch_options(x.device), num_warps=config.num_warps, num_stages=1,
    )
    if split_k > 1:
        block = 1024
        linear_triton._split_k_sum_kernel[(num_rows, triton.cdiv(n, block))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, **pdl.launch_options(x.device), num_warps=4,
        )
    return out
