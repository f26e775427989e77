"""FP8 W8A8: the per-token activation quantiser (Triton) against its torch reference, the FP8
product's reference against the float product, on Ada/Hopper `fp8_linear` (torch._scaled_mm, or
the weight-only GEMV at 1-2 rows) against the reference at the Llama-3-8B shapes, and the GEMV
alone (also under Triton's interpreter)."""
import pytest
import torch
import torch.nn.functional as F

from replica.kernels.fp8_linear import FP8_DTYPE, fp8_linear_ref, quantize_rows_ref
from replica.kernels.fp8_quant_triton import quantize_per_token
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

HAS_FP8_GPU = ON_GPU and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("num_rows,k,block_k", [(1, 64, 32), (3, 100, 64), (5, 256, 1024), (2, 48, 16)])
def test_per_token_quantiser_matches_reference(num_rows, k, block_k, one_pass, monkeypatch):
    """The row from registers in one pass, and (a row longer than ONE_PASS_COLS) tile by tile in two."""
    from replica.kernels import fp8_quant_triton
    monkeypatch.setattr(fp8_quant_triton, "ONE_PASS_COLS", 1 << 14 if one_pass else 8)
    gen = torch.Generator().manual_seed(num_rows * 100 + k)
    x = (torch.randn(num_rows, k, generator=gen) * torch.logspace(-3, 2, num_rows)[:, None]).to(DTYPE)
    x[0, :] = 0.0 if num_rows > 2 else x[0, :]          # an all-zero row keeps a finite scale
    x = x.to(DEVICE)
    q, scale = quantize_per_token(x, block_k=block_k)
    ref_q, ref_scale = quantize_rows_ref(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (num_rows, 1)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    # rounded in fp32 to nearest even (Triton's interpreter casts to e4m3 differently): the
    # reference's codes on the GPU and on the CPU alike
    assert torch.equal(q.float(), ref_q.float())


def test_reference_product_is_close_to_the_float_product():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 256, generator=gen), torch.randn(48, 256, generator=gen) * 0.02
    w_q, w_scale = quantize_rows_ref(w)
    out = fp8_linear_ref(x, w_q, w_scale[:, 0])
    ref = F.linear(x, w)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05       # two e4m3 roundings: ~2-3 %


def test_rows_scale_so_the_largest_value_is_fp8s_largest():
    w = torch.tensor([[1.0, -896.0, 3.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_rows_ref(w)
    assert scale[0, 0].item() == 2.0 and q[0, 1].float().item() == -448.0
    assert torch.isfinite(scale).all() and torch.equal(q[1].float(), torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs an Ada or Hopper GPU")
@pytest.mark.parametrize("num_rows,n,k", [(1, 6144, 4096), (2, 4096, 14336), (8, 4096, 14336),
                                          (256, 28672, 4096), (256, 4096, 14336), (2048, 4096, 4096),
                                          (3, 1024, 512)])
def test_scaled_mm_matches_reference(num_rows, n, k):
    """W8A8 through _scaled_mm (fast accumulation, as vLLM's FP8 kernels: within 1% of the exact
    reference even at K = 14,336); up to GEMV_ROWS rows the weight-only GEMV, whose reference
    keeps x unquantised."""
    from replica.kernels.fp8_gemv_triton import DOT_ROWS, GEMV_ROWS
    from replica.kernels.fp8_quant_triton import fp8_linear
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(num_rows, k, generator=gen).to(torch.bfloat16).cuda()
    w_q, w_scale = quantize_rows_ref((torch.randn(n, k, generator=gen) * 0.02).cuda())
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).cuda()
    out = fp8_linear(x, w_q, w_scale[:, 0], bias)
    if num_rows <= max(GEMV_ROWS, DOT_ROWS):             # weight-only paths
        ref = F.linear(x.float(), w_q.float() * w_scale, bias.float())
    else:
        ref = fp8_linear_ref(x.float(), w_q, w_scale[:, 0], bias.float())
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs an Ada or Hopper GPU")
def test_fp8_linear_in_a_cuda_graph_equals_eager():
    from replica.kernels.fp8_quant_triton import fp8_linear
    gen = torch.Generator().manual_seed(1)
    w_q, w_scale = quantize_rows_ref((torch.randn(4096, 4096, generator=gen) * 0.02).cuda())
    static_x = torch.randn(4, 4096, generator=gen).to(torch.bfloat16).cuda()
    fp8_linear(static_x, w_q, w_scale[:, 0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fp8_linear(static_x, w_q, w_scale[:, 0])
    static_x.copy_(torch.randn(4, 4096, generator=gen).to(torch.bfloat16))
    graph.replay()
    assert torch.equal(static_out, fp8_linear(static_x, w_q, w_scale[:, 0]))


def test_fp8_linear_rejects_shapes_cublas_cannot_take():
    from replica.kernels.fp8_quant_triton import fp8_linear
    w_q = torch.zeros(24, 40, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(torch.zeros(2, 40), w_q, torch.ones(24))
    with pytest.raises(ValueError, match="w_scale: expected shape"):
        fp8_linear(torch.zeros(2, 40), w_q, torch.ones(23))


@pytest.mark.parametrize("num_rows,n,k,has_bias,config", [
    (1, 40, 512, False, (8, 128, 1)), (3, 37, 256, True, (8, 64, 2)),   # ragged N, split-K, bias
    (8, 24, 96, False, (8, 64, 1)),                                      # ragged K tile
    (2, 16, 320, False, (8, 64, 2)),                  # 5 tiles in 2 splits: the last split ends past K
    (5, 48, 4096, True, None)])
def test_weight_only_fp8_gemv_matches_dequantised_product(num_rows, n, k, has_bias, config):
    """Decode rows skip the activation quantiser: out = x @ (w_q · w_scale)ᵀ exactly (fp32)."""
    from replica.kernels.fp8_gemv_triton import Fp8GemvConfig, fp8_gemv
    gen = torch.Generator().manual_seed(n + k)
    w_q, w_scale = quantize_rows_ref(torch.randn(n, k, generator=gen) * 0.02)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE)
    bias = torch.randn(n, generator=gen).to(DTYPE) if has_bias else None
    ref = F.linear(x.double(), w_q.double() * w_scale.double(), None if bias is None else bias.double())
    out = fp8_gemv(x.to(DEVICE), w_q.to(DEVICE), w_scale[:, 0].contiguous().to(DEVICE),
                   None if bias is None else bias.to(DEVICE),
                   config=Fp8GemvConfig(*config) if config else None)
    assert out.shape == (num_rows, n) and out.dtype == DTYPE
    rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if DTYPE == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("num_rows,n,k,split_k", [(3, 64, 256, 1), (8, 72, 384, 2), (16, 64, 200, 1)])
def test_weight_only_fp8_dot_matches_dequantised_product(num_rows, n, k, split_k):
    """The tensor-core variant for 3..16 rows (ragged N, split-K, a partial K tile)."""
    from replica.kernels.fp8_gemv_triton import fp8_dot
    gen = torch.Generator().manual_seed(n + k)
    w_q, w_scale = quantize_rows_ref(torch.randn(n, k, generator=gen) * 0.02)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE)
    bias = torch.randn(n, generator=gen).to(DTYPE)
    ref = F.linear(x.double(), w_q.double() * w_scale.double(), bias.double())
    out = fp8_dot(x.to(DEVICE), w_q.to(DEVICE), w_scale[:, 0].contiguous().to(DEVICE), bias.to(DEVICE),
                  split_k=split_k)
    rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if DTYPE == torch.float32 else 1e-2), rel
