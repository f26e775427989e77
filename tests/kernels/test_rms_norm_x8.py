"""The RMSNorm that writes the 4-bit GEMV's int8 x (`rms_norm_x8_triton`): its codes and scales
against the torch reference of the same arithmetic, its residual against `fused_add_rms_norm`'s,
and the GEMV that takes them (rstd applied from the parts of Σ s²) against W times the rounded,
normalised x; then the model's `norm_for` choosing it only where the next matrix takes int8 x."""
import pytest
import torch

from replica.kernels import gguf_gemv_triton
from replica.kernels.gguf_gemv_triton import GemvConfig, gguf_gemv
from replica.kernels.gguf_linear import XInt8, dequantize_x_ref
from replica.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from replica.kernels.silu_mul_triton import silu_and_mul
from replica.kernels.rms_norm_x8_triton import add_rms_norm_x8, add_rms_norm_x8_ref
from replica.layers import quantized_linear
from replica.layers.quantized_linear import GGUFWeight, norm_for
from replica.quantization.gguf_packed import dequantize_packed, pack
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

EPS = 1e-5


@pytest.fixture(autouse=True)
def x_int8(monkeypatch):
    monkeypatch.setattr(gguf_gemv_triton, "X_INT8", True)


def _rows(num_rows: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(num_rows, k, generator=torch.Generator().manual_seed(seed)) * scale).to(DTYPE).to(DEVICE)


