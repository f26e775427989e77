"""The small-batch GGUF GEMM (`gguf_mm_triton`: W decoded in registers, multiplied with tl.dot)
against the torch reference, for every packed layout: 4-bit with and without mins (Q4_K's
paired, super and flat scales), 6-bit Q6_K and the 8-bit types (Q6_K widened to bytes: 16-element
groups); split K, ragged N, a bias, rows padded to the MMA's 16 and to 32; and the entry point
`gguf_linear` takes it between the GEMV's rows and MM_ROWS, dequantise + GEMM above."""
import pytest
import torch

import triton
import triton.language as tl

from replica.kernels import gguf_linear_triton, gguf_mm_triton
from replica.kernels.gguf_dequant_triton import tile4_16, tile6_16, weight_operands
from replica.kernels.gguf_gemv_triton import GEMV_ROWS
from replica.kernels.gguf_linear import gguf_linear_ref
from replica.kernels.gguf_mm_triton import MM_ROWS, MmConfig, gguf_mm
from replica.quantization import gguf_packed
from replica.quantization.gguf_packed import GGUFTensor, dequantize_packed, pack, with_mins
from replica.quantization.gguf_quantize import quantize
from tests.kernels.paged_batch import DEVICE, DTYPE


def _packed(qtype: str, n: int, k: int, seed: int, layout: str = "paired", six_bit: bool = True):
    if qtype == "Q4_1":                 # no encoder of ours: Q4_0 with explicit mins is a Q4_1 matrix
        return with_mins(_packed("Q4_0", n, k, seed))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[0, :64] = 0.0                                      # an all-zero group (scale 0)
    tensor = quantize(w, qtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_packed, "Q4_K_LAYOUT", layout)
        patch.setattr(gguf_packed, "SIX_BIT_Q6_K", six_bit)
        return pack(GGUFTensor(qtype, tensor.data.to(DEVICE), tensor.shape))


def _assert_matches_reference(out: torch.Tensor, x: torch.Tensor, packed, bias=None) -> None:
    ref = gguf_linear_ref(x.double(), packed, None if bias is None else bias.double())
    assert out.shape == ref.shape and out.dtype == x.dtype and not out.isnan().any()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if x.dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("dtype", [DTYPE, torch.float16], ids=["model_dtype", "fp16"])
@pytest.mark.parametrize("qtype, layout, six_bit", [
    ("Q4_0", "paired", True), ("Q4_1", "paired", True), ("Q4_K", "paired", True), ("Q4_K", "super", True),
    ("Q6_K", "paired", True), ("Q6_K", "paired", False), ("Q8_0", "paired", True), ("Q5_K", "paired", True),
])
def test_every_packed_layout_multiplies_as_its_dequantised_weights(qtype, layout, six_bit, dtype):
    """fp16 x takes the 4-bit layouts through `tile4_16` on the CPU too (bf16 only on a GPU: the
    interpreter's bf16 bit casts are not faithful)."""
    packed = _packed(qtype, 40, 512, seed=1, layout=layout, six_bit=six_bit)     # N = 40: a partial tile of 32
    assert packed.bits == (4 if qtype.startswith("Q4") else 6 if six_bit and qtype == "Q6_K" else 8)
    x = torch.randn(5, 512).to(dtype).to(DEVICE)
    # 4 K tiles of 128 over 2 splits: partials summed; then one program along K
    _assert_matches_reference(gguf_mm(x, packed, config=MmConfig(block_n=32, block_k=128, split_k=2)), x, packed)
    _assert_matches_reference(gguf_mm(x, packed, config=MmConfig(block_n=32, block_k=512, split_k=1)), x, packed)


