"""The GGUF decode GEMV's fused epilogues against the unfused kernels they replace, exactly:
silu(gate) · up in gate_up's GEMV (rows interleaved gate, up inside a program), and a split-K
GEMV's partials summed by the next RMSNorm with the residual add."""
import pytest
import torch

from replica.kernels import gguf_gemv_triton
from replica.kernels.gguf_gemv_triton import GemvConfig, gguf_gemv, gguf_gemv_add_rms_norm
from replica.kernels.gguf_linear_triton import gguf_linear_add_rms_norm, gguf_linear_gated
from replica.kernels.gguf_linear import XInt8
from replica.kernels.rms_norm_triton import fused_add_rms_norm
from replica.kernels.rms_norm_x8_triton import add_rms_norm_x8
from replica.kernels.silu_mul_triton import silu_and_mul
from replica.quantization.gguf_packed import pack
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE, DTYPE


def _packed(qtype: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return pack(quantize((torch.randn(n, k, generator=gen) * 0.05).to(DEVICE), qtype))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("num_rows,intermediate,block_n", [(1, 24, 4), (3, 18, 4), (3, 32, 8)])
def test_gated_gemv_is_silu_mul_of_the_plain_gemv(qtype, num_rows, intermediate, block_n):
    """18 columns at 2 a program: the last program's second column is masked. (The epilogue
    does not depend on the number of rows: one of 1 and two of 3, not all six pairs.)"""
    packed = _packed(qtype, 2 * intermediate, 256, seed=intermediate + num_rows)
    x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(1)).to(DTYPE).to(DEVICE)
    config = GemvConfig(block_n=block_n, groups=4, split_k=1)
    act = gguf_gemv(x, packed, config=config, gated=True)
    assert act.shape == (num_rows, intermediate)
    assert torch.equal(act, silu_and_mul(gguf_gemv(x, packed, config=config)))


def test_gated_gemv_with_a_split_plan_runs_unfused_to_the_same_result():
    packed = _packed("Q4_K", 32, 512, seed=2)
    x = torch.randn(2, 512).to(DTYPE).to(DEVICE)
    split = GemvConfig(block_n=8, groups=4, split_k=2)      # 4 x 2 programs of 2 tiles
    assert torch.equal(gguf_gemv(x, packed, config=split, gated=True),
                       silu_and_mul(gguf_gemv(x, packed, config=split)))


def test_gated_entry_point_runs_unfused_above_the_gemv_rows():
    packed = _packed("Q4_0", 48, 256, seed=3)
    x = torch.randn(gguf_gemv_triton.GEMV_ROWS + 2, 256).to(DTYPE).to(DEVICE)
    from replica.kernels.gguf_linear_triton import gguf_linear
    assert torch.equal(gguf_linear_gated(x, packed), silu_and_mul(gguf_linear(x, packed)))
    with pytest.raises(ValueError, match="even number of rows"):
        gguf_linear_gated(x, _packed("Q4_0", 17, 256, seed=4))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("num_rows", [1, 3])
def test_split_k_partials_summed_in_the_norm_equal_gemv_then_add_norm(qtype, num_rows, monkeypatch):
    n, k = 24, 256                 # K cut into 4 splits of 64 columns
    packed = _packed(qtype, n, k, seed=k + num_rows)
    gen = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE).to(DEVICE)
    residual = torch.randn(num_rows, n, generator=gen).to(DTYPE).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(n, generator=gen)).to(DTYPE).to(DEVICE)
    split = GemvConfig(block_n=8, groups=2, split_k=4)      # 3 programs along N
    monkeypatch.setitem(gguf_gemv_triton.TUNED, (qtype, num_rows, n, k), split)
    normed, new_residual = gguf_linear_add_rms_norm(x, packed, residual, weight, 1e-5)
    want_normed, want_residual = fused_add_rms_norm(gguf_gemv(x, packed, config=split), residual, weight, 1e-5)
    assert torch.equal(new_residual, want_residual)
    assert torch.equal(normed, want_normed)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
@pytest.mark.parametrize("num_rows,split_k", [(1, 2), (3, 4)])
def test_split_k_partials_summed_in_the_x8_norm_equal_gemv_then_the_x8_norm(qtype, num_rows, split_k, monkeypatch):
    """Before a 4-bit GEMV on int8 x the fused norm writes the same codes, scales and Σ s² as
    the GEMV's own sum kernel followed by `add_rms_norm_x8` (what `norm_for` runs unfused)."""
    n, k = 64, 256                 # two x8 groups of the norm's row; K cut into 2 or 4 splits
    packed = _packed(qtype, n, k, seed=k + num_rows)
    gen = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE).to(DEVICE)
    residual = torch.randn(num_rows, n, generator=gen).to(DTYPE).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(n, generator=gen)).to(DTYPE).to(DEVICE)
    split = GemvConfig(block_n=16, groups=2, split_k=split_k)      # 4 programs along N
    monkeypatch.setitem(gguf_gemv_triton.TUNED, (qtype, num_rows, n, k), split)
    rounded, new_residual = gguf_linear_add_rms_norm(x, packed, residual, weight, 1e-5, to_x8=True)
    want, want_residual = add_rms_norm_x8(gguf_gemv(x, packed, config=split), residual, weight, 1e-5)
    assert isinstance(rounded, XInt8)
    assert torch.equal(new_residual, want_residual)
    for field in ("codes", "dx_sum", "sumsq"):
        assert torch.equal(getattr(rounded, field), getattr(want, field)), field


def test_the_x8_norm_takes_partials_only_beside_a_residual():
    residual, weight = torch.zeros(1, 64).to(DTYPE).to(DEVICE), torch.ones(64).to(DTYPE).to(DEVICE)
    partial = torch.zeros(2, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x=None and a residual"):
        add_rms_norm_x8(None, None, weight, 1e-5, partial=partial)
    with pytest.raises(ValueError, match="partial"):
        add_rms_norm_x8(None, residual, weight, 1e-5, partial=partial[:, :, :32])


def test_add_norm_declines_where_the_gemv_does_not_split_k(monkeypatch):
    packed = _packed("Q4_0", 32, 256, seed=9)
    x, residual, weight = torch.randn(1, 256), torch.randn(1, 32), torch.ones(32)
    x, residual, weight = (t.to(DTYPE).to(DEVICE) for t in (x, residual, weight))
    monkeypatch.setitem(gguf_gemv_triton.TUNED, ("Q4_0", 1, 32, 256), GemvConfig(block_n=4, groups=4, split_k=1))
    assert gguf_gemv_add_rms_norm(x, packed, residual, weight, 1e-5) is None
    many = torch.randn(gguf_gemv_triton.GEMV_ROWS + 1, 256).to(DTYPE).to(DEVICE)
    assert gguf_linear_add_rms_norm(many, packed, residual.expand(many.shape[0], -1).contiguous(), weight,
                                    1e-5) is None
