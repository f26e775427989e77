"""SiLU-and-mul against the reference."""
import pytest
import torch

from replica.kernels.silu_mul import silu_and_mul_ref
from replica.kernels.silu_mul_triton import silu_and_mul
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

SHAPES = [(257, 2 * 14336), (3, 2 * 4864), (1, 2 * 100)] if ON_GPU else [(5, 96), (3, 3000), (2, 4, 40)]


@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul_matches_reference(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])).to(DTYPE).to(DEVICE) * 4
    out = silu_and_mul(x)
    exact = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}
    torch.testing.assert_close(out, silu_and_mul_ref(x), **exact)


def test_strided_rows():
    x = torch.randn(6, 130, device=DEVICE)[:, :128]     # row stride 130
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_rejects_odd_width():
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
