"""GGUF weights kept packed: the repacked layout decodes to exactly what gguf's own `dequantize`
gives (Q4_K and Q6_K within the documented fp16 rounding of their group scales), our GGML encoder writes
gguf's bytes, the 4-bit nibbles and the 6-bit codes' top bits sit where the kernels read them,
Q6_K's 6 bits hold the codes its widened bytes held, and the Triton kernels match
their torch reference: the group-wise GEMV (1..16 rows; 4-bit takes 4 a launch) and dequantise +
cuBLAS (the default above MM_ROWS, a slice of rows at a time for a matrix as large as an output
head; between GEMV_ROWS and MM_ROWS the small-batch GEMM, tests/kernels/test_gguf_mm.py), with split-K, ragged N, partial K tiles, a bias, and into a column slice of an output."""
import numpy as np
import pytest
import torch

from replica.kernels.gguf_linear import dequantize_x_ref, gguf_linear_ref, quantize_x_ref
from replica.kernels.gguf_gemv_triton import GEMV_ROWS
from replica.kernels.gguf_dequant_triton import dequantize
from replica.kernels.gguf_gemv_triton import GemvConfig
from replica.kernels.gguf_mm_triton import MM_ROWS
from replica.kernels import gguf_linear_triton
from replica.kernels.gguf_linear_triton import gguf_linear
from replica.quantization import gguf_packed
from replica.quantization.gguf_packed import (
    GGUFTensor, dequantize_packed, nibbles_from_values, pack, pack_six_bit, unpack_values, with_mins,
)
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

try:                       # the GPU machine has no gguf package: its tests skip there
    import gguf
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")


def _gguf_dequantize(tensor: GGUFTensor) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data.cpu().numpy(), gguf.GGMLQuantizationType[tensor.qtype])
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensor.shape)


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w[0, :64] = 0.0                                      # an all-zero group (scale 0)
    w[1, 32:64] = torch.linspace(-0.5, 0.1, 32)          # a group with an outlier-sized range
    return w


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_repacked_layout_decodes_exactly_as_gguf(qtype):
    w = _weights(6, 256, seed=1)
    data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    tensor = GGUFTensor(qtype, torch.from_numpy(np.ascontiguousarray(data)), (6, 256))
    assert torch.equal(dequantize_packed(pack(tensor)), _gguf_dequantize(tensor))


@needs_gguf
def test_q4_k_super_layout_decodes_exactly_as_gguf_in_4_625_bits_a_weight(monkeypatch):
    monkeypatch.setattr(gguf_packed, "Q4_K_LAYOUT", "super")
    w = _weights(5, 512, seed=2)
    tensor = quantize(w, "Q4_K")
    packed = pack(tensor)
    assert packed.num_bytes * 8 == 4.625 * 5 * 512      # nibbles, sub-scales in bytes, (d, dmin) a superblock
    assert torch.equal(dequantize_packed(packed), _gguf_dequantize(tensor))
    assert ((_gguf_dequantize(tensor) - w).norm() / w.norm()).item() < 0.1      # a sane 4-bit fit


@needs_gguf
@pytest.mark.parametrize("layout", ["paired", "flat"])
def test_q4_k_paired_and_flat_layouts_decode_as_gguf_within_fp16_group_scales(layout, monkeypatch):
    """"paired" (the default) and "flat" (where a fused projection mixes Q4_K with Q4_0/Q4_1
    parts, `with_mins`) hold the same fp16 group scales and mins."""
    monkeypatch.setattr(gguf_packed, "Q4_K_LAYOUT", layout)
    w = _weights(5, 512, seed=2)
    tensor = quantize(w, "Q4_K")
    packed = pack(tensor)
    assert packed.super_scales is None and packed.num_bytes * 8 == 5 * 5 * 512
    assert packed.is_paired == (layout == "paired")
    ours, theirs = dequantize_packed(packed), _gguf_dequantize(tensor)
    # d·sc and dmin·m rounded to fp16 once: ≤ 2^-11 relative of each, times |q| ≤ 15
    scales, mins = packed.group_scales()
    bound = (2.0 ** -11) * (15 * scales.abs() + mins.abs())
    assert ((ours - theirs).abs().reshape(5, -1, 32) <= bound[..., None] + 1e-12).all()
    assert not torch.equal(ours, theirs)
    assert torch.equal(dequantize_packed(with_mins(packed)), ours)


