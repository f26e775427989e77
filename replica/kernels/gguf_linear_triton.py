"""Triton: out = x @ W^T (+ bias) with W kept in GGUF's 4- or 8-bit groups
(`replica/quantization/gguf_packed.py`; reference: `gguf_linear.gguf_linear_ref`).
`gguf_linear` is the entry point the engine calls:

- up to `gguf_gemv_triton.GEMV_ROWS` rows of x (decode at small batch): the group-wise GEMV, the
  weight read once, packed;
- up to `gguf_mm_triton.MM_ROWS` rows (decode batches above that): the small-batch GEMM, W
  decoded in registers and multiplied on the tensor cores, read once, packed;
- more rows (prefill): the weight dequantised by a Triton kernel into x's dtype, then one
  cuBLAS GEMM. At 2048 rows that costs 1.05-1.14x bf16's time on an H200;
  a tiled dequantise-in-registers GEMM (this module's first kernel, removed) was 10-30x slower
  (bench/results/quant-issue15b-H200-8b-2026-11-28.json). A matrix above DEQUANT_WHOLE
  elements (an output head: 128k x 4096) is dequantised and multiplied DEQUANT_SLICE elements of
  rows at a time, so its bf16 copy never exists whole. The slice is below the 8B's largest
  projection (gate_up, 117M elements, dequantised whole), so that the head does not set the
  profiled activation peak that the KV cache's budget is reduced by: 512 MiB slices made a
  4-bit 8B's peak 0.53 GiB above bf16's (bench/results/quant-memory-H200-8b-2026-11-30.json).
"""
import torch

from replica.kernels import gguf_dequant_triton, gguf_gemv_triton, gguf_mm_triton
from replica.kernels.checks import (
    FLOAT_DTYPES, check_contiguous, check_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape,
)
from replica.kernels.gguf_linear import XInt8
from replica.quantization.gguf_packed import PackedGGUF

DEQUANT_WHOLE = 1 << 28     # elements of W up to which it is dequantised at once (512 MiB in bf16)
DEQUANT_SLICE = 1 << 26     # elements a slice of a larger W (128 MiB in bf16)