def test_flat_q4_k_scales_and_a_bias_into_a_column_slice():
    packed = with_mins(_packed("Q4_K", 48, 256, seed=2))
    assert packed.mins is not None and not packed.is_paired
    x = torch.randn(17, 256).to(DTYPE).to(DEVICE)                 # rows padded to 32
    bias = torch.randn(48).to(DTYPE).to(DEVICE)
    out = torch.full((17, 64), -7.0, dtype=DTYPE, device=DEVICE)
    returned = gguf_mm(x, packed, bias, out=out[:, 8:56], config=MmConfig(block_n=16, block_k=64, split_k=3))
    assert returned.data_ptr() == out[:, 8:56].data_ptr()
    assert (out[:, :8] == -7).all() and (out[:, 56:] == -7).all()
    _assert_matches_reference(out[:, 8:56], x, packed, bias)
    _assert_matches_reference(gguf_mm(x, packed, bias, config=MmConfig(block_n=16, block_k=64, split_k=1)),
                              x, packed, bias)


def test_a_k_tile_that_does_not_divide_k_is_halved_until_it_does():
    packed = _packed("Q4_0", 32, 96, seed=3)                       # 3 groups: tiles of 32
    x = torch.randn(6, 96).to(DTYPE).to(DEVICE)
    _assert_matches_reference(gguf_mm(x, packed, config=MmConfig(block_n=16, block_k=128, split_k=2)), x, packed)


def test_gguf_linear_takes_the_gemm_between_the_gemv_rows_and_mm_rows(monkeypatch):
    called = []
    real = gguf_mm_triton.gguf_mm
    monkeypatch.setattr(gguf_mm_triton, "gguf_mm", lambda *args, **kw: called.append(args[0].shape[0]) or real(*args, **kw))
    packed = _packed("Q4_K", 32, 256, seed=4)
    for num_rows in (GEMV_ROWS, GEMV_ROWS + 1, MM_ROWS, MM_ROWS + 1):
        x = torch.randn(num_rows, 256).to(DTYPE).to(DEVICE)
        _assert_matches_reference(gguf_linear_triton.gguf_linear(x, packed), x, packed)
    assert called == [GEMV_ROWS + 1, MM_ROWS]


def test_more_rows_than_mm_rows_are_refused():
    packed = _packed("Q4_0", 16, 64, seed=5)
    with pytest.raises(ValueError, match=f"at most {MM_ROWS} rows"):
        gguf_mm(torch.randn(MM_ROWS + 1, 64).to(DTYPE).to(DEVICE), packed)



