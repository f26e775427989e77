"""Triton: RMSNorm (with the residual add) that writes its row as the 4-bit GEMV's int8 x, in
several programs a row (reference: `add_rms_norm_x8_ref`).

At batch 1 the decode step runs RMSNorm → round x to int8 (`gguf_gemv_x8_triton.quantize_x`) →
GEMV twice a layer. The rounding kernel is ~1.5 µs of a launch; folding it into the one-program
norm was slower (the row's latency on one SM: W2 441 against 469 tok/s, bench/NOTES.md). Here
the norm itself runs GROUPS 32-element groups a program, so it needs no whole-row sum first:

    y = RMSNorm(s) · w = rstd · (s · w),   s = x + residual,   rstd = 1 / sqrt(Σ s² / K + eps)

and rounding per group is scale-free: the codes of rstd · (s · w) are those of s · w, and dx
scales with rstd. So each program rounds its groups of s · w (fp32, no bf16 step between) and
writes its part of Σ s²; the GEMV multiplies its dot products by rstd, computed from the parts
(`gguf_gemv_triton`, `XInt8.sumsq`). One launch a norm instead of two, and at 4096 columns 8
programs a row instead of one.

    program (m, p): groups p·GROUPS .. p·GROUPS + GROUPS − 1 of row m
        s = bf16(x + residual) → residual_out          (as `fused_add_rms_norm`)
        sumsq[m, p] = Σ s²
        codes, (dx, xsum) of s · w                      (`gguf_gemv_x8_triton.round_groups`)
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_same_device, check_shape
from replica.kernels.gguf_gemv_x8_triton import round_groups
from replica.kernels.gguf_linear import GROUP, XInt8, quantize_x_ref

GROUPS = 16           # 32-element groups a program: 512 columns (8 programs a row at 4096)


@triton.jit
def _rms_norm_x8_kernel(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, codes_ptr, ds_ptr, sumsq_ptr,
                        hidden, num_groups, num_parts, stride_xm, stride_rm,
                        HAS_RESIDUAL: tl.constexpr, GROUPS_: tl.constexpr, PDL: tl.constexpr,
                        EARLY: tl.constexpr,     # PDL: the weight loaded before the wait (`pdl.EARLY_LOADS`)
                        SPLIT_K: tl.constexpr):  # > 0: x is a GEMV's split-K partials [SPLIT_K, M, hidden] fp32
    p = tl.program_id(1)
    gs = p * GROUPS_ + tl.arange(0, GROUPS_)
    g_mask = gs < num_groups
    e = tl.arange(0, 32)
    offs = gs[:, None] * 32 + e[None, :]
    mask = g_mask[:, None]
    if EARLY:      # no kernel writes it: its load no longer follows the stores below
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pdl.wait_and_release(PDL)
    m = tl.program_id(0).to(tl.int64)
    if SPLIT_K > 0:    # summed in split order and rounded, as the GEMV's own sum kernel stores its output
        acc = tl.zeros([GROUPS_, 32], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(x_ptr + (s * tl.num_programs(0) + m) * hidden + offs, mask=mask, other=0.0)
        x = acc.to(residual_out_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + m * stride_rm + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + m * hidden + offs, x, mask=mask)
    s = x.to(tl.float32)
    tl.store(sumsq_ptr + m * num_parts + p, tl.sum(tl.sum(s * s, axis=1), axis=0))
    if not EARLY:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    round_groups(s * w, codes_ptr + m * hidden, ds_ptr + 2 * m * num_groups, gs, g_mask)


def add_rms_norm_x8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float, partial: torch.Tensor | None = None) -> tuple[XInt8, torch.Tensor]:
    """x, residual: [M, K] (K a multiple of 32, last dim contiguous); weight: [K] →
    (RMSNorm(x + residual) · weight as the 4-bit GEMV's `XInt8`, x + residual); with residual
    None, (RMSNorm(x) · weight, x).

    partial: instead of x, a GEMV's split-K partials [S, M, K] fp32 (contiguous), x being their
    sum rounded to residual's dtype: the values of that GEMV's own sum kernel, one launch less.
    x is then None, and residual is required."""
    split_k = 0
    if partial is not None:
        if x is not None or residual is None:
            raise ValueError("partial: pass x=None and a residual")
        check_shape("partial", partial, (None, None, None))
        check_dtype("partial", partial, (torch.float32,))
        if not partial.is_contiguous():
            raise ValueError("partial: must be contiguous")
        check_same_device(partial=partial, residual=residual)
        split_k = partial.shape[0]
        x = residual     # shapes, dtype and device come from the residual; the kernel reads partial
    check_shape("x", x, (None, None))
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    num_rows, hidden = x.shape
    if partial is not None:
        check_shape("partial", partial, (split_k, num_rows, hidden))
    if hidden % GROUP:
        raise ValueError(f"x: {hidden} columns is not a multiple of {GROUP}")
    check_shape("weight", weight, (hidden,))
    check_last_dim_contiguous("weight", weight)
    if residual is not None:
        check_shape("residual", residual, (num_rows, hidden))
        check_last_dim_contiguous("residual", residual)
        if residual.dtype != x.dtype:
            raise ValueError(f"residual: expected dtype {x.dtype}, got {residual.dtype}")
        check_same_device(x=x, residual=residual, weight=weight)
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        check_same_device(x=x, weight=weight)
        residual, residual_out = x, x
    num_groups = hidden // GROUP
    num_parts = triton.cdiv(num_groups, GROUPS)
    out = XInt8.empty(num_rows, hidden, torch.promote_types(weight.dtype, x.dtype), x.device, num_parts, eps)
    if num_rows:
        _rms_norm_x8_kernel[(num_rows, num_parts)](
            x if partial is None else partial, residual, weight, residual_out, out.codes, out.dx_sum, out.sumsq,
            hidden, num_groups, num_parts, x.stride(0), residual.stride(0),
            HAS_RESIDUAL=residual_out is not x, GROUPS_=GROUPS, num_warps=4, **pdl.launch_options(x.device),
            EARLY=pdl.uses_pdl(x.device) and pdl.EARLY_LOADS, SPLIT_K=split_k)
    return out, residual_out


def add_rms_norm_x8_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, ...]:
    """Torch reference, the same fp32 arithmetic: (codes, dx, xsum) of the row before the
    norm's 1/rms, that rstd [M], and x + residual; the GEMV's x̂ is rstd · dx · codes."""
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    s32 = s.float()
    codes, dx, xsum = quantize_x_ref(s32 * weight.float())
    rstd = torch.rsqrt(s32.pow(2).mean(-1) + eps)
    return codes, dx, xsum, rstd, s
