"""Triton: dynamic per-token FP8 quantisation of activations (reference:
`fp8_linear.quantize_rows_ref`), then the FP8 product through `torch._scaled_mm`.

One program per row of x. A row of up to ONE_PASS_COLS columns (every projection input of an
8B model: 4,096, and silu · mul's 14,336) is loaded once into registers, its absmax taken and
x / scale written in e4m3 (saturated to ±448, rounded to nearest even in fp32 as the KV-cache
writes do, so the interpreter agrees with the GPU) with the scale. A longer row takes two
passes tile by tile (absmax, then the row again from L2). The same kernel quantises
silu(gate) · up of a gate_up projection's output (`silu_mul_triton.silu_and_mul_fp8`). One launch
instead of torch's four (abs, amax, div, cast).

Each element is multiplied by 1/scale (one exact division a row, as vLLM's kernels do) and
converted by the GPU's own e4m3 instruction. The first version ran two passes over 1-2K-column
tiles with 4 warps and divided every element: on W3 (FP8, one H200) its launches took 2.03 ms a
step (11% of the device time) against 0.43 ms for bf16's silu · mul; one pass gave 1.69, the
division and conversion 1.48 (`bench/results/quant-issue15i-H200-8b-2026-11-29.json`). Why it is
still 3.4x bf16's silu · mul over the same bytes is not measured yet.
"""
import functools

import torch
import triton
import triton.language as tl

from replica.kernels import fp8_gemv_triton, kv_cache_write_triton, pdl
from replica.kernels.checks import check_dtype, check_last_dim_contiguous, check_shape, check_contiguous
from replica.kernels.fp8_linear import FP8_DTYPE, FP8_MAX, MIN_SCALE, Fp8Rows


# cuBLASLt's FP8 GEMM accumulating in the tensor cores' own precision, without promoting to fp32
# every few K tiles: what vLLM's CUTLASS FP8 kernels for Hopper do (their "FP8FastAccum"
# schedules). 0-12% faster at the 8B shapes (`fp8-gemm-H200-2026-11-29.json`), W3 45.5 against
# 43.3 requests/s (`quant-issue15i-H200-8b-2026-11-29.json`); the products stay within 1% of the
# exact W8A8 reference at K = 14,336 (tests/kernels/test_quant_fp8.py, GPU).
FAST_ACCUM = True
ONE_PASS_COLS = 16384      # rows up to this many columns are quantised from registers, in one read


