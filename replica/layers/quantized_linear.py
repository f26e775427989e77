"""Projection weights that stay quantised on the device, and the one `linear` the model calls.

A model's projection is either a plain tensor [N, K] in the model dtype or one of the weight
objects below. Both objects fill row ranges independently, so fused projections (qkv, gate_up)
load part by part in any order, as plain tensors do:

- `Fp8Weight`: e4m3 [N, K] with one fp32 scale per output row. A float part is quantised on
  arrival (per-channel scales are row-local, so no full-precision copy of the model is ever
  held); an FP8 checkpoint's part arrives as e4m3 rows plus its `weight_scale` (per channel
  [rows, 1], or per tensor [1] broadcast over the part's rows: a fused qkv keeps q's, k's and v's
  own scales).
- `GGUFWeight`: the packed GGUF layout (`replica/quantization/gguf_packed.py`). A fused matrix
  is a list of row segments, each one packed matrix: `finish` joins neighbouring parts that
  share a layout (4-bit parts always can: Q4_0 gains explicit mins), so Q4_K_M's qkv (q, k in
  Q4_K, v in Q6_K) is two segments and two kernel calls into one output. A float part (F16/F32
  in the file) turns the whole projection dense in the model dtype, logged once: always
  correct, never silently lossy.

Invariant: after `LlamaForCausalLM.load_weights`, every row of every weight object was written
(`finish` checks the FP8 scales and the GGUF parts' rows; the loader's missing-weight check
covers the rest).
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
        self.parts: list[tuple[int, PackedGGUF]] = []   # (first row, rows) as they arrive
        self.segments: list[tuple[int, PackedGGUF]] = []    # after `finish`: row order, merged
        self.dense: torch.Tensor | None = None     # set once the projection fell back

    def load_rows(self, offset: int, num_rows: int, tensor) -> None:
        rows = slice(offset, offset + num_rows)
        if not isinstance(tensor, GGUFTensor):
            self._make_dense(f"a {str(tensor.dtype).removeprefix('torch.')} part")
            self.dense[rows].copy_(tensor)
            return
        part = pack(GGUFTensor(tensor.qtype, tensor.data.to(self.device), tensor.shape))
        if self.dense is not None:
            self.dense[rows].copy_(dequantize_packed(part, self.dtype))
            return
        self.parts.append((offset, part))

    def _make_dense(self, cause: str) -> None:
        if self.dense is not None:
            return
        if cause not in _logged_fallbacks:
            _logged_fallbacks.add(cause)
            log.info("GGUF: a projection holding %s is dequantised to the model dtype", cause)
        self.dense = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for offset, part in self.parts + self.segments:
            self.dense[offset:offset + part.shape[0]].copy_(dequantize_packed(part, self.dtype))
        self.parts, self.segments = [], []

    def finish(self, name: str) -> None:
        """Orders the parts by row, checks that they cover every row once, and joins neighbours
        that can share a layout (4-bit parts always can: Q4_0 gains explicit mins)."""
        if self.dense is not None:
            return
        parts = sorted(self.parts + self.segments, key=lambda p: p[0])
        covered = 0
        for offset, part in parts:
            if offset != covered:
                raise ValueError(f"{name}: GGUF parts leave a gap or overlap at row {covered} (a "
                                 f"part starts at row {offset}): the file does not match its config")
            covered += part.shape[0]
        if covered != self.shape[0]:
            raise ValueError(f"{name}: GGUF parts cover {covered} of {self.shape[0]} rows")
        runs: list[list[tuple[int, PackedGGUF]]] = []
        for offset, part in parts:
            prev = runs[-1][-1][1] if runs else None
            if prev is not None and (prev.layout == part.layout or prev.bits == part.bits == 4):
                runs[-1].append((offset, part))
            else:
                runs.append([(offset, part)])
        self.segments = [(run[0][0], _join([p for _, p in run])) for run in runs]
        self.parts = []

    @property
    def packed(self) -> PackedGGUF | None:
        """The whole matrix when it is one packed segment, else None."""
        return self.segments[0][1] if len(self.segments) == 1 else None

    @property
    def num_bytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return sum(part.num_bytes for _, part in self.parts + self.segments)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dense is not None:
            return ops.linear(x, self.dense, bias)
        use_triton = ops.is_triton_enabled(x)
        if use_triton:
            from replica.kernels.gguf_linear_triton import gguf_linear
        if len(self.segments) == 1:
            packed = self.segments[0][1]
            # picks the GEMV or dequantise + cuBLAS
            return gguf_linear(x, packed, bias) if use_triton else gguf_linear_ref(x, packed, bias)
        # parts of different layouts (Q4_K_M's q, k in Q4_K beside v in Q6_K): one call each,
        # into column slices of one output
        out = torch.empty(x.shape[0], self.shape[0], dtype=x.dtype, device=x.device)
        for offset, packed in self.segments:
            cols = slice(offset, offset + packed.shape[0])
            part_bias = None if bias is None else bias[cols]
            if use_triton:
                gguf_linear(x, packed, part_bias, out=out[:, cols])
            else:
                out[:, cols] = gguf_linear_ref(x, packed, part_bias)
        return out


def _join(parts: list[PackedGGUF]) -> PackedGGUF:
    """Row-adjacent parts of one layout (or all 4-bit) → one packed matrix."""
    if len(parts) == 1:
        return parts[0]
    if len({p.layout for p in parts}) > 1:
        parts = [with_mins(p) for p in parts]
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return PackedGGUF(parts[0].qtype, torch.cat([p.qweight for p in parts]),
                      torch.cat([p.scales for p in parts]), mins)


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
