"""Torch reference of the GGUF dequantise-and-multiply (and the CPU path): out = x @ W^T (+ bias)
with W held in `replica.quantization.gguf_packed`'s layout. The Triton kernels in
`gguf_linear_triton.py` compute the same thing without ever writing W out.

Also x rounded to int8 per 32-element group, as the 4-bit GEMV on CUDA takes it
(`gguf_gemv_x8_triton`): its container `XInt8` and the torch reference of the rounding."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from replica.quantization.gguf_packed import PackedGGUF, dequantize_packed

GROUP = 32            # elements of x that share one int8 scale


def gguf_linear_ref(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K]; packed: W [N, K]; bias: [N] or None → [M, N] in x's dtype
    return F.linear(x, dequantize_packed(packed, x.dtype), bias)


@dataclass
class XInt8:
    """x rounded for the GEMV: codes int8 [M, K] in the dp4a byte order; dx_sum fp32 [M, K/32, 2],
    per group (dx, xsum = dx · Σ codes), side by side so that a lane reads both in one 8-byte load.
    From `rms_norm_x8_triton` the codes are those of the row before the norm's 1/rms: sumsq
    [M, parts] holds the parts of Σ s² from which the GEMV computes rstd = 1/sqrt(Σ/K + eps) and
    scales its products. dtype: the GEMV's output dtype (x's)."""
    codes: torch.Tensor
    dx_sum: torch.Tensor
    dtype: torch.dtype = torch.float32
    sumsq: torch.Tensor | None = None
    eps: float = 0.0

    @classmethod
    def empty(cls, num_rows: int, k: int, dtype: torch.dtype, device: torch.device,
              num_parts: int | None = None, eps: float = 0.0) -> "XInt8":
        """Buffers for [num_rows, k] rounded (k a multiple of GROUP), with num_parts parts of Σ s²
        a row when the writer is a norm."""
        return cls(torch.empty(num_rows, k, dtype=torch.int8, device=device),
                   torch.empty(num_rows, k // GROUP, 2, dtype=torch.float32, device=device), dtype,
                   None if num_parts is None else torch.empty(num_rows, num_parts, dtype=torch.float32,
                                                              device=device), eps)

    @property
    def dx(self) -> torch.Tensor:
        return self.dx_sum[:, :, 0]

    @property
    def xsum(self) -> torch.Tensor:
        return self.dx_sum[:, :, 1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def rows(self, start: int, stop: int) -> "XInt8":
        return XInt8(self.codes[start:stop], self.dx_sum[start:stop], self.dtype,
                     None if self.sumsq is None else self.sumsq[start:stop], self.eps)

    def rstd(self) -> torch.Tensor | None:
        """[M] fp32, the factor the GEMV applies (None: 1)."""
        if self.sumsq is None:
            return None
        return torch.rsqrt(self.sumsq.sum(dim=1) / self.codes.shape[1] + self.eps)


def quantize_x_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_x`, the same fp32 arithmetic."""
    num_rows, k = x.shape
    groups = x.float().reshape(num_rows, k // GROUP, GROUP)
    amax = groups.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    v = groups * inv[:, :, None]
    q = torch.where(v >= 0, torch.floor(v + 0.5), -torch.floor(0.5 - v))
    dx = amax * (1.0 / 127.0)
    xsum = dx * q.sum(dim=2)
    e = torch.arange(GROUP)
    pos = (e // 8) * 8 + 2 * (e % 4) + (e % 8) // 4
    x8 = torch.empty_like(q)
    x8[:, :, pos] = q
    return x8.reshape(num_rows, k).to(torch.int8), dx, xsum


def dequantize_x_ref(x8: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """x̂ = dx · x8 in element order [M, K] fp32: what the GEMV multiplies W by."""
    num_rows, k = x8.shape
    e = torch.arange(GROUP)
    pos = (e // 8) * 8 + 2 * (e % 4) + (e % 8) // 4
    q = x8.float().reshape(num_rows, k // GROUP, GROUP)[:, :, pos]
    return (q * dx[:, :, None]).reshape(num_rows, k)