@triton.jit
def _row_tile(x_row, start, num_cols, BLOCK_K: tl.constexpr, SILU: tl.constexpr):
    """Columns [start, start + BLOCK_K) of the row being quantised, fp32: x itself, or with SILU
    silu(gate) · up of x = [gate | up] rounded to x's dtype (what `silu_mul_triton` would store)."""
    cols = start + tl.arange(0, BLOCK_K)
    mask = cols < num_cols
    if SILU:
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + num_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = (gate * tl.sigmoid(gate) * up).to(x_row.dtype.element_ty).to(tl.float32)
    else:
        y = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    return y, cols, mask


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                            FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, BLOCK_K: tl.constexpr,
                            SILU: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:            # BLOCK_K ≥ K: the whole row in registers
        y, cols, mask = _row_tile(x_row, 0, K, BLOCK_K, SILU)
        scale = tl.maximum(tl.max(tl.abs(y), 0) / FP8_MAX_, MIN_SCALE_)
        inv_scale = tl.math.div_rn(1.0, scale)      # one exact division a row; x · (1/scale) as vLLM's kernels
        tl.store(q_ptr + row * stride_qm + cols, kv_cache_write_triton.to_cache_dtype(y * inv_scale, q_ptr), mask=mask)
        tl.store(scale_ptr + row, scale)
        return
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        y, cols, mask = _row_tile(x_row, k, K, BLOCK_K, SILU)
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_, MIN_SCALE_)
    inv_scale = tl.math.div_rn(1.0, scale)
    for k in range(0, K, BLOCK_K):     # the row again (from L2), now quantised
        y, cols, mask = _row_tile(x_row, k, K, BLOCK_K, SILU)
        tl.store(q_ptr + row * stride_qm + cols, kv_cache_write_triton.to_cache_dtype(y * inv_scale, q_ptr),
                 mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_per_token(x: torch.Tensor, block_k: int = 1024, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float, last dim contiguous → (x_q [M, K] e4m3, x_scale [M, 1] fp32).
    silu: x is [M, 2 K] = [gate | up] and silu(gate) · up is quantised (`silu_mul_triton`).
    block_k: the tile of the two-pass path, for rows longer than ONE_PASS_COLS."""
    check_shape("x", x, (None, None))
    check_dtype("x", x, (torch.bfloat16, torch.float16, torch.float32))
    check_last_dim_contiguous("x", x)
    if silu and x.shape[1] % 2:
        raise ValueError(f"x: last dimension must be even ([gate | up]), got shape {list(x.shape)}")
    num_rows, k = x.shape[0], x.shape[1] // 2 if silu else x.shape[1]
    x_q = torch.empty(num_rows, k, dtype=FP8_DTYPE, device=x.device)
    x_scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows and k:
        one_pass = triton.next_power_of_2(k) <= ONE_PASS_COLS
        block = triton.next_power_of_2(k) if one_pass else min(block_k, triton.next_power_of_2(k))
        _per_token_quant_kernel[(num_rows,)](
            x, x_q, x_scale, k, x.stride(0), x_q.stride(0),
            FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE, BLOCK_K=block, SILU=silu, ONE_PASS=one_pass,
            **pdl.launch_options(x.device), num_warps=min(16, max(4, block // 1024)))
    return x_q, x_scale


@functools.cache
def has_rowwise_scaled_mm(device: torch.device) -> bool:
    """cuBLASLt takes per-row / per-column scales on Hopper (sm90) and later."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def takes_fp8_rows(num_rows: int, dtype: torch.dtype) -> bool:
    """Whether `fp8_linear` would quantise x of this many rows per token (W8A8), so that x's
    producer may write `Fp8Rows` instead (`fp8_rows_linear`)."""
    is_16_bit = dtype in (torch.bfloat16, torch.float16)
    return not (is_16_bit and num_rows <= max(fp8_gemv_triton.GEMV_ROWS, fp8_gemv_triton.DOT_ROWS))


def _check_weight(w_q: torch.Tensor, w_scale: torch.Tensor, k: int) -> None:
    n = w_q.shape[0]
    check_shape("w_q", w_q, (None, k))
    check_dtype("w_q", w_q, (FP8_DTYPE,))
    check_contiguous("w_q", w_q)
    check_shape("w_scale", w_scale, (n,))
    check_dtype("w_scale", w_scale, (torch.float32,))
    if k % 16 or n % 16:
        raise ValueError(f"w_q: FP8 matmuls need K and N multiples of 16, got [{n}, {k}]")


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float on CUDA; w_q: [N, K] e4m3 contiguous; w_scale: [N] fp32; bias: [N] or
    None → [M, N] in x's dtype. K and N must be multiples of 16 (cuBLASLt's FP8 rule).
    Up to `fp8_gemv_triton.GEMV_ROWS` 16-bit rows (decode) run the weight-only FP8 GEMV
    (x not quantised), up to `DOT_ROWS` (off until measured) its tensor-core variant; more rows
    W8A8 through `torch._scaled_mm`."""
    check_shape("x", x, (None, None))
    _check_weight(w_q, w_scale, x.shape[1])
    if x.shape[0] <= fp8_gemv_triton.GEMV_ROWS and x.dtype in (torch.bfloat16, torch.float16):
        return fp8_gemv_triton.fp8_gemv(x, w_q, w_scale, bias)   # decode: weight-only, faster
    if x.shape[0] <= fp8_gemv_triton.DOT_ROWS and x.dtype in (torch.bfloat16, torch.float16):
        return fp8_gemv_triton.fp8_dot(x, w_q, w_scale, bias)
    return _scaled_product(Fp8Rows(*quantize_per_token(x), x.dtype), w_q, w_scale, bias)


def fp8_rows_linear(rows: Fp8Rows, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 of activations quantised by their producer: rows.q [M, K] e4m3, rows.scale [M, 1]
    fp32 → [M, N] in rows.dtype."""
    check_dtype("rows.q", rows.q, (FP8_DTYPE,))
    check_shape("rows.scale", rows.scale, (rows.q.shape[0], 1))
    _check_weight(w_q, w_scale, rows.q.shape[1])
    return _scaled_product(rows, w_q, w_scale, bias)


def _scaled_product(rows: Fp8Rows, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    n = w_q.shape[0]
    if rows.dtype == torch.bfloat16 and has_rowwise_scaled_mm(rows.q.device):
        out = torch._scaled_mm(rows.q, w_q.t(), scale_a=rows.scale, scale_b=w_scale.view(1, n),
                               out_dtype=rows.dtype, use_fast_accum=FAST_ACCUM)
    else:
        one = torch.ones((), dtype=torch.float32, device=rows.q.device)
        out = (torch._scaled_mm(rows.q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                use_fast_accum=FAST_ACCUM) * rows.scale * w_scale.view(1, n)).to(rows.dtype)
    if bias is not None:
        out += bias
    return out
