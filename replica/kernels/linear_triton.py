"""Triton: out = x @ weight^T (+ bias) for a few rows of x, weight [N, K] row-major as F.linear
takes it (reference: `torch.nn.functional.linear`).

Decode at batch 1..8 is a chain of matrix-vector products: each weight byte is read once and used
by M ≤ 8 rows, so the time floor is weight bytes / memory bandwidth (bench/NOTES.md, "W2 decode").
The kernel's only job is to keep enough 16-byte weight loads in flight on every SM.

    weight [N, K]            program (n, s) of the grid (cdiv(N, BLOCK_N), SPLIT_K)
    ┌───────────────┐        owns BLOCK_N rows and the s-th run of k_per_split columns
    │    │ s │      │ BLOCK_N  (whole BLOCK_K tiles), loops over that run tile by tile
    └───────────────┘

- M == 1 ("fma" path, BLOCK_M = 1): each tile is multiplied by the matching slice of x in fp32
  registers and summed element-wise; the one reduction over K happens after the loop. No shared
  memory, no tensor cores: nothing but the loads on the critical path.
- 1 < M ≤ 8 ("dot" path, BLOCK_M = 16): tl.dot(weight tile, x tileᵀ) on the tensor cores, the
  weight tile on the MMA's large side (swap-AB), x's rows padded to 16 with zeros.

SPLIT_K > 1 cuts K when N alone gives too few programs: each program writes an fp32 partial
[SPLIT_K, M, N] and a second kernel sums the partials, adds the bias and rounds once.
Accumulation is fp32 throughout; the output is rounded once to x's dtype. The grid depends only
on shapes: the launch is valid inside a CUDA graph.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_contiguous, check_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape, dot_precision,
)

MAX_ROWS = 8   # rows of x this kernel is for; larger batches go to cuBLAS (F.linear)
# The weights' loads evicted first from L1 and L2 (read once a step, x by every program), and a
# split of at most UNROLL_TILES BLOCK_K tiles run as straight-line code (0: the loop), as the 4-bit
# GEMV does. W2 bf16 on an 8B, H200, one process (bench/results/decode-parts-ab-bf16-stream-unroll-
# H200-2026-12-01.json): neither 243.7, evict-first 246.8, unrolled 245.1, both 248.7 tok/s.
STREAM_WEIGHTS = True
UNROLL_TILES = 8


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    STREAM: tl.constexpr = False,     # the weights' loads evicted first (STREAM_WEIGHTS)
    TILES: tl.constexpr = 0,          # > 0: a split's BLOCK_K tiles unrolled (UNROLL_TILES); 0: a loop
):
    pdl.wait_and_release(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # weight rows = output columns
    n_mask = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    k_start = pid_k * k_per_split                           # k_per_split: whole BLOCK_K tiles
    offs_k = k_start + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + ms[:, None] * stride_xm + offs_k[None, :]
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if TILES > 0:       # straight-line: every tile's loads issued before the first product
        for t in tl.static_range(TILES):
            acc = _skinny_tile(acc, w_ptrs + t * BLOCK_K, x_ptrs + t * BLOCK_K, t * BLOCK_K, offs_k, n_mask, m_mask,
                               K, USE_DOT, EVEN_N, EVEN_K, DOT_PRECISION, STREAM)
    else:
        for k in range(0, k_per_split, BLOCK_K):
            acc = _skinny_tile(acc, w_ptrs, x_ptrs, k, offs_k, n_mask, m_mask, K, USE_DOT, EVEN_N, EVEN_K,
                               DOT_PRECISION, STREAM)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K

    if USE_DOT:
        result = acc                                        # [BLOCK_N, BLOCK_M]
    else:
        result = tl.sum(acc, 1)[:, None]                    # [BLOCK_N, 1]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
            result += bias[:, None]
        tl.store(out_ptr + ms[None, :] * stride_om + rows[:, None],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial: [SPLIT_K, M, N] fp32, summed by _split_k_sum_kernel
        tl.store(partial_ptr + (pid_k * M + ms[None, :]) * N + rows[:, None], result, mask=out_mask)


@triton.jit
def _skinny_tile(acc, w_ptrs, x_ptrs, k, offs_k, n_mask, m_mask, K, USE_DOT: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, STREAM: tl.constexpr):
    """One BLOCK_K tile of W (rows) against x, k columns into the split, added to acc."""
    policy: tl.constexpr = "evict_first" if STREAM else ""
    if EVEN_N and EVEN_K:
        w = tl.load(w_ptrs, eviction_policy=policy)
    else:
        k_mask = (offs_k + k) < K
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy=policy)
    if EVEN_K:
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
    else:
        x = tl.load(x_ptrs, mask=m_mask[:, None] & ((offs_k + k) < K)[None, :], other=0.0)
    # one return: Triton compiles the statements after a constexpr branch's return too
    if USE_DOT:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc += w.to(tl.float32) * x.to(tl.float32)         # x: [1, BLOCK_K], broadcast over rows
    return acc


@triton.jit
def gemv_program_rows(N, BLOCK_N: tl.constexpr):
    """The rows of W that program (n, ·) of a GEMV grid owns → (rows, their mask, rows clamped to
    N − 1 as int64: loads through the clamped rows need no mask, stores use the mask)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, tl.minimum(rows, N - 1).to(tl.int64)


