"""The greedy token's kernel (`argmax_triton.argmax`) against torch.argmax: the same index,
ties to the first, across its pieces' boundaries."""
import pytest
import torch

from replica.kernels.argmax_triton import _BLOCK, argmax
from tests.kernels.paged_batch import DEVICE, ON_GPU

NUM_COLS = [128256, 49152, 4097, 7] if ON_GPU else [2 * _BLOCK + 5, _BLOCK, 300, 1]


@pytest.mark.parametrize("num_cols", NUM_COLS)
@pytest.mark.parametrize("num_rows", [1, 3])
def test_argmax_matches_torch(num_rows, num_cols):
    x = torch.randn(num_rows, num_cols, generator=torch.Generator().manual_seed(num_cols)).to(DEVICE)
    assert torch.equal(argmax(x), x.argmax(dim=-1))


def test_ties_go_to_the_first_index_even_across_pieces():
    num_cols = 3 * _BLOCK
    x = torch.zeros(4, num_cols)
    x[0, [5, _BLOCK + 1, 2 * _BLOCK]] = 2.0       # the same largest value in three pieces
    x[1, [_BLOCK + 7, _BLOCK + 3]] = 2.0          # twice in the second piece
    x[2] = float("-inf")                          # a fully masked row (a grammar that allows nothing)
    x[3, [9, 2 * _BLOCK + 1]] = float("inf")
    got = argmax(x.to(DEVICE)).cpu()
    assert got.tolist() == [5, _BLOCK + 3, 0, 9] == x.argmax(dim=-1).tolist()


def test_nan_counts_as_the_largest_as_in_torch():
    x = torch.randn(2, _BLOCK + 10)
    x[0, _BLOCK + 2] = float("nan")
    x[1, 3] = float("nan")
    assert argmax(x.to(DEVICE)).cpu().tolist() == [_BLOCK + 2, 3] == x.argmax(dim=-1).tolist()


@pytest.mark.skipif(not ON_GPU, reason="bf16 logits: compiled kernels only (the interpreter computes in float32)")
def test_bf16_rows_and_a_strided_view():
    x = torch.randn(5, 128256 + 64, device=DEVICE, dtype=torch.bfloat16)[:, :128256]
    assert torch.equal(argmax(x), x.argmax(dim=-1))


def test_rejects_an_empty_row_and_takes_no_rows():
    with pytest.raises(ValueError, match="empty row"):
        argmax(torch.empty(2, 0, device=DEVICE))
    assert argmax(torch.empty(0, 10, device=DEVICE)).shape == (0,)
