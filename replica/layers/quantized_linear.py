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
from replica.kernels.fp8_linear import FP8_DTYPE, Fp8Rows, fp8_linear_ref, fp8_rows_linear_ref, quantize_rows_ref
from replica.kernels.gguf_linear import XInt8, gguf_linear_ref
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

    def apply(self, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Fp8Rows):                 # quantised by the kernel that produced them
            if ops.is_triton_enabled(x.q):
                from replica.kernels.fp8_quant_triton import fp8_rows_linear
                return fp8_rows_linear(x, self.qweight, self.scale, bias)
            return fp8_rows_linear_ref(x, self.qweight, self.scale, bias)
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

    def apply(self, x: torch.Tensor | XInt8, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, XInt8):          # rounded by the norm before it for this 4- or 6-bit matrix (`norm_for`)
            from replica.kernels.gguf_gemv_triton import gguf_gemv
            return gguf_gemv(x, self.segments[0][1], bias)
        if self.dense is not None:
            return ops.linear(x, self.dense, bias)
        use_triton = ops.is_triton_enabled(x)
        if use_triton:
            from replica.kernels.gguf_linear_triton import gguf_linear
        if len(self.segments) == 1:
            packed = self.segments[0][1]
            # picks the GEMV, the small-batch GEMM or dequantise + cuBLAS by rows
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


    def _fusable(self, x: torch.Tensor | XInt8) -> PackedGGUF | None:
        """The packed matrix where x's rows take the fused Triton paths below (one segment, CUDA)."""
        if isinstance(x, XInt8):
            return self.segments[0][1]
        if self.dense is not None or len(self.segments) != 1 or not ops.is_triton_enabled(x):
            return None
        return self.segments[0][1]

    def apply_gated(self, x: torch.Tensor | XInt8) -> torch.Tensor | None:
        """silu(gate) · up of this [gate | up] projection in one kernel (decode rows); None where
        the unfused path must run."""
        packed = self._fusable(x)
        if packed is None:
            return None
        if isinstance(x, XInt8):
            from replica.kernels.gguf_gemv_triton import gguf_gemv
            return gguf_gemv(x, packed, gated=True)
        from replica.kernels.gguf_linear_triton import gguf_linear_gated
        return gguf_linear_gated(x, packed)

    def takes_x_int8(self, x: torch.Tensor) -> bool:
        """Whether x's rows reach this matrix's 4- or 6-bit GEMV with x rounded to int8, so that the norm
        before it can write them rounded (`norm_for`)."""
        packed = self._fusable(x)
        if packed is None or packed.bits not in (4, 6) or x.dim() != 2:
            return False
        from replica.kernels import gguf_gemv_triton
        return x.shape[0] <= gguf_gemv_triton.GEMV_ROWS and gguf_gemv_triton.takes_x8(packed, x)

    def apply_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                           eps: float, to_x8: bool = False) -> tuple[torch.Tensor | XInt8, torch.Tensor] | None:
        """(rms_norm(x @ W^T + residual), x @ W^T + residual), the GEMV's split-K sum done by the
        norm kernel; with to_x8 the norm comes as the next 4-bit GEMV's `XInt8`, as `norm_for`
        would write it. None where the unfused path must run."""
        packed = self._fusable(x)
        if packed is None:
            return None
        if isinstance(x, XInt8):
            from replica.kernels.gguf_gemv_triton import gguf_gemv_add_rms_norm
            return gguf_gemv_add_rms_norm(x, packed, residual, norm_weight, eps, to_x8)
        from replica.kernels.gguf_linear_triton import gguf_linear_add_rms_norm
        return gguf_linear_add_rms_norm(x, packed, residual, norm_weight, eps, to_x8)


def _join(parts: list[PackedGGUF]) -> PackedGGUF:
    """Row-adjacent parts of one layout (or all 4-bit) → one packed matrix."""
    if len(parts) == 1:
        return parts[0]
    if len({p.layout for p in parts}) > 1:
        parts = [with_mins(p) for p in parts]
    def cat(name: str) -> torch.Tensor | None:
        first = getattr(parts[0], name)
        return None if first is None else torch.cat([getattr(p, name) for p in parts])
    return PackedGGUF(parts[0].qtype, cat("qweight"), cat("scales"), cat("mins"), cat("qhigh"), cat("super_scales"),
                      parts[0].is_paired)


def make_weight(quantization: str | None, num_rows: int, num_cols: int, dtype: torch.dtype,
                device: torch.device):
    """An empty projection weight [num_rows, num_cols] for the model's quantisation method."""
    if quantization == "fp8":
        return Fp8Weight(num_rows, num_cols, device)
    if quantization == "gguf":
        return GGUFWeight(num_rows, num_cols, dtype, device)
    return torch.empty(num_rows, num_cols, dtype=dtype, device=device)


