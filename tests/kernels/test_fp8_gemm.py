"""The Triton W8A8 GEMM against the torch reference (`fp8_linear.fp8_rows_linear_ref`): several
shapes and tiles in the interpreter, the 8B projections at decode-batch rows on an Ada or Hopper GPU."""
import pytest
import torch

from replica.kernels.fp8_gemm_triton import CONFIGS, Fp8GemmConfig, fp8_gemm
from replica.kernels.fp8_linear import Fp8Rows, fp8_rows_linear_ref, quantize_rows_ref
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

OUT_DTYPE = torch.bfloat16 if ON_GPU else DTYPE
SMALL = Fp8GemmConfig(16, 32, 32, 4, 1, group_m=2)


def _operands(m: int, n: int, k: int, seed: int, with_bias: bool):
    gen = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: the per-token scales must be applied per row
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=gen) * 0.05
    rows = Fp8Rows(*(t.to(DEVICE) for t in quantize_rows_ref(x)), OUT_DTYPE)
    w_q, w_scale = quantize_rows_ref(w)
    bias = torch.randn(n, generator=gen).to(OUT_DTYPE).to(DEVICE) if with_bias else None
    return rows, w_q.to(DEVICE), w_scale[:, 0].contiguous().to(DEVICE), bias


@pytest.mark.parametrize("m,n,k", [(1, 32, 32), (5, 96, 64), (33, 64, 128), (70, 160, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemm_equals_the_reference_product(m, n, k, with_bias):
    rows, w_q, w_scale, bias = _operands(m, n, k, m * n + k, with_bias)
    got = fp8_gemm(rows, w_q, w_scale, bias, config=SMALL)
    torch.testing.assert_close(got, fp8_rows_linear_ref(rows, w_q, w_scale, bias))


def test_fp8_gemm_refuses_a_k_that_its_tiles_do_not_divide():
    rows, w_q, w_scale, _ = _operands(4, 32, 48, 0, False)
    with pytest.raises(ValueError, match="multiple of block_k 32"):
        fp8_gemm(rows, w_q, w_scale, config=SMALL)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (8, 9), reason="needs an Ada or Hopper GPU")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [64, 300, 1024])
def test_fp8_gemm_at_the_8b_projections(m, n, k):
    rows, w_q, w_scale, _ = _operands(m, n, k, m + n + k, False)
    want = fp8_rows_linear_ref(rows, w_q, w_scale)
    for config in CONFIGS:
        torch.testing.assert_close(fp8_gemm(rows, w_q, w_scale, config=config), want)
