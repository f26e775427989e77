"""Engine, cache and scheduler settings, validated once at start-up."""
import os
from dataclasses import dataclass

import torch

from replica.quantization.methods import QUANTIZATION_METHODS

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products at full speed (read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class EngineConfig:
    model: str = "smollm2"            # a checkpoint folder, a .gguf file, or "smollm2" (bundled)
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "auto"               # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | ...
    max_model_len: int | None = None  # default: the model's max positions, capped at 8192
    block_size: int = 16              # tokens per KV block
    num_kv_blocks: int | None = None  # default: from kv_cache_memory_bytes / gpu_memory_utilization
    kv_cache_memory_bytes: int | None = None   # CPU default: 1 GiB worth of blocks
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256           # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    enable_prefix_caching: bool = True
    kernel_backend: str = "auto"      # every op and attention: auto (triton on CUDA, torch otherwise) | torch | triton
    enforce_eager: bool = False       # disable CUDA graphs
    cuda_graph_max_tokens: int = 2048  # steps with prefill chunks up to this many tokens replay piecewise graphs; 0: eager
    enable_overlap: bool = True       # plan step t+1 while the device runs step t (core.py)
    seed: int = 0                     # seed of unseeded sampling
    max_num_waiting: int = 1024       # bound of the waiting queue (server answers 503 above)
    load_format: str = "auto"         # auto (the weight files) | dummy (random, from config.json)
    quantization: str | None = None   # None (as the checkpoint declares) | fp8 | gguf (replica.quantization.methods)
    kv_cache_dtype: str = "auto"      # auto (the model dtype) | fp8 (e4m3: half the bytes a token)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} "
                             f"(or left out), got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be >= 0 (0: no piecewise graphs), got "
                             f"{self.cuda_graph_max_tokens}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be auto, torch or triton, got {self.kernel_backend!r}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but CUDA is not available: use --device cpu")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            # On the CPU, decoding is bound by reading the weights: bf16 halves the bytes and, where
            # the CPU computes in bf16 natively, more than doubles tokens/s (bench/NOTES.md).
            if device.type == "cuda" or cpu_has_native_bf16():
                return torch.bfloat16
            return torch.float32
        return _DTYPES[self.dtype]

    def resolve_kv_cache_dtype(self, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype: the model's, or FP8 e4m3 (keys and values rounded to 3 mantissa
        bits, saturated at ±448, no scale: as vLLM's --kv-cache-dtype fp8 without calibrated
        scales). FP8 needs an Ada or Hopper GPU (the conversions), or the CPU (torch)."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"--kv-cache-dtype fp8 needs compute capability 8.9 (Ada) or 9.0+ "
                             f"(Hopper); {name} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}. "
                             "Leave the flag out")
        from replica.kernels.fp8_linear import FP8_DTYPE
        return FP8_DTYPE

    def resolve_kernel_backend(self, device: torch.device) -> str:
        """The one switch between the Triton kernels and the torch reference, for every op and
        attention alike. PAGEFLEET_DISABLE_TRITON=1 makes "auto" mean torch (debugging)."""
        if self.kernel_backend == "auto":
            disabled = os.environ.get("PAGEFLEET_DISABLE_TRITON", "") not in ("", "0")
            return "triton" if device.type == "cuda" and not disabled else "torch"
        return self.kernel_backend
