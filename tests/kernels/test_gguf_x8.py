"""The 4- and 6-bit GEMV with x rounded to int8 (`gguf_gemv_x8_triton`, dp4a on CUDA, emulated under
the interpreter): x's rounding against its torch reference and its error bound, and the GEMV
against W times the rounded x (exact arithmetic up to the fp32 sums' order), through every path
of the 4-bit GEMV: split-K, a partial tile, ragged N, bias, several rows, the gated epilogue and
the split-K sum inside the next RMSNorm."""
import dataclasses

import pytest
import torch

from replica.kernels import gguf_gemv_plan, gguf_gemv_triton
from replica.kernels.gguf_gemv_triton import GemvConfig, gguf_gemv
from replica.kernels.gguf_gemv_x8_triton import quantize_x
from replica.kernels.gguf_linear import dequantize_x_ref, quantize_x_ref
from replica.kernels.gguf_linear_triton import gguf_linear_add_rms_norm
from replica.kernels.rms_norm_triton import fused_add_rms_norm
from replica.kernels.silu_mul_triton import silu_and_mul
from replica.quantization.gguf_packed import dequantize_packed, pack
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU


@pytest.fixture(autouse=True)
def x_int8(monkeypatch):
    monkeypatch.setattr(gguf_gemv_triton, "X_INT8", True)


