"""Triton: the index of each row's largest value, the greedy token (reference: `torch.argmax`
over the last dim, whose choices it keeps: the first index of the largest value, NaN counted
as the largest).

torch reduces one long row in few blocks: a decode step's 1 x 128,256 fp32 logits took 27.7 µs
on an H200, about 1.4% of a Q4_0 W2 step (bench/NOTES.md). Here each row is cut into BLOCK-wide
pieces reduced in parallel, and a second kernel picks among the pieces' winners:

    row      |  piece 0  |  piece 1  | ... |  piece P-1  |
    pieces   (max, first index of it) each          [S, P]
    pick     the largest max; among equal ones the first piece, whose index is the smallest
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_shape

_BLOCK = 4096


@triton.jit
def _piece_kernel(x_ptr, val_ptr, idx_ptr, num_cols, stride_x, num_pieces, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    cols = piece * BLOCK + tl.arange(0, BLOCK)
    valid = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)                  # NaN: the largest, as torch
    best = tl.max(x, axis=0)
    first = tl.min(tl.where((x == best) & valid, cols, num_cols), axis=0)
    tl.store(val_ptr + row * num_pieces + piece, best)
    tl.store(idx_ptr + row * num_pieces + piece, first)


@triton.jit
def _pick_kernel(val_ptr, idx_ptr, out_ptr, num_pieces, PIECES: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, PIECES)
    mask = p < num_pieces
    val = tl.load(val_ptr + row * num_pieces + p, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_pieces + p, mask=mask, other=2**31 - 1)
    best = tl.max(val, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where((val == best) & mask, idx, 2**31 - 1), axis=0).to(tl.int64))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x: [S, V] float (last dim contiguous) → int64 [S], as `x.argmax(dim=-1)`."""
    check_shape("x", x, (None, None))
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    num_rows, num_cols = x.shape
    if num_cols == 0:
        raise ValueError("x: argmax of an empty row")
    out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return out
    num_pieces = triton.cdiv(num_cols, _BLOCK)
    val = torch.empty(num_rows, num_pieces, dtype=torch.float32, device=x.device)
    idx = torch.empty(num_rows, num_pieces, dtype=torch.int32, device=x.device)
    launch = pdl.launch_options(x.device)
    _piece_kernel[(num_rows, num_pieces)](x, val, idx, num_cols, x.stride(0), num_pieces, BLOCK=_BLOCK,
                                          num_warps=8, **launch)
    _pick_kernel[(num_rows,)](val, idx, out, num_pieces, PIECES=triton.next_power_of_2(num_pieces),
                              num_warps=1, **launch)
    return out
