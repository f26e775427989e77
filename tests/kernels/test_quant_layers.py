"""Quantised projection weights fill row ranges part by part, as fused qkv / gate_up load: FP8
parts quantised on arrival or taken as FP8 with per-channel or per-tensor scales; GGUF parts
packed, 4-bit parts joined into one layout, parts of other layouts kept as row segments, and the
projection turned dense only by a float part."""
import pytest
import torch
import torch.nn.functional as F

from replica.kernels.fp8_linear import FP8_DTYPE, quantize_rows_ref
from replica.kernels.gguf_linear import dequantize_x_ref, quantize_x_ref
from replica.layers.quantized_linear import Fp8Weight, GGUFWeight, linear
from replica.quantization.gguf_packed import dequantize_packed, pack, with_mins
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE

CPU = torch.device("cpu")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_fp8_float_parts_are_quantised_per_row_on_arrival():
    q, k = _randn(32, 64, seed=1), _randn(16, 64, seed=2)
    weight = Fp8Weight(48, 64, CPU)
    weight.load_rows(32, 16, k)                       # parts in any order
    weight.load_rows(0, 32, q)
    weight.finish("qkv")
    whole_q, whole_scale = quantize_rows_ref(torch.cat([q, k]))
    assert torch.equal(weight.qweight.float(), whole_q.float())
    assert torch.equal(weight.scale, whole_scale[:, 0])
    assert weight.num_bytes == 48 * 64 + 4 * 48


def test_fp8_checkpoint_parts_keep_their_own_per_tensor_scales():
    weight = Fp8Weight(48, 64, CPU)
    for offset, rows, scale in ((0, 32, 0.5), (32, 8, 0.25), (40, 8, 2.0)):
        weight.load_rows(offset, rows, torch.full((rows, 64), 1.0).to(FP8_DTYPE))
        weight.load_scale(offset, rows, torch.tensor(scale))
    weight.finish("qkv")
    assert weight.scale.tolist() == [0.5] * 32 + [0.25] * 8 + [2.0] * 8
    out = linear(torch.ones(1, 64), weight)
    # x = ones → x_q = 448 at scale 1/448: out[n] = 64 · w_scale[n]
    torch.testing.assert_close(out[0], 64 * weight.scale, rtol=1e-6, atol=0)


def test_fp8_weight_without_its_scale_is_refused():
    weight = Fp8Weight(16, 32, CPU)
    weight.load_rows(0, 16, torch.ones(16, 32).to(FP8_DTYPE))
    with pytest.raises(ValueError, match="without a weight_scale"):
        weight.finish("model.layers.0")
    with pytest.raises(ValueError, match="3 values for 16 rows"):
        weight.load_scale(0, 16, torch.ones(3))


def test_gguf_parts_of_one_layout_stay_packed():
    gate, up = _randn(64, 256, seed=3), _randn(64, 256, seed=4)
    weight = GGUFWeight(128, 256, torch.float32, CPU)
    weight.load_rows(64, 64, quantize(up, "Q4_K"))
    weight.load_rows(0, 64, quantize(gate, "Q4_K"))
    weight.finish("gate_up")
    assert weight.dense is None and weight.packed.qtype == "Q4_K"
    expected = torch.cat([dequantize_packed(pack(quantize(w, "Q4_K"))) for w in (gate, up)])
    assert torch.equal(dequantize_packed(weight.packed), expected)
    assert weight.num_bytes == 128 * 256 // 2 + 4 * 128 * 256 // 32      # 5 bits a weight: fp16 scale and min a group
    x = _randn(3, 256, seed=5)
    torch.testing.assert_close(linear(x, weight), F.linear(x, expected))


def test_gguf_q4_0_beside_q4_k_gains_mins_and_stays_packed():
    q, k = _randn(32, 256, seed=6), _randn(32, 256, seed=7)
    weight = GGUFWeight(64, 256, torch.float32, CPU)
    weight.load_rows(0, 32, quantize(q, "Q4_0"))
    weight.load_rows(32, 32, quantize(k, "Q4_K"))
    weight.finish("qk")
    assert weight.dense is None and weight.packed.mins is not None
    expected = torch.cat([dequantize_packed(pack(quantize(q, "Q4_0"))),
                          dequantize_packed(with_mins(pack(quantize(k, "Q4_K"))))])     # Q4_K gone flat
    assert torch.equal(dequantize_packed(weight.packed), expected)


