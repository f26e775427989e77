"""Triton: RMSNorm, plain and fused with the residual add (references: `rms_norm.rms_norm_ref`,
`rms_norm.fused_add_rms_norm_ref`).

One program per row; the whole row (hidden ≤ 64K) sits in registers, so x is read once and the
sum of squares, the scaling and the residual add happen in one pass. Rounding follows the
reference (transformers' LlamaRMSNorm): x + residual is rounded to the input dtype, normalised in
float32, rounded to the input dtype, then multiplied by the weight in the promoted dtype.
Rows are addressed as [outer, inner] with their own strides, so 3-D views such as the q/k slices of
a fused qkv projection ([T, heads, head_dim], token stride = qkv width) need no copy.

With FP8 output (`fused_add_rms_norm_fp8`, for a W8A8 projection) the program quantises its row
per token as `fp8_quant_triton.quantize_per_token` would quantise the bf16 output (the row is
already in registers: its absmax costs nothing), and writes e4m3 codes and a scale instead.
`split_k_sum_add_rms_norm` takes x as a split-K GEMV's fp32 partials (a decode GEMV of o_proj or
down_proj) and sums them first, rounding as the GEMV's own sum kernel would: one launch less.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import kv_cache_write_triton, pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_same_device, check_shape,
)
from replica.kernels.fp8_linear import FP8_DTYPE, FP8_MAX, MIN_SCALE, Fp8Rows

_MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, q_ptr, scale_ptr,
    inner, stride_x0, stride_x1, stride_r0, stride_r1, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, FP8_MAX_: tl.constexpr,
    MIN_SCALE_: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr,      # PDL: the weight (no kernel writes it) loaded before the wait (`pdl.EARLY_LOADS`)
):
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    if EARLY:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    outer_idx = row // inner
    inner_idx = row % inner
    x = tl.load(x_ptr + outer_idx * stride_x0 + inner_idx * stride_x1 + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + outer_idx * stride_r0 + inner_idx * stride_r1 + cols,
                           mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    if not EARLY:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        # the bf16 row the unfused path would have stored, quantised per token
        y = (normed * weight).to(out_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / FP8_MAX_, MIN_SCALE_)
        inv_scale = tl.math.div_rn(1.0, scale)
        tl.store(q_ptr + row * hidden + cols, kv_cache_write_triton.to_cache_dtype(y * inv_scale, q_ptr), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * hidden + cols, normed * weight, mask=mask)


def _as_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """View x as [outer, inner, hidden] without copying where its strides allow."""
    check_last_dim_contiguous(name, x)
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _launch(x, residual, weight, eps, quant: bool = False):
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("weight", weight, FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,))
    check_last_dim_contiguous("weight", weight)
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"x: hidden size {hidden} exceeds the kernel's one-row limit {_MAX_HIDDEN}")
    rows = _as_rows("x", x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if quant:      # e4m3 codes and a scale a row instead of the output; `out` only gives its dtype
        out = torch.empty((), dtype=out_dtype, device=x.device)
        q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        q, scale = out, out
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual: expected shape {list(x.shape)} and dtype {x.dtype}, "
                             f"got {list(residual.shape)} and {residual.dtype}")
        check_same_device(x=x, residual=residual, weight=weight)
        residual_rows = _as_rows("residual", residual)
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_same_device(x=x, weight=weight)
        residual_rows, residual_out = rows, out
    num_rows = rows.shape[0] * rows.shape[1]
    if num_rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            rows, residual_rows, weight, out, residual_out, q, scale,
            rows.shape[1], rows.stride(0), rows.stride(1),
            residual_rows.stride(0), residual_rows.stride(1), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, QUANT=quant, FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE,
            **pdl.launch_options(rows.device), EARLY=pdl.uses_pdl(rows.device) and pdl.EARLY_LOADS, num_warps=4 if block <= 1024 else 8 if block <= 8192 else 16,
        )
    return (Fp8Rows(q, scale, out_dtype) if quant else out), residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] (last dim contiguous); weight: [hidden] → new tensor like x, dtype
    promote(weight, x)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; inputs are not modified."""
    return _launch(x, residual, weight, eps)


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[Fp8Rows, torch.Tensor]:
    """x: [M, hidden] → (rms_norm(x + residual) quantised per row to e4m3, x + residual); with
    residual None, (rms_norm(x) quantised, x)."""
    check_shape("x", x, (None, None))
    rows, residual_out = _launch(x, residual, weight, eps, quant=True)
    return rows, (x if residual is None else residual_out)


@triton.jit
def _split_k_sum_add_rms_norm_kernel(
    partial_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, M, N, stride_r, eps,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + (s * M + row) * N + cols, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
    # the projection's output rounded as the GEMV would store it, then _rms_norm_kernel's steps
    x = (acc.to(residual.dtype).to(tl.float32) + residual.to(tl.float32)).to(residual.dtype)
    tl.store(residual_out_ptr + row * N + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / N + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, normed * weight, mask=mask)


def split_k_sum_add_rms_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """partial: [S, M, N] fp32 (a GEMV's split-K partials of h = x @ W^T); residual: [M, N] →
    (rms_norm(h + residual), h + residual), h rounded to residual's dtype first: the same values
    as `fused_add_rms_norm` after the GEMV's own sum kernel."""
    check_shape("partial", partial, (None, None, None))
    check_dtype("partial", partial, (torch.float32,))
    num_splits, num_rows, hidden = partial.shape
    check_shape("residual", residual, (num_rows, hidden))
    check_dtype("residual", residual, FLOAT_DTYPES)
    check_last_dim_contiguous("residual", residual)
    check_shape("weight", weight, (hidden,))
    if not partial.is_contiguous():
        raise ValueError("partial: must be contiguous")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"residual: hidden size {hidden} exceeds the kernel's one-row limit {_MAX_HIDDEN}")
    out = torch.empty(num_rows, hidden, dtype=torch.promote_types(weight.dtype, residual.dtype),
                      device=residual.device)
    residual_out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    if num_rows > 0:
        block = triton.next_power_of_2(hidden)
        _split_k_sum_add_rms_norm_kernel[(num_rows,)](
            partial, residual, weight, out, residual_out, num_rows, hidden, residual.stride(0), eps,
            SPLIT_K=num_splits, BLOCK=block, **pdl.launch_options(residual.device),
            num_warps=4 if block <= 1024 else 8 if block <= 8192 else 16)
    return out, residual_out
