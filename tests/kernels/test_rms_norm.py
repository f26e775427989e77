"""RMSNorm and fused residual-add + RMSNorm against the transformers-exact references."""
import pytest
import torch

from replica.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from replica.kernels.rms_norm_triton import fused_add_rms_norm, rms_norm
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

SHAPES = [(257, 4096), (3, 5120), (16, 896)] if ON_GPU else [(5, 64), (3, 100), (2, 1)]
EXACT = {"atol": 1e-5, "rtol": 1e-5} if DTYPE == torch.float32 else {}   # {}: bf16 defaults


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DTYPE).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape):
    gen = torch.Generator().manual_seed(shape[0])
    x = _rand(*shape, gen=gen) * 3
    weight = _rand(shape[-1], gen=gen)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), **EXACT)


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm_matches_reference_and_keeps_inputs(shape):
    gen = torch.Generator().manual_seed(shape[0] + 1)
    x, residual = _rand(*shape, gen=gen), _rand(*shape, gen=gen)
    weight = _rand(shape[-1], gen=gen)
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(out, ref_out, **EXACT)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_per_head_norm_of_strided_qkv_view():
    # Qwen3's q/k norm: [T, heads, head_dim] slices of a fused projection (token stride = width)
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_heads, head_dim = (33, 16, 128) if ON_GPU else (4, 3, 32)
    qkv = _rand(num_tokens, 2 * num_heads * head_dim, gen=gen)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    weight = _rand(head_dim, gen=gen)
    out = rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape
    torch.testing.assert_close(out, rms_norm_ref(q, weight, 1e-6), **EXACT)


def test_float32_weight_promotes_output():
    gen = torch.Generator().manual_seed(2)
    x = _rand(3, 64, gen=gen)
    weight = torch.randn(64, generator=gen).to(DEVICE)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


def test_rejects_bad_arguments():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight: expected shape"):
        rms_norm(x, torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        rms_norm(x.t(), torch.ones(3, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual: expected shape"):
        fused_add_rms_norm(x, x[:2], torch.ones(64, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="x: dtype int64"):
        rms_norm(x.long(), torch.ones(64, device=DEVICE), 1e-6)