@pytest.mark.parametrize("triton", [False, True])
def test_q4_k_m_qkv_keeps_q_k_in_q4_k_and_v_in_q6_k_as_two_segments(triton, monkeypatch):
    """llama.cpp's Q4_K_M gives attn_v Q6_K in half the layers: the fused qkv stays packed as
    two segments (q, k joined), each multiplied by its own kernel into one output."""
    from replica.kernels import gguf_gemv_triton, ops
    monkeypatch.setattr(ops, "is_triton_enabled", lambda x: triton)
    monkeypatch.setattr(gguf_gemv_triton, "X_INT8", False)   # x as it is on a GPU too (not rounded to int8)
    device = DEVICE if triton else CPU              # Triton: the GPU, or the interpreter on the CPU
    parts = {"q": (0, 64, "Q4_K"), "k": (64, 32, "Q4_K"), "v": (96, 32, "Q6_K")}
    floats = {name: _randn(rows, 256, seed=10 + i) for i, (name, (_, rows, _)) in enumerate(parts.items())}
    weight = GGUFWeight(128, 256, torch.float32, device)
    for name in ("v", "q", "k"):                           # any order
        offset, rows, qtype = parts[name]
        weight.load_rows(offset, rows, quantize(floats[name], qtype))
    weight.finish("qkv")
    assert weight.dense is None and weight.packed is None
    assert [(offset, seg.qtype, seg.shape[0]) for offset, seg in weight.segments] == \
        [(0, "Q4_K", 96), (96, "Q6_K", 32)]
    assert weight.num_bytes == 96 * 256 * 5 // 8 + 32 * 256 * 7 // 8      # Q4_K 5 bits, Q6_K 7
    expected = torch.cat([dequantize_packed(pack(quantize(floats[name], parts[name][2])))
                          for name in ("q", "k", "v")]).to(device)
    bias = _randn(128, seed=20).to(device)
    for num_rows in (1, 6):                                # the GEMV, and dequantise + GEMM
        x = _randn(num_rows, 256, seed=5).to(device)
        want = F.linear(x, expected, bias)
        if triton and num_rows <= gguf_gemv_triton.GEMV_ROWS:   # v's 6-bit GEMV rounds x to int8
            x8, dx, _ = quantize_x_ref(x.cpu())
            want[:, 96:] = F.linear(dequantize_x_ref(x8, dx).to(device), expected[96:], bias[96:])
        torch.testing.assert_close(linear(x, weight, bias), want, rtol=1e-4, atol=1e-5)   # TF32 off


def test_gguf_parts_that_leave_rows_unwritten_are_refused():
    weight = GGUFWeight(48, 256, torch.float32, CPU)
    weight.load_rows(0, 32, quantize(_randn(32, 256, seed=8), "Q4_K"))
    with pytest.raises(ValueError, match="cover 32 of 48 rows"):
        weight.finish("model.layers.0")
    weight.load_rows(16, 32, quantize(_randn(32, 256, seed=9), "Q4_K"))
    with pytest.raises(ValueError, match="overlap at row 32 \\(a part starts at row 16\\)"):
        weight.finish("model.layers.0")


def test_a_float_part_turns_the_projection_dense():
    first, other = _randn(32, 256, seed=8), _randn(16, 256, seed=9)
    weight = GGUFWeight(48, 256, torch.float32, CPU)
    weight.load_rows(0, 32, quantize(first, "Q4_K"))
    weight.load_rows(32, 16, other)
    weight.finish("qkv")
    assert weight.packed is None and weight.dense.dtype == torch.float32
    expected = torch.cat([dequantize_packed(pack(quantize(first, "Q4_K"))), other])
    assert torch.equal(weight.dense, expected)
    assert weight.num_bytes == 48 * 256 * 4