@pytest.mark.parametrize("layout", ["paired", "super", "flat"])
def test_each_q4_k_layout_reaches_the_same_products_through_each_kernel(layout, monkeypatch):
    """The GEMV (x as it is and x rounded to int8; a partial tile, split K) and the dequantiser
    read each of Q4_K's scale layouts as the torch reference does."""
    from replica.kernels.gguf_gemv_x8_triton import quantize_x
    from replica.kernels.gguf_gemv_triton import gguf_gemv
    monkeypatch.setattr(gguf_packed, "Q4_K_LAYOUT", layout)
    tensor = quantize(_weights(24, 768, 5), "Q4_K")            # 24 groups a row: a partial tile
    packed = pack(GGUFTensor("Q4_K", tensor.data.to(DEVICE), tensor.shape))
    w = dequantize_packed(packed)
    assert torch.equal(dequantize(packed, torch.float32), w)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(5)).to(DTYPE).to(DEVICE)
    out = gguf_linear(x, packed, config=GemvConfig(8, 16, split_k=2))
    ref = x.double() @ w.double().T
    assert ((out.double() - ref).norm() / ref.norm()).item() < (1e-5 if DTYPE == torch.float32 else 1e-2)
    x8 = quantize_x(x[:2])
    x_hat = dequantize_x_ref(x8.codes.cpu(), x8.dx.cpu()).to(DEVICE).double()
    ref8 = x_hat @ w.double().T
    out8 = gguf_gemv(x8, packed)
    assert ((out8.double() - ref8).norm() / ref8.norm()).item() < (1e-6 if DTYPE == torch.float32 else 1e-2)


@needs_gguf
def test_q5_k_repacked_layout_decodes_as_gguf_within_fp16_group_scales():
    w = _weights(5, 512, seed=2)
    tensor = quantize(w, "Q5_K")
    packed = pack(tensor)
    assert packed.bits == 8 and packed.num_bytes * 8 == 9 * 5 * 512        # a byte a code + scale, min
    ours, theirs = dequantize_packed(packed), _gguf_dequantize(tensor)
    bound = (2.0 ** -11) * (31 * packed.scales.float().abs() + packed.mins.float().abs())
    assert ((ours - theirs).abs().reshape(5, -1, 32) <= bound[..., None] + 1e-12).all()
    assert ((theirs - w).norm() / w.norm()).item() < 0.06      # a sane 5-bit fit


@needs_gguf
def test_q6_k_repacked_layout_decodes_as_gguf_within_fp16_group_scales():
    w = _weights(5, 512, seed=2)
    tensor = quantize(w, "Q6_K")
    packed = pack(tensor)
    assert packed.group_size == 16 and packed.bits == 6 and packed.num_bytes * 8 == 7 * 5 * 512
    ours, theirs = dequantize_packed(packed), _gguf_dequantize(tensor)
    # d·sc rounded to fp16 once: ≤ 2^-11 relative of the scale, times |q − 32| ≤ 32
    bound = (2.0 ** -11) * 32 * packed.scales.float().abs()
    assert ((ours - theirs).abs().reshape(5, -1, 16) <= bound[..., None] + 1e-12).all()
    assert ((theirs - w).norm() / w.norm()).item() < 0.03      # a sane 6-bit fit
    assert not torch.equal(ours[2], ours[3])


