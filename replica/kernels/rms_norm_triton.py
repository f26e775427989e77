"""Triton: RMSNorm, plain and fused with the residual add (references: `rms_norm.rms_norm_ref`,
`rms_norm.fused_add_rms_norm_ref`).

One program per row; the whole row (hidden ≤ 64K) sits in registers, so x is read once and the
sum of squares, the scaling and the residual add happen in one pass. Rounding follows the
reference (transformers' LlamaRMSNorm): x + residual is rounded to the input dtype, normalised in
float32, rounded to the input dtype, then multiplied by the weight in the promoted dtype.
Rows are addressed as [outer, inner] with their own strides, so 3-D views such as the q/k slices of
a fused qkv projection ([T, heads, head_dim], token stride = qkv width) need no copy.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_same_device, check_shape,
)

_MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    inner, stride_x0, stride_x1, stride_r0, stride_r1, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    outer_idx = row // inner
    inner_idx = row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + outer_idx * stride_x0 + inner_idx * stride_x1 + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + outer_idx * stride_r0 + inner_idx * stride_r1 + cols,
                           mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
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


def _launch(x, residual, weight, eps):
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
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
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
            rows, residual_rows, weight, out, residual_out,
            rows.shape[1], rows.stride(0), rows.stride(1),
            residual_rows.stride(0), residual_rows.stride(1), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            **pdl.launch_options(rows.device), num_warps=4 if block <= 1024 else 8 if block <= 8192 else 16,
        )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] (last dim contiguous); weight: [hidden] → new tensor like x, dtype
    promote(weight, x)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; inputs are not modified."""
    return _launch(x, residual, weight, eps)