@triton.jit
def gemv_store_tile(acc, rows, n_mask, ms, m_mask, pid_k, bias_ptr, out_ptr, partial_ptr, M, N,
                    stride_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """A GEMV program's fp32 tile acc [BLOCK_N rows of W, BLOCK_M rows of x] → out[ms, rows]
    (+ bias, rounded once), or with SPLIT_K > 1 its partial [SPLIT_K, M, N] for
    _split_k_sum_kernel."""
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + ms[None, :] * stride_om + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(partial_ptr + (pid_k * M + ms[None, :]).to(tl.int64) * N + rows[:, None], acc,
                 mask=out_mask)


@triton.jit
def gemv_store_row(result, mi, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                   M: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
    """A GEMV program's fp32 result [BLOCK_N] for row mi of x → out[mi, rows] (+ bias, rounded
    once), or with SPLIT_K > 1 its partial [SPLIT_K, M, N] for _split_k_sum_kernel.
    GATED (SPLIT_K 1; rows alternate gate, up: `q4_word_dot_triton.packed_gemv_lanes`):
    silu(gate) · up into out[mi, N / 2 columns], gate and up first rounded to out's dtype as an
    unfused projection would have stored them for `silu_mul_triton`."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
        if GATED:
            pairs = result.to(out_ptr.dtype.element_ty).to(tl.float32)
            gate, up = tl.split(tl.reshape(pairs, [pairs.shape[0] // 2, 2]))
            cols = tl.program_id(0) * (pairs.shape[0] // 2) + tl.arange(0, pairs.shape[0] // 2)
            tl.store(out_ptr + mi * stride_om + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
                     mask=cols < N // 2)
        else:
            tl.store(out_ptr + mi * stride_om + rows, result.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(partial_ptr + (pid_k * M + mi).to(tl.int64) * N + rows, result, mask=n_mask)


@triton.jit
def gemv_store_rows(tot0, tot1, tot2, tot3, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                    M: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
    """The packed GEMVs' epilogue: accumulators [BLOCK_N, lanes] of rows 0..M-1 of x (M ≤ 4),
    each summed over its lanes and stored by `gemv_store_row`."""
    gemv_store_row(tl.sum(tot0, axis=1), 0, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                   M, HAS_BIAS, SPLIT_K, GATED)
    if M > 1:
        gemv_store_row(tl.sum(tot1, axis=1), 1, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                       M, HAS_BIAS, SPLIT_K, GATED)
    if M > 2:
        gemv_store_row(tl.sum(tot2, axis=1), 2, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                       M, HAS_BIAS, SPLIT_K, GATED)
    if M > 3:
        gemv_store_row(tl.sum(tot3, axis=1), 3, rows, n_mask, pid_k, bias_ptr, out_ptr, partial_ptr, N, stride_om,
                       M, HAS_BIAS, SPLIT_K, GATED)


@triton.jit
def _split_k_sum_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om,
                        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + (s * M + m) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8   # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_config(num_rows: int, n: int, k: int, device: torch.device) -> LinearConfig:
    """Tile shapes from the sweep in bench/profile_decode.py (H100, bf16, Llama-3-8B shapes;
    bench/NOTES.md, "W2 decode").

    M == 1: 4 rows x 2048 columns a tile, 8 warps (8 loads of 16 bytes in flight per thread)
    was within 1.5 % of the best of 19 tilings on every shape. Split-K only when N gives fewer
    than ~4 programs per SM: at N = 4096 (1024 programs) splitting measured 5–10 % slower.
    M > 1: 64 x 128 tiles, 4 stages, beat cuBLAS on all shapes but down_proj (N = 4096,
    K = 14336), which wants K split 4 ways (64 programs alone leave half the SMs idle)."""
    if num_rows == 1:
        config = LinearConfig(block_n=4, block_k=2048, num_warps=8)
        num_programs = triton.cdiv(n, config.block_n)
        split_k = 1
        while (num_programs * split_k < 4 * _num_sms(device)
               and k >= 2 * split_k * config.block_k and split_k < 8):
            split_k *= 2
    else:
        config = LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=4)
        split_k = 4 if k >= 2 * n and k >= 8 * config.block_k else 1
    return LinearConfig(config.block_n, config.block_k, split_k, config.num_warps, config.num_stages)


def is_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear` takes these arguments: 2-D x of 1..MAX_ROWS rows, weight rows
    contiguous, 16-bit or float32, same dtype and device."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and weight.dim() == 2
            and x.shape[1] == weight.shape[1] and x.dtype == weight.dtype
            and x.dtype in FLOAT_DTYPES and x.device == weight.device
            and x.stride(-1) == 1 and weight.is_contiguous())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: LinearConfig | None = None) -> torch.Tensor:
    """x: [M, K] with 1 ≤ M ≤ MAX_ROWS, last dim contiguous; weight: [N, K] contiguous;
    bias: [N] or None → new [M, N] in x's dtype. `config` overrides the tile choice (tests, sweep)."""
    check_shape("x", x, (None, None))
    num_rows, k = x.shape
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"x: expected 1..{MAX_ROWS} rows, got {num_rows} (use F.linear)")
    check_shape("weight", weight, (None, k))
    n = weight.shape[0]
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_dtype(x=x, weight=weight)
    check_last_dim_contiguous("x", x)
    check_contiguous("weight", weight)
    if bias is not None:
        check_shape("bias", bias, (n,))
        check_same_dtype(x=x, bias=bias)
        check_contiguous("bias", bias)
        check_same_device(x=x, weight=weight, bias=bias)
    else:
        check_same_device(x=x, weight=weight)
    config = config or choose_config(num_rows, n, k, x.device)
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    use_dot = num_rows > 1
    block_m = 16 if use_dot else 1
    if use_dot and config.block_n < 16:
        raise ValueError(f"config: the dot path (x with {num_rows} rows) needs block_n ≥ 16")
    num_k_tiles = max(1, triton.cdiv(k, config.block_k))
    split_k = min(config.split_k, num_k_tiles)
    k_per_split = triton.cdiv(num_k_tiles, split_k) * config.block_k
    split_k = triton.cdiv(num_k_tiles * config.block_k, k_per_split)   # no empty split
    partial = (torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    grid = (triton.cdiv(n, config.block_n), split_k)
    _skinny_linear_kernel[grid](
        x, weight, bias if bias is not None else out, out, partial,
        num_rows, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, USE_DOT=use_dot, BLOCK_M=block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
        EVEN_N=n % config.block_n == 0, EVEN_K=k % k_per_split == 0,
        DOT_PRECISION=dot_precision(x.dtype), STREAM=STREAM_WEIGHTS and x.is_cuda,
        TILES=k_per_split // config.block_k if k_per_split // config.block_k <= UNROLL_TILES else 0,
        **pdl.launch_options(x.device), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        block = 1024
        _split_k_sum_kernel[(num_rows, triton.cdiv(n, block))](
            partial, bias if bias is not None else out, out, num_rows, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, **pdl.launch_options(x.device), num_warps=4,
        )
    return out
