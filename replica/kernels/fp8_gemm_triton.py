"""Triton: the W8A8 product of per-token FP8 rows and a per-channel FP8 weight, on the tensor cores.

    out[m, n] = x_scale[m] · w_scale[n] · Σ_k x_q[m, k] · w_q[n, k]      (fp32 accumulation)

Reference: `fp8_linear.fp8_rows_linear_ref`. Why a kernel beside `torch._scaled_mm`: at the
64-1024 rows of a batched decode or mixed step, cuBLASLt runs one 128 × 128 tile for every
Llama-3-8B projection, and o_proj's and down_proj's N = 4096 then make 2-8 × 32 tiles for 132
SMs, most of a wave idle. Smaller tiles fill the GPU there (`bench/fp8_gemm.py` measures both;
`choose_config` holds what it found, and None where cuBLASLt won).

Tiles: program (pid_m, pid_n) owns out[BLOCK_M rows, BLOCK_N columns]; programs are grouped
GROUP_M tiles of M at a time along N, so that a group's weight tiles are read from L2 while hot:

    pid:  0 1 2 3 | 4 5 6 7 | ...        (GROUP_M = 2: pids 0, 1 are rows 0, 1 of column 0)
          ┌───┬───┬───┬───
    m 0   │ 0 │ 2 │ 4 │ 6      each step of K: x_q[BLOCK_M, BLOCK_K] · w_q[BLOCK_N, BLOCK_K]ᵀ
    m 1   │ 1 │ 3 │ 5 │ 7
          └───┴───┴───┴───
Shape contract: x_q [M, K] e4m3 (last dim contiguous), w_q [N, K] e4m3 contiguous, K a multiple
of BLOCK_K (no masks along K), x_scale [M, 1] and w_scale [N] fp32, out [M, N] in the rows' dtype.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import check_contiguous, check_dtype, check_last_dim_contiguous, check_shape
from replica.kernels.fp8_linear import FP8_DTYPE, Fp8Rows


class Fp8GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# candidates that `bench/fp8_gemm.py` sweeps
CONFIGS = (
    Fp8GemmConfig(64, 64, 128, 4, 4),
    Fp8GemmConfig(64, 128, 128, 4, 4),
    Fp8GemmConfig(128, 64, 128, 4, 4),
    Fp8GemmConfig(128, 128, 128, 8, 3),
    Fp8GemmConfig(64, 256, 128, 8, 3),
    Fp8GemmConfig(128, 256, 128, 8, 3),
)


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_xm, stride_om, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_tile = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]          # [BLOCK_M, BLOCK_K]
    w_tile = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]                  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_tile, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_tile, mask=col_ok[None, :], other=0.0)
        # a fresh accumulator per K tile: Hopper's FP8 MMA accumulates in reduced precision, so
        # the tile's sum is added to the fp32 total every BLOCK_K (Triton's default on sm_90
        # never promotes: 2% of the 8B outputs were off by up to 1.5)
        acc += tl.dot(x, w)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    x_scale = tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fp8_gemm(rows: Fp8Rows, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: Fp8GemmConfig = CONFIGS[1]) -> torch.Tensor:
    """rows.q [M, K] e4m3, rows.scale [M, 1] fp32; w_q [N, K] e4m3; w_scale [N] fp32; bias [N] or
    None → [M, N] in rows.dtype."""
    check_shape("rows.q", rows.q, (None, None))
    num_rows, k = rows.q.shape
    check_dtype("rows.q", rows.q, (FP8_DTYPE,))
    check_last_dim_contiguous("rows.q", rows.q)
    check_shape("rows.scale", rows.scale, (num_rows, 1))
    check_contiguous("rows.scale", rows.scale)
    check_shape("w_q", w_q, (None, k))
    check_dtype("w_q", w_q, (FP8_DTYPE,))
    check_contiguous("w_q", w_q)
    n = w_q.shape[0]
    check_shape("w_scale", w_scale, (n,))
    check_dtype("w_scale", w_scale, (torch.float32,))
    if bias is not None:
        check_shape("bias", bias, (n,))
        check_contiguous("bias", bias)
    if rows.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8_gemm writes bf16, fp16 or fp32, got rows.dtype {rows.dtype}")
    if k % config.block_k:
        raise ValueError(f"fp8_gemm: K = {k} is not a multiple of block_k {config.block_k}")
    out = torch.empty(num_rows, n, dtype=rows.dtype, device=rows.q.device)
    if num_rows == 0 or n == 0:
        return out
    grid = (triton.cdiv(num_rows, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        rows.q, w_q, rows.scale, w_scale, bias if bias is not None else w_scale, out, num_rows, n, k,
        rows.q.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        **pdl.launch_options(rows.q.device), num_warps=config.num_warps, num_stages=config.num_stages)
    return out