def check_packed(packed: PackedGGUF) -> None:
    n, k = packed.shape
    check_shape("scales", packed.scales, (n, k // packed.group_size))
    check_dtype("scales", packed.scales, (torch.int16,) if packed.super_scales is not None
                else (torch.int32,) if packed.is_paired else (torch.float16,))
    check_contiguous("scales", packed.scales)
    if packed.super_scales is not None:
        check_shape("super_scales", packed.super_scales, (n, k // 256, 2))
        check_dtype("super_scales", packed.super_scales, (torch.float16,))
        check_contiguous("super_scales", packed.super_scales)
    if packed.mins is not None:
        check_shape("mins", packed.mins, (n, k // packed.group_size))
        check_dtype("mins", packed.mins, (torch.float16,))
        check_contiguous("mins", packed.mins)
    if packed.bits in (4, 6):
        check_shape("qweight", packed.qweight, (n, k // 2))
        check_dtype("qweight", packed.qweight, (torch.uint8,))
    if packed.bits == 6:
        check_shape("qhigh", packed.qhigh, (n, k // 4))
        check_dtype("qhigh", packed.qhigh, (torch.uint8,))
        check_contiguous("qhigh", packed.qhigh)
    if packed.bits == 8:
        check_shape("qweight", packed.qweight, (n, k))
        check_dtype("qweight", packed.qweight, (torch.int8,))
    check_contiguous("qweight", packed.qweight)


def _check_x(x: torch.Tensor, packed: PackedGGUF) -> None:
    check_shape("x", x, (None, None))
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    check_packed(packed)
    if packed.shape[1] != x.shape[1]:
        raise ValueError(f"x: expected {packed.shape[1]} columns (the weight's K), got {x.shape[1]}")


def gguf_linear(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None,
                config: gguf_gemv_triton.GemvConfig | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], last dim contiguous, 16-bit or float32; packed: W [N, K]; bias: [N] in x's dtype
    or None → [M, N] in x's dtype: new, or written into `out` (an [M, N] view in x's dtype whose
    last dim is contiguous, e.g. a column slice of a fused projection's output).

    Without `config`, the paths above by the number of rows; a `GemvConfig` forces the GEMV
    with that tile (tests, bench/quant.py's sweep)."""
    _check_x(x, packed)
    num_rows, k = x.shape
    n = packed.shape[0]
    if bias is not None:
        check_shape("bias", bias, (n,))
        check_same_dtype(x=x, bias=bias)
        check_contiguous("bias", bias)
        check_same_device(x=x, qweight=packed.qweight, bias=bias)
    else:
        check_same_device(x=x, qweight=packed.qweight)
    if out is not None:
        check_shape("out", out, (num_rows, n))
        check_same_dtype(x=x, out=out)
        check_last_dim_contiguous("out", out)
    if config is not None:
        if num_rows > gguf_gemv_triton.MAX_ROWS:
            raise ValueError(f"config: the GEMV takes at most {gguf_gemv_triton.MAX_ROWS} rows "
                             f"of x, got {num_rows}")
        return gguf_gemv_triton.gguf_gemv(x, packed, bias, config, out)
    if num_rows <= gguf_gemv_triton.GEMV_ROWS:
        return gguf_gemv_triton.gguf_gemv(x, packed, bias, out=out)
    if num_rows <= gguf_mm_triton.MM_ROWS:
        return gguf_mm_triton.gguf_mm(x, packed, bias, out)
    is_whole = n * k <= DEQUANT_WHOLE
    if out is None and is_whole:
        return torch.nn.functional.linear(x, gguf_dequant_triton.dequantize(packed, x.dtype), bias)
    if out is None:
        out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    rows_per_slice = n if is_whole else max(1, DEQUANT_SLICE // k)
    for start in range(0, n, rows_per_slice):
        stop = min(n, start + rows_per_slice)
        w = gguf_dequant_triton.dequantize(packed.rows(start, stop), x.dtype)
        out[:, start:stop] = torch.nn.functional.linear(x, w, None if bias is None else bias[start:stop])
    return out


def gguf_linear_gated(x: torch.Tensor, packed: PackedGGUF) -> torch.Tensor:
    """x: [M, K]; packed: a fused [gate | up] projection [2 I, K] → silu(gate) · up [M, I]: in
    the GEMV's epilogue up to `gguf_gemv_triton.GEMV_ROWS` rows (one launch instead of two),
    else `gguf_linear` then `silu_mul_triton`."""
    _check_x(x, packed)
    if packed.shape[0] % 2:
        raise ValueError(f"packed: a [gate | up] projection has an even number of rows, got {packed.shape[0]}")
    if x.shape[0] <= gguf_gemv_triton.GEMV_ROWS:
        return gguf_gemv_triton.gguf_gemv(x, packed, gated=True)
    from replica.kernels.silu_mul_triton import silu_and_mul
    return silu_and_mul(gguf_linear(x, packed))


def gguf_linear_add_rms_norm(x: torch.Tensor, packed: PackedGGUF, residual: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float,
                             to_x8: bool = False) -> tuple[torch.Tensor | XInt8, torch.Tensor] | None:
    """(rms_norm(x @ W^T + residual), x @ W^T + residual) with the GEMV's split-K sum inside
    the norm kernel (to_x8: the norm rounded as the next 4-bit GEMV's `XInt8`), for up to
    `gguf_gemv_triton.GEMV_ROWS` rows; None where that does not apply (more rows, or a plan
    without split K): the caller runs the unfused ops."""
    _check_x(x, packed)
    if x.shape[0] > gguf_gemv_triton.GEMV_ROWS:
        return None
    check_same_dtype(x=x, residual=residual)
    return gguf_gemv_triton.gguf_gemv_add_rms_norm(x, packed, residual, norm_weight, eps, to_x8)
