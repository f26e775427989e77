"""Dispatch of the small fused ops: the Triton kernel for CUDA tensors, the torch reference
(the CPU path) otherwise, or everywhere once the engine selected the "torch" kernel backend.

`select_kernel_backend` is the one switch (EngineConfig.kernel_backend, resolved by the engine at
start-up, which also picks the attention backend by the same name): one engine per process, so
the choice is the process's.

The Triton modules are imported on first CUDA use only: a CPU process never imports Triton, and
the kernel tests can switch on TRITON_INTERPRET before the kernels are defined (Triton decides
between compiling and interpreting when a kernel is decorated, i.e. at import).
"""
import importlib

import torch
import torch.nn.functional as F

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from replica.kernels.rotary import apply_rotary_ref
from replica.kernels.rotary_kv_write import apply_rotary_and_write_kv_ref
from replica.kernels.silu_mul import silu_and_mul_ref

# The skinny-GEMM kernel takes 16-bit weights only: float32 models (the exact-token tests against
# transformers) keep cuBLAS's fp32 GEMMs.
_LINEAR_DTYPES = (torch.bfloat16, torch.float16)


_selected = {"backend": "triton"}


def select_kernel_backend(name: str) -> None:
    """"triton" (CUDA tensors take the kernels) or "torch" (the reference everywhere)."""
    if name not in ("triton", "torch"):
        raise ValueError(f"kernel backend must be triton or torch, got {name!r}")
    _selected["backend"] = name


def is_triton_enabled(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and _selected["backend"] == "triton"


def _triton(module: str):
    return importlib.import_module(f"replica.kernels.{module}_triton")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but a 16-bit x of at most `linear_triton.MAX_ROWS` rows (decode at small batch)
    on CUDA goes to the Triton skinny GEMM, which streams the weight at close to the memory
    bandwidth; cuBLAS otherwise (prefill, large batches, float32, odd layouts)."""
    # x: [M, K]; weight: [N, K]; bias: [N] or None → [M, N]
    if x.dtype in _LINEAR_DTYPES and is_triton_enabled(x):
        module = _triton("linear")
        if module.is_supported(x, weight) and (bias is None or bias.is_contiguous()):
            return module.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., hidden]; weight: [hidden]
    if is_triton_enabled(x):
        return _triton("rms_norm").rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    if is_triton_enabled(x):
        return _triton("rms_norm").fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim]; positions: [T]
    if is_triton_enabled(q):
        return _triton("rotary").apply_rotary(q, k, positions, cos_sin_cache)
    return apply_rotary_ref(q, k, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [..., 2 * intermediate] as [gate | up] → [..., intermediate]
    if is_triton_enabled(x):
        return _triton("silu_mul").silu_and_mul(x)
    return silu_and_mul_ref(x)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    # k, v: [T, num_kv_heads, head_dim] → caches [num_blocks, block_size, num_kv_heads, head_dim]
    if is_triton_enabled(k):
        _triton("kv_cache_write").write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x: [S, V] → int64 [S], the index of each row's largest value (the first of equal ones;
    NaN counts as the largest), as `x.argmax(dim=-1)`."""
    if is_triton_enabled(x) and x.dim() == 2 and x.shape[1] > 0:
        return _triton("argmax").argmax(x)
    return x.argmax(dim=-1)


def apply_rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """apply_rotary, then write_kv_cache of the rotated keys and the values, in one kernel on
    CUDA. Returns the rotated q."""
    # q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]; positions, slot_mapping: [T]
    if is_triton_enabled(q):
        return _triton("rotary_kv_write").apply_rotary_and_write_kv(
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    return apply_rotary_and_write_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache,
                                         slot_mapping)