def _x(num_rows: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0                              # an all-zero group: scale 0, no NaN
    x[-1, 32:64] *= 100.0                        # a group of outliers next to ordinary ones
    return x.to(DTYPE).to(DEVICE)


def _packed(qtype: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return pack(quantize((torch.randn(n, k, generator=gen) * 0.05).to(DEVICE), qtype))


@pytest.mark.parametrize("num_rows,k", [(1, 64), (3, 800), (2, 4096)])
def test_x_rounds_as_the_reference_and_within_half_a_step(num_rows, k):
    x = _x(num_rows, k, seed=k)
    rounded = quantize_x(x)
    x8, dx, xsum = rounded.codes, rounded.dx, rounded.xsum
    ref8, ref_dx, ref_sum = quantize_x_ref(x)
    assert torch.equal(dx.cpu(), ref_dx.cpu())
    if ON_GPU:       # the GPU's 127 / amax may differ in its last bit: a tie may round the other way
        assert (x8.cpu().int() - ref8.cpu().int()).abs().max() <= 1
    else:
        assert torch.equal(x8.cpu(), ref8.cpu())
        assert torch.equal(xsum.cpu(), ref_sum.cpu())
    x_hat = dequantize_x_ref(x8.cpu(), dx.cpu())
    step = dx.cpu().repeat_interleave(32, dim=1)
    assert ((x_hat - x.float().cpu()).abs() <= step * 0.5001 + 1e-30).all()
    assert (x8.cpu().int().abs() <= 127).all() and (x8.cpu().int().abs().amax() == 127)
    assert (dx.cpu()[0, 0] == 0) and (x_hat[0, :32] == 0).all()


def _rounded_x_reference(x: torch.Tensor, packed) -> torch.Tensor:
    x8, dx, _ = quantize_x_ref(x.cpu())
    return dequantize_x_ref(x8, dx).double() @ dequantize_packed(packed, torch.float32).cpu().double().T


if ON_GPU:
    CASES = [pytest.param(qtype, 1, n, k, None, marks=pytest.mark.gpu)
             for qtype in ("Q4_0", "Q4_K", "Q6_K") for n, k in ((6144, 4096), (28672, 4096), (4096, 14336))]
    CASES.append(pytest.param("Q6_K", 1, 128256, 4096, None, marks=pytest.mark.gpu))    # an output head
else:
    G = GemvConfig
    CASES = [("Q4_0", 1, 40, 512, G(16, 4)),
             ("Q4_K", 3, 37, 256, G(8, 4, split_k=2)),     # ragged N, split-K
             ("Q4_0", 2, 24, 768, G(8, 16, split_k=2)),    # 24 groups: a partial tile
             ("Q4_K", 6, 24, 512, G(16, 8, split_k=3)),    # two launches (4 + 2 rows)
             ("Q4_0", 1, 24, 256, None),
             ("Q6_K", 3, 37, 256, G(8, 4, split_k=2)),     # 6-bit: ragged N, split-K
             ("Q6_K", 2, 24, 768, G(8, 16)),               # a partial tile
             ("Q6_K", 1, 24, 512, None)]


@pytest.mark.parametrize("qtype,num_rows,n,k,config", CASES)
def test_gemv_is_w_times_the_rounded_x(qtype, num_rows, n, k, config):
    packed = _packed(qtype, n, k, seed=n + k)
    x = _x(num_rows, k, seed=num_rows)
    bias = torch.randn(n).to(DTYPE).to(DEVICE) if not ON_GPU else None
    out = gguf_gemv(x, packed, bias, config=config)
    ref = _rounded_x_reference(x, packed)
    if bias is not None:
        ref += bias.cpu().double()
    rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if DTYPE == torch.float32 else 1e-2), rel
    # and x's rounding keeps the product close to W times x itself
    exact = x.cpu().double() @ dequantize_packed(packed, torch.float32).cpu().double().T
    if bias is not None:
        exact += bias.cpu().double()
    assert ((out.cpu().double() - exact).norm() / exact.norm()).item() < 2e-2


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
def test_gated_and_norm_epilogues_take_the_int8_x_too(qtype, monkeypatch):
    # Tiles as large as keep several programs (the interpreter's time grows with their number):
    # gated 6 programs of 4 gate and 4 up rows, 2 tiles along K; split 3 x 4 programs of 16 rows.
    packed = _packed(qtype, 48, 256, seed=5)
    x = _x(2, 256, seed=2)
    config = GemvConfig(block_n=8, groups=4, split_k=1)
    assert torch.equal(gguf_gemv(x, packed, config=config, gated=True),
                       silu_and_mul(gguf_gemv(x, packed, config=config)))
    split = GemvConfig(block_n=16, groups=2, split_k=4)
    monkeypatch.setitem(gguf_gemv_triton.TUNED, (qtype, 2, 48, 256), split)
    residual = torch.randn(2, 48).to(DTYPE).to(DEVICE)
    weight = torch.ones(48).to(DTYPE).to(DEVICE)
    normed, new_residual = gguf_linear_add_rms_norm(x, packed, residual, weight, 1e-5)
    want_normed, want_residual = fused_add_rms_norm(gguf_gemv(x, packed, config=split), residual, weight, 1e-5)
    assert torch.equal(new_residual, want_residual) and torch.equal(normed, want_normed)
    ref = _rounded_x_reference(x, packed) + residual.cpu().double()
    assert ((new_residual.cpu().double() - ref).norm() / ref.norm()).item() < (1e-5 if DTYPE == torch.float32 else 1e-2)



@pytest.mark.parametrize("qtype,num_rows,n,k,config", [c for c in CASES if not ON_GPU])
def test_unrolled_tiles_give_the_loops_sums_bit_for_bit(qtype, num_rows, n, k, config):
    packed = _packed(qtype, n, k, seed=n + k)
    x = _x(num_rows, k, seed=num_rows)
    looped = gguf_gemv(x, packed, config=config)
    unrolled = dataclasses.replace(config or gguf_gemv_triton.choose_gemv_config(num_rows, n, k, packed.bits, DEVICE),
                                   unroll=True)
    assert torch.equal(gguf_gemv(x, packed, config=unrolled), looped)


def test_only_splits_of_equal_tile_counts_unroll():
    plan = gguf_gemv_plan.plan_gemv
    cpu = torch.device("cpu")
    even = plan(1, _packed("Q4_0", 24, 768, 1), cpu, GemvConfig(8, 4, split_k=2), True)    # 24 groups: 6 tiles, 3 a split
    assert (even.split_k, even.unrolled_tiles(16), even.unrolled_tiles(2)) == (2, 3, 0)
    ragged = plan(1, _packed("Q4_0", 24, 768, 1), cpu, GemvConfig(8, 16, split_k=2), True)  # 2 tiles, the 2nd partial
    assert (ragged.split_k, ragged.unrolled_tiles(16)) == (2, 1)
    uneven = plan(1, _packed("Q4_0", 24, 640, 1), cpu, GemvConfig(8, 4, split_k=2), True)   # 5 tiles: 3 + 2
    assert (uneven.split_k, uneven.unrolled_tiles(16)) == (2, 0)