def test_q6_k_at_6_bits_holds_the_codes_the_widened_bytes_hold(monkeypatch):
    tensor = quantize(_weights(4, 512, seed=8), "Q6_K")
    six = pack(tensor)
    monkeypatch.setattr(gguf_packed, "SIX_BIT_Q6_K", False)
    wide = pack(tensor)
    assert (six.bits, six.zero_point, wide.bits, wide.zero_point) == (6, 32, 8, 0)
    assert torch.equal(unpack_values(six).short() - 32, wide.qweight.short())
    assert torch.equal(dequantize_packed(six), dequantize_packed(wide))
    assert torch.equal(six.rows(1, 3).qhigh, six.qhigh[1:3]) and six.num_bytes * 8 == 7 * 4 * 512


def test_a_codes_top_bits_sit_beside_its_low_nibbles_byte():
    """The 6-bit layout the kernels read: the top bits of the code whose low nibble is nibble n
    of 4-bit word t sit at bit 8 (n // 2) + 2 (n % 2) + 4 (t % 2) of top-bit word t // 2."""
    codes = torch.randint(0, 64, (3, 64), dtype=torch.uint8)
    packed = pack_six_bit("Q6_K", codes, torch.ones(3, 4, dtype=torch.float16))
    words, high = packed.qweight.view(torch.int32), packed.qhigh.view(torch.int32)
    for e in range(64):
        t, nibble = e // 8, (e % 8) // 2 + 4 * (e % 2)
        low = (words[:, t] >> (4 * nibble)) & 0xF
        top = (high[:, t // 2] >> (8 * (nibble // 2) + 2 * (nibble % 2) + 4 * (t % 2))) & 0x3
        assert torch.equal((low | (top << 4)).to(torch.uint8), codes[:, e])
    assert torch.equal(unpack_values(packed), codes)


@needs_gguf
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_0"])
def test_encoder_writes_the_bytes_gguf_writes(qtype):
    w = _weights(4, 256, seed=3)
    ours = quantize(w, qtype).data.numpy()
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours, theirs.reshape(ours.shape))


def test_q4_0_with_explicit_mins_decodes_the_same():
    packed = pack(quantize(_weights(3, 64, seed=4), "Q4_0"))
    assert torch.equal(dequantize_packed(with_mins(packed)), dequantize_packed(packed))


def test_word_w_holds_even_elements_low_and_odd_elements_high():
    values = torch.randint(0, 16, (3, 2, 32), dtype=torch.uint8)       # [rows, groups, 32]
    words = nibbles_from_values(values).view(torch.int32)              # [rows, 8], little-endian
    elements = values.reshape(3, 64)
    for e in range(64):
        nibble = (e % 8) // 2 + 4 * (e % 2)
        assert torch.equal(((words[:, e // 8] >> (4 * nibble)) & 0xF).to(torch.uint8), elements[:, e])
    assert torch.equal(unpack_values(pack(quantize(_weights(3, 64, seed=5), "Q4_0"))),
                       quantize_codes_q4_0(_weights(3, 64, seed=5)))


def quantize_codes_q4_0(w: torch.Tensor) -> torch.Tensor:
    """Q4_0's codes in element order, read straight from GGML's blocks (byte b: b low, b+16 high)."""
    blocks = quantize(w, "Q4_0").data.reshape(w.shape[0], -1, 18)[..., 2:]
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(w.shape)


def test_malformed_block_data_is_refused():
    with pytest.raises(ValueError, match="expected uint8 data"):
        GGUFTensor("Q4_0", torch.zeros(4, 17, dtype=torch.uint8), (4, 32))
    with pytest.raises(ValueError, match="cannot stay quantised"):
        GGUFTensor("Q3_K", torch.zeros(4, 110, dtype=torch.uint8), (4, 256))


# (qtype, num_rows, n, k, has_bias, config); config None = choose_config
if ON_GPU:
    CASES = [pytest.param(qtype, m, n, k, bias, None, marks=pytest.mark.gpu)
             for qtype in ("Q4_K", "Q4_0", "Q8_0", "Q6_K", "Q5_K")
             for m, n, k, bias in ((1, 6144, 4096, False), (1, 28672, 4096, False),
                                   (1, 4096, 14336, False), (8, 4096, 4096, False),
                                   (64, 6144, 4096, False), (5, 1000, 2048, True),
                                   (2, 4096, 14336, False), (4, 1000, 2048, True))]
    CASES.append(pytest.param("Q4_K", 16, 4096, 4096, False, GemvConfig(8, 32, 4), marks=pytest.mark.gpu))
    CASES.append(pytest.param("Q6_K", 1, 128256, 4096, False, None, marks=pytest.mark.gpu))   # an output head
else:
    G = GemvConfig
    CASES = [
        # the group-wise GEMV (1..16 rows, weight read once), the small-batch GEMM, dequantise + GEMM
        ("Q4_0", 1, 40, 512, False, G(16, 4)),
        ("Q4_1", 3, 37, 256, True, G(8, 4, split_k=2)),       # ragged N, split-K, bias
        ("Q4_K", 4, 24, 768, False, G(8, 16, split_k=2)),     # 24 groups: a partial tile
        ("Q4_K", 6, 24, 512, True, G(16, 8, split_k=3)),      # two launches (4 + 2 rows), uneven runs
        ("Q4_0", 2, 40, 96, False, G(32, 2)),                  # 3 groups: a partial tile
        ("Q8_0", 2, 40, 96, True, G(16, 2)),                   # 3 groups: a partial tile
        ("Q8_0", 8, 40, 128, False, G(8, 4, split_k=2)),
        ("Q6_K", 2, 40, 256, True, G(16, 4, split_k=2)),       # 16-element groups
        ("Q6_K", 3, 24, 768, False, G(8, 32)),                 # 48 groups: a partial tile
        ("Q6_K", 1, 24, 512, True, None),
        ("Q6_K", 9, 24, 512, False, None),                     # the small-batch GEMM
        ("Q5_K", 3, 24, 512, True, G(8, 32, split_k=2)),       # 8-bit codes with mins
        ("Q5_1", 2, 40, 96, False, G(16, 4)),                  # 3 groups: a partial tile
        ("Q5_0", 1, 24, 256, True, None),
        ("Q5_K", 6, 24, 512, False, None),                     # the small-batch GEMM
        ("Q5_K", MM_ROWS + 1, 24, 512, True, None),            # dequantise + GEMM
        ("Q4_K", 1, 24, 512, True, None),
        ("Q4_0", 12, 40, 256, True, None),                     # the small-batch GEMM
    ]


@pytest.mark.parametrize("qtype,num_rows,n,k,has_bias,config", CASES)
def test_kernel_matches_torch_reference(qtype, num_rows, n, k, has_bias, config):
    gen = torch.Generator().manual_seed(num_rows * 1000 + n + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    if qtype in ("Q4_1", "Q5_1"):                # no encoder of ours: gguf's
        if gguf is None:
            pytest.skip("needs the gguf package")
        data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
        tensor = GGUFTensor(qtype, torch.from_numpy(np.ascontiguousarray(data)), (n, k))
    else:
        tensor = quantize(w, qtype)
    packed = pack(GGUFTensor(tensor.qtype, tensor.data.to(DEVICE), tensor.shape))
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DTYPE).to(DEVICE) if has_bias else None
    out = gguf_linear(x, packed, bias, config=config)
    ref = gguf_linear_ref(x.double(), packed, None if bias is None else bias.double())
    if packed.bits == 6 and (config is not None or num_rows <= GEMV_ROWS):   # the GEMV rounds x to int8
        x8, dx, _ = quantize_x_ref(x.float().cpu())
        x_hat = dequantize_x_ref(x8, dx).to(DEVICE).double()
        ref = gguf_linear_ref(x_hat, packed, None if bias is None else bias.double())
    assert out.shape == (num_rows, n) and out.dtype == DTYPE
    assert not out.isnan().any()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if DTYPE == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q8_0", "Q6_K", "Q5_0", "Q5_K"])
def test_triton_dequantize_equals_torch_reference(qtype):
    tensor = quantize(_weights(24, 768, 3), qtype)        # 24 groups a row: a partial tile
    packed = pack(GGUFTensor(qtype, tensor.data.to(DEVICE), tensor.shape))
    assert torch.equal(dequantize(packed, torch.float32), dequantize_packed(packed, torch.float32))


@pytest.mark.parametrize("num_rows", [1, 6, MM_ROWS + 1])   # the GEMV, the small-batch GEMM, dequantise + GEMM
def test_results_land_in_a_column_slice_of_a_wider_output(num_rows):
    packed = pack(GGUFTensor("Q6_K", quantize(_weights(24, 256, 6), "Q6_K").data.to(DEVICE), (24, 256)))
    x = torch.randn(num_rows, 256).to(DTYPE).to(DEVICE)
    out = torch.full((num_rows, 40), -7.0, dtype=DTYPE, device=DEVICE)
    returned = gguf_linear(x, packed, out=out[:, 8:32])
    assert returned.data_ptr() == out[:, 8:32].data_ptr()
    assert (out[:, :8] == -7).all() and (out[:, 32:] == -7).all()
    torch.testing.assert_close(out[:, 8:32], gguf_linear(x, packed))


def test_a_large_matrix_is_dequantised_a_slice_of_rows_at_a_time(monkeypatch):
    seen_rows = []
    dequantize_rows = gguf_linear_triton.gguf_dequant_triton.dequantize

    def recording(packed, dtype):
        seen_rows.append(packed.shape[0])
        return dequantize_rows(packed, dtype)
    monkeypatch.setattr(gguf_linear_triton.gguf_dequant_triton, "dequantize", recording)
    monkeypatch.setattr(gguf_linear_triton, "DEQUANT_WHOLE", 32 * 256)     # 32 rows of K = 256 at once
    monkeypatch.setattr(gguf_linear_triton, "DEQUANT_SLICE", 16 * 256)     # then slices of 16 rows
    packed = pack(GGUFTensor("Q4_K", quantize(_weights(40, 256, 7), "Q4_K").data.to(DEVICE), (40, 256)))
    x = torch.randn(MM_ROWS + 1, 256).to(DTYPE).to(DEVICE)          # above the small-batch GEMM's rows
    bias = torch.randn(40).to(DTYPE).to(DEVICE)
    out = gguf_linear(x, packed, bias)
    assert seen_rows == [16, 16, 8]
    seen_rows.clear()
    whole = pack(GGUFTensor("Q4_K", quantize(_weights(32, 256, 8), "Q4_K").data.to(DEVICE), (32, 256)))
    gguf_linear(x, whole)
    assert seen_rows == [32]
    ref = gguf_linear_ref(x.double(), packed, bias.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < (1e-5 if DTYPE == torch.float32 else 1e-2)


def test_rejects_bad_arguments():
    packed = pack(quantize(torch.randn(32, 64), "Q4_0"))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="x: expected 64 columns"):
        gguf_linear(torch.randn(2, 96), packed)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gguf_linear(torch.randn(17, 64), packed, config=GemvConfig(8, 2))
    with pytest.raises(ValueError, match="bias: expected shape"):
        gguf_linear(x, packed, torch.randn(31))
    with pytest.raises(ValueError, match="out: expected shape"):
        gguf_linear(x, packed, out=torch.empty(2, 31))
    broken = pack(quantize(torch.randn(32, 64), "Q4_0"))
    broken.scales = broken.scales.float()
    with pytest.raises(ValueError, match="scales: dtype float32 not supported"):
        gguf_linear(x, broken)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_replay_equals_eager():
    gen = torch.Generator().manual_seed(7)
    packed = pack(quantize((torch.randn(4096, 4096, generator=gen) * 0.02).to(DEVICE), "Q4_K"))
    static_x = torch.randn(1, 4096, generator=gen).to(DTYPE).to(DEVICE)
    gguf_linear(static_x, packed)                             # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gguf_linear(static_x, packed)
    for _ in range(3):
        static_x.copy_(torch.randn(1, 4096, generator=gen).to(DTYPE))
        graph.replay()
        assert torch.equal(static_out, gguf_linear(static_x, packed))
