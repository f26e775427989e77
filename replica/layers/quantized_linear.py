"""Projection weights that stay quantised on the device, and the one `linear` the model calls.

A model's projection is either a plain tensor [N, K] in the model dtype or one of the weight
objects below. Both objects fill row ranges independently, so fused projections (qkv, gate_up)
load part by part in any order, as plain tensors do:

- `Fp8Weight`: e4m3 [N, K] with one fp32 scale per output row. A float part is quantised on
  arrival (per-channel scales are row-local, so no full-precision copy of the model is ever
  held); an FP8 checkpoint's part arrives as e4m3 rows plus its `weight_scale` (per channel
  [rows, 1], or per tensor [1] broadcast over the part's rows: a fused qkv keeps q's, k's and v's
  own scales).
- `GGUFWeight`: the packed GGUF layout (`replica/quantization/gguf_packed.py`). Parts of one
  fused matrix must share a layout; 4-bit parts are brought to a common one (Q4_0 gains explicit
  mins), anything else (a Q6_K or F16 part, 4- and 8-bit parts together) turns the whole
  projection dense in the model dtype, logged once per cause: always correct, never silently
  lossy.

Invariant: after `LlamaForCausalLM.load_weights`, every row of every weight object was written
(`finish` checks the FP8 scales; the loader's missing-weight check covers the rest).
"""
import logging

import torch

from replica.kernels import ops
from replica.kernels.fp8_linear import FP8_DTYPE, fp8_linear_ref, quantize_rows_ref
from replica.kernels.gguf_linear import gguf_linear_ref
from replica.quantization.gguf_packed import GGUFTensor, PackedGGUF, dequantize_packed, pack, with_mins

log = logging.getLogger(__name__)

_logged_fallbacks: set[str] = set()


class Fp8Weight:
    def __init__(self, num_rows: int, num_cols: int, device: torch.device):
        self.shape = (num_rows, num_cols)
        self.qweight = torch.empty(num_rows, num_cols, dtype=FP8_DTYPE, device=device)
        self.scale = torch.full((num_rows,), float("nan"), dtype=torch.float32, device=device)

    def load_rows(self, offset: int, num_rows: int, tensor: torch.Tensor) -> None:
        tensor = tensor.to(self.qweight.device)
        if tensor.dtype == FP8_DTYPE:
            self.qweight[offset:offset + num_rows].copy_(tensor)     # its scale comes separately
            return
        q, scale = quantize_rows_ref(tensor)
        self.qweight[offset:offset + num_rows].copy_(q)
        self.scale[offset:offset + num_rows].copy_(scale[:, 0])

    def load_scale(self, offset: int, num_rows: int, scale: torch.Tensor) -> None:
        scale = scale.to(self.scale.device, torch.float32).reshape(-1)
        if scale.numel() not in (1, num_rows):
            raise ValueError(f"weight_scale has {scale.numel()} values for {num_rows} rows "
                             "(expected one per row or one per tensor)")
        self.scale[offset:offset + num_rows].copy_(scale.expand(num_rows))

    def finish(self, name: str) -> None:
        if torch.isnan(self.scale).any():
            raise ValueError(f"{name}: FP8 weights without a weight_scale for every row: the "
                             "checkpoint is incomplete")

    @property
    def num_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if ops.is_triton_enabled(x):
            from replica.kernels.fp8_quant_triton import fp8_linear
            return fp8_linear(x, self.qweight, self.scale, bias)
        return fp8_linear_ref(x, self.qweight, self.scale, bias)


class GGUFWeight:
    def __init__(self, num_rows: int, num_cols: int, dtype: torch.dtype, device: torch.device):
        self.shape = (num_rows, num_cols)
        self.dtype, self.device = dtype, device
        self.packed: PackedGGUF | None = None      # until the first part says which layout
        self.dense: torch.Tensor | None = None     # set once the projection fell back

    def load_rows(self, offset: int, num_rows: int, tensor) -> None:
        rows = slice(offset, offset + num_rows)
        if not isinstance(tensor, GGUFTensor):
            self._make_dense(f"a {str(tensor.dtype).removeprefix('torch.')} part")
            self.dense[rows].copy_(tensor)
            return
        part = pack(GGUFTensor(tensor.qtype, tensor.data.to(self.device), tensor.shape))
        if self.dense is None and self.packed is None:
            self.packed = self._allocate_like(part)
        elif self.dense is None and self.packed.layout != part.layout:
            if self.packed.bits == part.bits == 4:
                self.packed, part = with_mins(self.packed), with_mins(part)
            else:
                self._make_dense(f"{self.packed.qtype} and {part.qtype} parts in one matrix")
        if self.dense is not None:
            self.dense[rows].copy_(dequantize_packed(part, self.dtype))
            return
        self.packed.qweight[rows].copy_(part.qweight)
        self.packed.scales[rows].copy_(part.scales)
        if part.mins is not None:
            self.packed.mins[rows].copy_(part.mins)

    def _allocate_like(self, part: PackedGGUF) -> PackedGGUF:
        n = self.shape[0]
        return PackedGGUF(
            part.qtype, part.qweight.new_empty(n, part.qweight.shape[1]),
            part.scales.new_empty(n, part.scales.shape[1]),
            part.mins.new_empty(n, part.mins.shape[1]) if part.mins is not None else None)

    def _make_dense(self, cause: str) -> None:
        if self.dense is not None:
            return
        if cause not in _logged_fallbacks:
            _logged_fallbacks.add(cause)
            log.info("GGUF: a projection holding %s is dequantised to the model dtype", cause)
        self.dense = (dequantize_packed(self.packed, self.dtype) if self.packed is not None
                      else torch.empty(self.shape, dtype=self.dtype, device=self.device))
        self.packed = None

    def finish(self, name: str) -> None:
        pass

    @property
    def num_bytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return self.packed.num_bytes if self.packed is not None else 0

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dense is not None:
            return ops.linear(x, self.dense, bias)
        if not ops.is_triton_enabled(x):
            return gguf_linear_ref(x, self.packed, bias)
        from replica.kernels.gguf_linear_triton import gguf_linear
        return gguf_linear(x, self.packed, bias)      # picks the GEMV or dequantise + cuBLAS


def make_weight(quantization: str | None, num_rows: int, num_cols: int, dtype: torch.dtype,
                device: torch.device):
    """An empty projection weight [num_rows, num_cols] for the model's quantisation method."""
    if quantization == "fp8":
        return Fp8Weight(num_rows, num_cols, device)
    if quantization == "gguf":
        return GGUFWeight(num_rows, num_cols, dtype, device)
    return torch.empty(num_rows, num_cols, dtype=dtype, device=device)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] → [M, N] through whichever form `weight` holds."""
    if isinstance(weight, torch.Tensor):
        return ops.linear(x, weight, bias)
    return weight.apply(x, bias)


def weight_bytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return weight.num_bytes