def _packed(qtype: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return pack(quantize((torch.randn(n, k, generator=gen) * 0.05).to(DEVICE), qtype))


@pytest.mark.parametrize("num_rows,k,has_residual", [(1, 96, True), (3, 800, True), (2, 4096, False)])
def test_norm_writes_the_rounded_row_and_the_residual(num_rows, k, has_residual):
    x = _rows(num_rows, k, seed=k, scale=3.0)
    residual = _rows(num_rows, k, seed=k + 1) if has_residual else None
    weight = _rows(1, k, seed=7)[0]
    rounded, new_residual = add_rms_norm_x8(x, residual, weight, EPS)
    codes, dx, xsum, rstd, summed = add_rms_norm_x8_ref(x.cpu(), None if residual is None else residual.cpu(),
                                                        weight.cpu(), EPS)
    assert isinstance(rounded, XInt8) and rounded.sumsq.shape == (num_rows, -(-k // 512))
    if has_residual:
        assert torch.equal(new_residual.cpu(), fused_add_rms_norm_ref(x, residual, weight, EPS)[1].cpu())
    else:
        assert new_residual is x
    assert torch.equal(new_residual.cpu(), summed)
    assert torch.equal(rounded.dx.cpu(), dx)
    if ON_GPU:       # the GPU's 127 / amax may differ in its last bit: a tie may round the other way
        assert (rounded.codes.cpu().int() - codes.int()).abs().max() <= 1
    else:
        assert torch.equal(rounded.codes.cpu(), codes) and torch.equal(rounded.xsum.cpu(), xsum)
    torch.testing.assert_close(rounded.rstd().cpu(), rstd, rtol=1e-5, atol=0)
    # rstd · x̂ is the normalised row within half a rounding step an element
    x_hat = rstd[:, None] * dequantize_x_ref(rounded.codes.cpu(), rounded.dx.cpu())
    normed = rms_norm_ref(summed.float(), weight.cpu().float(), EPS)
    step = (rstd[:, None] * dx).repeat_interleave(32, dim=1)
    assert ((x_hat - normed).abs() <= step * 0.5 + 1e-4 * normed.abs() + 1e-30).all()


if ON_GPU:
    CASES = [pytest.param(qtype, 1, n, k, None, marks=pytest.mark.gpu)
             for qtype in ("Q4_0", "Q4_K") for n, k in ((6144, 4096), (28672, 4096))]
else:
    CASES = [("Q4_0", 1, 40, 512, GemvConfig(16, 4)),
             ("Q4_K", 3, 37, 768, GemvConfig(8, 4, split_k=2)),      # ragged N, split-K, 2 parts of Σ s²
             ("Q4_K", 6, 24, 512, GemvConfig(16, 8)),                # two launches (4 + 2 rows)
             ("Q4_0", 2, 24, 256, None)]


@pytest.mark.parametrize("qtype,num_rows,n,k,config", CASES)
def test_gemv_on_the_norms_codes_is_w_times_the_normalised_rounded_x(qtype, num_rows, n, k, config):
    packed = _packed(qtype, n, k, seed=n + k)
    x, residual = _rows(num_rows, k, seed=1, scale=2.0), _rows(num_rows, k, seed=2)
    weight = _rows(1, k, seed=3)[0]
    bias = None if ON_GPU else _rows(1, n, seed=4)[0]
    rounded, _ = add_rms_norm_x8(x, residual, weight, EPS)
    out = gguf_gemv(rounded, packed, bias, config=config)
    codes, dx, _, rstd, summed = add_rms_norm_x8_ref(x.cpu(), residual.cpu(), weight.cpu(), EPS)
    w = dequantize_packed(packed, torch.float32).cpu().double()
    ref = (rstd[:, None] * dequantize_x_ref(codes, dx)).double() @ w.T
    if bias is not None:
        ref += bias.cpu().double()
    rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if DTYPE == torch.float32 else 1e-2), rel
    exact = rms_norm_ref(summed.float(), weight.cpu().float(), EPS).double() @ w.T
    if bias is not None:
        exact += bias.cpu().double()
    assert ((out.cpu().double() - exact).norm() / exact.norm()).item() < 2e-2
    if not ON_GPU and n % 2 == 0:    # the gated epilogue takes the scaled products too
        plain = gguf_gemv(rounded, packed, config=GemvConfig(8, 4))
        torch.testing.assert_close(gguf_gemv(rounded, packed, config=GemvConfig(8, 4), gated=True),
                                   silu_and_mul(plain))


def test_a_rounded_row_for_an_8_bit_matrix_is_refused():
    rounded, _ = add_rms_norm_x8(_rows(1, 64, seed=1), None, _rows(1, 64, seed=2)[0], EPS)
    with pytest.raises(ValueError, match="4- or 6-bit matrix, but Q8_0 is 8-bit"):
        gguf_gemv(rounded, _packed("Q8_0", 8, 64, seed=3))


def _gguf_weight(qtype: str, n: int, k: int) -> GGUFWeight:
    weight = GGUFWeight(n, k, DTYPE, DEVICE)
    gen = torch.Generator().manual_seed(n)
    weight.load_rows(0, n, quantize((torch.randn(n, k, generator=gen) * 0.05).to(DEVICE), qtype))
    weight.finish("test")
    return weight


def test_norm_for_rounds_only_before_a_4_bit_gemv_on_int8_x(monkeypatch):
    if not ON_GPU:
        monkeypatch.setattr("replica.kernels.ops.is_triton_enabled", lambda t: True)
    x, residual, norm_weight = _rows(2, 256, seed=1), _rows(2, 256, seed=2), _rows(1, 256, seed=3)[0]
    q4 = _gguf_weight("Q4_K", 64, 256)
    rounded, new_residual = norm_for(q4, x, residual, norm_weight, EPS)
    assert isinstance(rounded, XInt8)
    unrounded = q4.apply(rms_norm_ref(new_residual, norm_weight, EPS), None)
    torch.testing.assert_close(quantized_linear.linear(rounded, q4), unrounded, rtol=0.05, atol=0.05)
    for other, rows in ((_gguf_weight("Q8_0", 64, 256), 2), (q4, gguf_gemv_triton.GEMV_ROWS + 1)):
        normed, _ = norm_for(other, _rows(rows, 256, seed=4), None, norm_weight, EPS)
        assert isinstance(normed, torch.Tensor)
    monkeypatch.setattr(gguf_gemv_triton, "X_INT8", False)
    assert isinstance(norm_for(q4, x, residual, norm_weight, EPS)[0], torch.Tensor)
    monkeypatch.setattr(gguf_gemv_triton, "X_INT8", True)
    monkeypatch.setattr(quantized_linear, "FUSE_GGUF_X8_NORM", False)
    assert isinstance(norm_for(q4, x, residual, norm_weight, EPS)[0], torch.Tensor)
