"""Torch reference of the GGUF dequantise-and-multiply (and the CPU path): out = x @ W^T (+ bias)
with W held in `replica.quantization.gguf_packed`'s layout. The Triton kernels in
`gguf_linear_triton.py` compute the same thing without ever writing W out."""
import torch
import torch.nn.functional as F

from replica.quantization.gguf_packed import PackedGGUF, dequantize_packed


def gguf_linear_ref(x: torch.Tensor, packed: PackedGGUF, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K]; packed: W [N, K]; bias: [N] or None → [M, N] in x's dtype
    return F.linear(x, dequantize_packed(packed, x.dtype), bias)