@triton.jit
def _decode_16_kernel(q_ptr, h_ptr, s_ptr, m_ptr, out_ptr, N, K, stride_qn, stride_hn, stride_sn,
                      BITS: tl.constexpr, ZERO_POINT: tl.constexpr, HAS_MIN: tl.constexpr, PAIRED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    if BITS == 4:
        w = tile4_16(q_ptr, s_ptr, m_ptr, rows.to(tl.int64), rows < N, k0 // 32, K // 32, stride_qn, stride_sn,
                     ZERO_POINT, HAS_MIN, False, PAIRED, BLOCK_N, BLOCK_K // 32, out_ptr.dtype.element_ty)
    else:
        w = tile6_16(q_ptr, h_ptr, s_ptr, rows.to(tl.int64), rows < N, k0 // 32, K // 32, stride_qn, stride_hn,
                     stride_sn, BLOCK_N, BLOCK_K // 32, out_ptr.dtype.element_ty)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=(rows < N)[:, None])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "Q4_1", "Q4_K"])
def test_the_16_bit_decoders_give_the_dequantised_weights_rounded_to_fp16(qtype):
    """BASE + code ORed into each 16-bit half, minus BASE and the zero point, times the scale:
    Q4_0 and 6-bit Q6_K (fp16 scales) equal the fp32 dequantisation rounded to fp16 bit for bit;
    with a min, an unfused multiply-add (the interpreter's) rounds code · scale before the min
    is added: an error within one fp16 rounding of the row's largest values."""
    packed = _packed(qtype, 40, 256, seed=6)
    assert packed.bits == (6 if qtype == "Q6_K" else 4)
    qweight, high, scales, mins = weight_operands(packed)
    out = torch.full((40, 256), float("nan"), dtype=torch.float16, device=DEVICE)
    _decode_16_kernel[(3, 2)](qweight, high, scales, mins, out, 40, 256, qweight.stride(0), high.stride(0),
                              scales.stride(0), BITS=packed.bits, ZERO_POINT=packed.zero_point,
                              HAS_MIN=packed.has_min, PAIRED=packed.is_paired, BLOCK_N=16, BLOCK_K=128)
    ref = dequantize_packed(packed).to(torch.float16).to(DEVICE)
    if not packed.has_min:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=2 ** -10, atol=2 ** -10 * ref.abs().max().item())


@pytest.mark.parametrize("qtype, six_bit", [("Q4_0", True), ("Q4_1", True), ("Q6_K", True), ("Q6_K", False),
                                            ("Q8_0", True)])
def test_fp16_scales_read_in_pairs_give_the_same_products(qtype, six_bit, monkeypatch):
    """`load_fp16_pairs` (two fp16 scales a 4-byte load, so the loop's pipeliner prefetches
    them) changes where the scales come from, not the arithmetic: the same products, for the
    4- and 6-bit 16-bit decoders and the 8-bit types' fp32 one (Q6_K widened: 16-element groups)."""
    packed = _packed(qtype, 40, 512, seed=7, six_bit=six_bit)
    assert gguf_mm_triton._scale_pairs_fit(packed, 128)
    x = torch.randn(6, 512).to(torch.float16).to(DEVICE)
    config = MmConfig(block_n=32, block_k=128, split_k=2)
    paired = gguf_mm(x, packed, config=config)
    monkeypatch.setattr(gguf_mm_triton, "SCALE_PAIRS", False)
    single = gguf_mm(x, packed, config=config)
    # the two compiled loops may order the MMA's k-steps differently (seen on an H200: one fp16
    # ulp in one of 240 outputs); a scale taken from the wrong half would change most of them
    torch.testing.assert_close(paired, single, rtol=2 ** -9, atol=1e-6)
    assert (paired == single).float().mean().item() > 0.97
    _assert_matches_reference(paired, x, packed)


def test_scales_that_cannot_be_paired_are_read_one_by_one():
    q4_k = _packed("Q4_K", 32, 256, seed=8)                        # one int32 word a group already
    odd_groups = _packed("Q4_0", 32, 96, seed=8)                   # 3 groups a row
    assert not gguf_mm_triton._scale_pairs_fit(q4_k, 128)
    assert not gguf_mm_triton._scale_pairs_fit(odd_groups, 32)
    x = torch.randn(5, 96).to(torch.float16).to(DEVICE)
    _assert_matches_reference(gguf_mm(x, odd_groups, config=MmConfig(block_n=16, block_k=32, split_k=1)),
                              x, odd_groups)


def test_batches_above_wide_rows_split_k_to_fewer_programs_an_sm():
    """Split K until PROGRAMS_PER_SM programs an SM up to WIDE_ROWS rows of x, PROGRAMS_PER_SM_WIDE
    above (the CPU counts 8 SMs): 4 programs of 64 rows need 16 splits for 64 programs, 8 for 32."""
    packed = _packed("Q4_0", 256, 4096, seed=9)
    cpu = torch.device("cpu")
    narrow = gguf_mm_triton._plan(gguf_mm_triton.WIDE_ROWS, packed, gguf_mm_triton.DEFAULT, cpu)
    wide = gguf_mm_triton._plan(gguf_mm_triton.WIDE_ROWS + 1, packed, gguf_mm_triton.DEFAULT, cpu)
    assert (narrow.split_k, wide.split_k) == (16, 8)
    assert (narrow.k_per_split, wide.k_per_split) == (256, 512)
