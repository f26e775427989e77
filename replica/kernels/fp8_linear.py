"""FP8 W8A8 linear: out = (x quantised per token) @ (W quantised per output channel)^T.

    x  [M, K] bf16 ──per-token absmax──▶ x_q [M, K] e4m3, x_scale [M, 1] fp32 (x ≈ x_q · x_scale)
    W  [N, K]      (at load)           ▶ w_q [N, K] e4m3, w_scale [N]    fp32 (W ≈ w_q · w_scale)
    out[m, n] = x_scale[m] · w_scale[n] · Σ_k x_q[m, k] · w_q[n, k]   (fp32 accumulation)

On CUDA the product is `torch._scaled_mm` (cuBLASLt FP8 on the tensor cores) with both scales
applied in its epilogue where the GPU supports row-wise scales (Hopper), else scaled after an
fp32-output FP8 product (Ada). The torch functions here are the reference and the CPU path.
A Triton W8A8 GEMM beat cuBLASLt only at 64-128 rows (by 3-9 µs a call) and lost from 256 rows
on, at every 8B projection on an H200 (`bench/results/fp8-gemm-H200-2026-11-29.json`), so cuBLASLt it is.
"""
from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max        # 448
MIN_SCALE = 1e-12                           # an all-zero row gets this scale instead of 0 / 0


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row FP8: x [R, K] float → (q [R, K] e4m3, scale [R, 1] fp32) with
    |x / scale| ≤ 448. Used for activations per token (each call) and weights per output
    channel (once, at load). x is multiplied by 1/scale (one division a row, as vLLM's kernels
    and ours do: a division an element made the GPU's quantiser ALU-bound)."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x32 * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8Rows(NamedTuple):
    """Activations already quantised per token by the kernel that produced them (an RMSNorm or
    SiLU·mul writing e4m3 instead of bf16, one launch fewer), for a W8A8 product.
    dtype: what the unquantised rows would have been (the product's output dtype)."""
    q: torch.Tensor            # [M, K] e4m3
    scale: torch.Tensor        # [M, 1] fp32
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def fp8_rows_linear_ref(rows: Fp8Rows, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    # rows: [M, K]; w_q: [N, K] e4m3; w_scale: [N] fp32; bias: [N] or None → [M, N] in rows.dtype
    out = (rows.q.float() @ w_q.float().t()) * rows.scale * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(rows.dtype)


def fp8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K]; w_q: [N, K] e4m3; w_scale: [N] fp32; bias: [N] or None → [M, N] in x's dtype
    return fp8_rows_linear_ref(Fp8Rows(*quantize_rows_ref(x), x.dtype), w_q, w_scale, bias)
