"""Argument checks shared by the Triton wrappers.

Each failure is a `ValueError` that names the argument and says what was expected, so a caller
that wires a kernel wrongly reads the mistake instead of a launch failure or silent garbage.
The checks read only shapes, dtypes, strides and devices: no host-device synchronisation.
"""
import torch

from replica.kernels.fp8_linear import FP8_DTYPE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """`shape` holds ints and None (any size)."""
    if tensor.dim() != len(shape) or any(
        want is not None and have != want for have, want in zip(tensor.shape, shape)
    ):
        want_text = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want_text}, got {list(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, dtypes: tuple) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')} not supported "
                         f"(expected one of {allowed})")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"dtypes must match: {dtypes}")


def check_kv_cache_dtype(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The caches hold x's dtype, or FP8 (e4m3) for any 16/32-bit x."""
    check_same_dtype(k_cache=k_cache, v_cache=v_cache)
    if k_cache.dtype not in (x.dtype, FP8_DTYPE):         # --kv-cache-dtype fp8: e4m3, no scale
        raise ValueError(f"k_cache: dtype {str(k_cache.dtype).removeprefix('torch.')} does not hold "
                         f"{str(x.dtype).removeprefix('torch.')} values (the model dtype or float8_e4m3fn)")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    # The kernels load rows as contiguous vectors; every other stride is passed to the kernel.
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), "
                         f"got strides {tensor.stride()}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got shape {list(tensor.shape)} "
                         f"with strides {tensor.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device: {devices}")


def kv_as_f16(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Attention over an e4m3 cache with 16-bit queries computes in fp16: e4m3 → fp16 is one
    conversion instruction per pair of values, → bf16 several, and with those the decode kernel
    was bound by converting rather than by reading (an FP8 cache no faster than bf16's at half
    the bytes, bench/NOTES.md). q is clamped to fp16's range; fp16 keeps more mantissa than bf16."""
    return k_cache.dtype == FP8_DTYPE and q.dtype in (torch.bfloat16, torch.float16)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact fp32 products (tf32 would cost ~1e-3 relative error, enough to
    change greedy tokens of a small fp32 model); 16-bit inputs use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"
