"""A kernel that Triton's interpreter runs and its compiler rejects (with TWO_D), for
test_sm90_compile: the shape of the bf16 GEMV's bug of 2026-12-01. Launches of this module are not
recorded by `sm90_specs`."""
import triton
import triton.language as tl


@triton.jit
def _add_rows(acc, x, TWO_D: tl.constexpr):
    if TWO_D:
        return acc + x[:, None]
    return acc + x          # compiled for TWO_D too: [BLOCK, 2 BLOCK] + [BLOCK] does not broadcast


@triton.jit
def early_return_kernel(out_ptr, BLOCK: tl.constexpr, TWO_D: tl.constexpr):
    x = tl.arange(0, BLOCK).to(tl.float32)
    if TWO_D:
        acc = tl.zeros([BLOCK, 2 * BLOCK], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _add_rows(acc, x, TWO_D)
    if TWO_D:
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.sum(acc, axis=1))
    else:
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)
