"""Triton: SiLU-and-multiply of the fused gate/up projection (reference:
`silu_mul.silu_and_mul_ref`).

x: [..., 2 * intermediate] laid out as [gate | up] → silu(gate) * up, computed in float32 and
rounded once (the reference rounds silu(gate) first, so the two may differ by one unit in the
last place of 16-bit dtypes). One pass: each element of x is read once, the output written once.

`silu_and_mul_fp8` (for a W8A8 down projection) quantises each output row per token instead, as
`fp8_quant_triton.quantize_per_token` would quantise the 16-bit output, in that kernel: one
program a row, a first pass for the row's absmax of the rounded products, a second that
recomputes them (cheaper than storing them) and writes e4m3 codes and the scale. One launch
instead of two.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous
from replica.kernels.fp8_linear import Fp8Rows

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, intermediate, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * intermediate + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * intermediate], last dim contiguous → new [..., intermediate], dtype of x."""
    check_dtype("x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x: last dimension must be even ([gate | up]), got shape {list(x.shape)}")
    check_last_dim_contiguous("x", x)
    intermediate = x.shape[-1] // 2
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = torch.empty((*x.shape[:-1], intermediate), dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0 and intermediate > 0:
        grid = (rows.shape[0], triton.cdiv(intermediate, _BLOCK))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), intermediate, BLOCK=_BLOCK,
                                   **pdl.launch_options(rows.device), num_warps=4)
    return out


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Rows:
    """x: [M, 2 * intermediate] (last dim contiguous) → silu(gate) * up, rounded to x's dtype,
    quantised per row: e4m3 [M, intermediate] and fp32 scales [M, 1] (one launch of
    `fp8_quant_triton`'s per-token kernel, which computes the products in its two passes)."""
    from replica.kernels.fp8_quant_triton import quantize_per_token
    return Fp8Rows(*quantize_per_token(x, block_k=2048, silu=True), x.dtype)
