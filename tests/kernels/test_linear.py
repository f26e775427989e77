"""Skinny GEMM (x with 1..8 rows) against F.linear in float64, on both paths (M == 1 element-wise,
M > 1 tensor cores), with split-K, ragged N and K, and a bias."""
import pytest
import torch
import torch.nn.functional as F

from replica.kernels import linear_triton
from replica.kernels.linear_triton import LinearConfig, choose_config, skinny_linear
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

# (num_rows, n, k, has_bias, config); config None = choose_config
if ON_GPU:
    CASES = [
        (1, 6144, 4096, False, None),       # Llama-3-8B qkv
        (1, 4096, 4096, False, None),       # o_proj
        (1, 28672, 4096, False, None),      # gate_up
        (1, 4096, 14336, False, None),      # down
        (1, 3584, 1000, True, None),        # ragged K, bias (Qwen2's qkv has one)
        (2, 4096, 4096, True, None),
        (5, 28672, 4096, False, None),
        (8, 4096, 14336, False, None),
        (1, 1000, 4096, False, LinearConfig(block_n=8, block_k=512, split_k=4)),
        (3, 1000, 1000, False, LinearConfig(block_n=32, block_k=64, split_k=3, num_stages=3)),
    ]
else:
    CASES = [
        (1, 40, 96, False, LinearConfig(block_n=4, block_k=32)),
        (1, 37, 100, True, LinearConfig(block_n=8, block_k=32)),        # ragged N and K
        (1, 40, 200, True, LinearConfig(block_n=4, block_k=32, split_k=3)),
        (3, 48, 80, True, LinearConfig(block_n=16, block_k=32, split_k=2)),
        (8, 37, 64, False, LinearConfig(block_n=16, block_k=16)),
        (2, 64, 48, False, None),
    ]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("num_rows,n,k,has_bias,config", CASES)
def test_matches_float64_reference(num_rows, n, k, has_bias, config):
    gen = torch.Generator().manual_seed(num_rows * 1000 + n + k)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DTYPE).to(DEVICE) if has_bias else None
    out = skinny_linear(x, weight, bias, config=config)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.shape == (num_rows, n) and out.dtype == DTYPE
    assert not out.isnan().any()
    # float32 inputs: float32 rounding of the sums; 16-bit: the output's one rounding (~4e-3)
    assert _relative_error(out, ref) < (1e-5 if DTYPE == torch.float32 else 1e-2)



@pytest.mark.parametrize("num_rows,n,k,has_bias,config", [c for c in CASES if c[4] is not None])
def test_unrolled_tiles_give_the_loops_sums_bit_for_bit(num_rows, n, k, has_bias, config, monkeypatch):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(num_rows, k, generator=gen).to(DTYPE).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DTYPE).to(DEVICE) if has_bias else None
    looped = skinny_linear(x, weight, bias, config=config)
    monkeypatch.setattr(linear_triton, "UNROLL_TILES", 16)
    assert torch.equal(skinny_linear(x, weight, bias, config=config), looped)

def test_strided_rows_of_x():
    # x as a row-strided view (every other row of a bigger buffer), last dim contiguous
    gen = torch.Generator().manual_seed(3)
    buffer = torch.randn(6, 64, generator=gen).to(DTYPE).to(DEVICE)
    weight = torch.randn(32, 64, generator=gen).to(DTYPE).to(DEVICE)
    x = buffer[::2]
    out = skinny_linear(x, weight, config=LinearConfig(block_n=16, block_k=32))
    ref = F.linear(x.double(), weight.double())
    assert _relative_error(out, ref) < (1e-5 if DTYPE == torch.float32 else 1e-2)


def test_split_k_only_where_n_leaves_the_gpu_idle():
    device = torch.device("cuda") if ON_GPU else torch.device("cpu")
    wide = choose_config(1, 1 << 20, 4096, device)
    assert wide.split_k == 1
    narrow = choose_config(1, 64, 1 << 16, device)
    assert narrow.split_k > 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_replay_equals_eager():
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(4096, 4096, generator=gen) / 64).to(DTYPE).to(DEVICE)
    static_x = torch.randn(1, 4096, generator=gen).to(DTYPE).to(DEVICE)
    skinny_linear(static_x, weight)                       # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = skinny_linear(static_x, weight)
    for _ in range(3):
        static_x.copy_(torch.randn(1, 4096, generator=gen).to(DTYPE))
        graph.replay()
        assert torch.equal(static_out, skinny_linear(static_x, weight))


def test_rejects_bad_arguments():
    x = torch.randn(2, 64, device=DEVICE)
    weight = torch.randn(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x: expected 1..8 rows"):
        skinny_linear(torch.randn(9, 64, device=DEVICE), weight)
    with pytest.raises(ValueError, match="weight: expected shape"):
        skinny_linear(x, weight[:, :32])
    with pytest.raises(ValueError, match="weight: must be contiguous"):
        skinny_linear(x, weight.t().contiguous().t())
    with pytest.raises(ValueError, match="dtypes must match"):
        skinny_linear(x.half(), weight)
    with pytest.raises(ValueError, match="bias: expected shape"):
        skinny_linear(x, weight, torch.randn(31, device=DEVICE))
    with pytest.raises(ValueError, match="block_n ≥ 16"):
        skinny_linear(x, weight, config=LinearConfig(block_n=8, block_k=32))