def linear(x: torch.Tensor | Fp8Rows, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] → [M, N] through whichever form `weight` holds (`Fp8Rows`: from `norm_for` or
    `silu_and_mul_for`, for an Fp8Weight)."""
    if isinstance(weight, torch.Tensor):
        return ops.linear(x, weight, bias)
    return weight.apply(x, bias)


# A W8A8 projection's input is quantised per token by the kernel that produces it (the RMSNorm
# before qkv and gate_up, SiLU·mul before down) instead of by a kernel of its own: 3 launches a
# layer fewer, which eager (mixed) steps pay on the host. False: the separate quantiser.
FUSE_FP8_QUANT = True
# A GGUF decode GEMV's epilogues: silu(gate)·up inside gate_up's GEMV, and o_proj's and down_proj's
# split-K sums inside the next RMSNorm (3 launches a layer fewer). False: the unfused kernels.
FUSE_GGUF_EPILOGUES = True
# A 4-bit GGUF decode GEMV on int8 x after an RMSNorm (qkv, gate_up) or attention (o_proj): the
# norm writes x rounded, in several programs a row (`rms_norm_x8_triton`), and so does decode
# attention's reduce (3 launches a layer fewer). False: x's own rounding kernel before each GEMV.
FUSE_GGUF_X8_NORM = True


def _takes_fp8_rows(weight, x: torch.Tensor) -> bool:
    if not (FUSE_FP8_QUANT and isinstance(weight, Fp8Weight) and x.dim() == 2 and ops.is_triton_enabled(x)):
        return False
    from replica.kernels.fp8_quant_triton import takes_fp8_rows
    return takes_fp8_rows(x.shape[0], x.dtype)


def norm_for(weight, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor | Fp8Rows | XInt8, torch.Tensor]:
    """The input of `linear(·, weight)`: RMSNorm(x + residual), and x + residual (the next
    residual); with residual None, RMSNorm(x) and x. `Fp8Rows` where weight is W8A8 at this
    many rows, `XInt8` where it is a 4-bit GGUF GEMV on int8 x."""
    # x, residual: [T, hidden]
    if FUSE_GGUF_X8_NORM and isinstance(weight, GGUFWeight) and weight.takes_x_int8(x):
        from replica.kernels.rms_norm_x8_triton import add_rms_norm_x8
        return add_rms_norm_x8(x, residual, norm_weight, eps)
    if _takes_fp8_rows(weight, x):
        from replica.kernels.rms_norm_triton import fused_add_rms_norm_fp8
        return fused_add_rms_norm_fp8(x, residual, norm_weight, eps)
    if residual is None:
        return ops.rms_norm(x, norm_weight, eps), x
    return ops.fused_add_rms_norm(x, residual, norm_weight, eps)


def attention_rounds_x8(o_weight, q: torch.Tensor) -> bool:
    """Whether attention should hand o_proj its output rounded to int8 (q: [T, heads, head_dim]):
    o_proj is a 4-bit GGUF GEMV on int8 x at this many rows (`TritonAttentionBackend`)."""
    return (FUSE_GGUF_X8_NORM and isinstance(o_weight, GGUFWeight)
            and o_weight.takes_x_int8(q.reshape(q.shape[0], -1)))


def silu_and_mul_for(weight, gate_up: torch.Tensor) -> torch.Tensor | Fp8Rows:
    """silu(gate) · up as the input of `linear(·, weight)` (`Fp8Rows` where weight is W8A8)."""
    # gate_up: [T, 2 * intermediate]
    if _takes_fp8_rows(weight, gate_up):
        from replica.kernels.silu_mul_triton import silu_and_mul_fp8
        return silu_and_mul_fp8(gate_up)
    return ops.silu_and_mul(gate_up)


def linear_add_norm(x: torch.Tensor, weight, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    next_weight) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """norm_for(next_weight, linear(x, weight), residual, norm_weight, eps): a projection, the
    residual add and the next norm. A GGUF GEMV that splits K hands its partials to the norm
    kernel (o_proj and down_proj at decode: one launch less each)."""
    if FUSE_GGUF_EPILOGUES and isinstance(weight, GGUFWeight) and not isinstance(next_weight, Fp8Weight):
        # the norm in the form norm_for would give it: rounded for a 4-bit GEMV on int8 x
        to_x8 = FUSE_GGUF_X8_NORM and isinstance(next_weight, GGUFWeight) and next_weight.takes_x_int8(residual)
        fused = weight.apply_add_rms_norm(x, residual, norm_weight, eps, to_x8)
        if fused is not None:
            return fused
    return norm_for(next_weight, linear(x, weight), residual, norm_weight, eps)


def gate_up_act(x: torch.Tensor | Fp8Rows, gate_up_weight, down_weight) -> torch.Tensor | Fp8Rows:
    """silu(gate) · up of x's fused [gate | up] projection, in the form `linear(·, down_weight)`
    takes; a GGUF decode GEMV applies it in its epilogue (one launch less)."""
    if FUSE_GGUF_EPILOGUES and isinstance(gate_up_weight, GGUFWeight):
        act = gate_up_weight.apply_gated(x)
        if act is not None:
            return act
    return silu_and_mul_for(down_weight, linear(x, gate_up_weight))


def weight_bytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return weight.num_bytes
