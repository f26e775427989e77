"""Builds random paged-attention batches for the kernel tests, and the shape sets they use.

On a CUDA machine the tests run at real shapes in bf16; on the CPU (Triton interpreter) at small
shapes in float32 so the suite stays fast.
"""
from dataclasses import dataclass

import torch

from replica.kernels.paged_attention import build_ref_plan, paged_attention_ref

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def tolerances(dtype: torch.dtype) -> dict:
    # bf16 operands (and P rounded to bf16 before P·V): ~1e-2; float32 (interpreter or ieee dots)
    return {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {"atol": 1e-4, "rtol": 1e-4}


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Element-wise closeness plus ‖out − ref‖ / ‖ref‖ (no NaN, every element written)."""
    assert not out.isnan().any(), "output has NaN (unwritten or poisoned elements)"
    torch.testing.assert_close(out.float(), ref.float(), **tolerances(dtype))
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < (1e-2 if dtype != torch.float32 else 1e-5), f"relative error {rel:.2e}"


@dataclass
class PagedBatch:
    q: torch.Tensor                # [T, H, D]
    k: torch.Tensor                # [T, Hkv, D] the new tokens' keys
    v: torch.Tensor
    k_cache: torch.Tensor          # [num_blocks, block_size, Hkv, D], random everywhere
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor     # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor         # [B] int32
    block_tables: torch.Tensor     # [B, max_blocks] int32, shuffled ids, padded with 0
    max_query_len: int
    max_seq_len: int
    block_size: int


def make_batch(seq_lens: list[int], query_lens: list[int], *, num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype=DTYPE, device=DEVICE, seed: int = 0,
               spare_blocks: int = 3) -> PagedBatch:
    """Blocks are handed out in a shuffled order so no sequence's blocks are contiguous; the
    cache holds random values everywhere (stale data in unused slots, never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq + [1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used:used + n]
        used += n
    slots = []
    for b, (s, n) in enumerate(zip(seq_lens, query_lens)):
        pos = torch.arange(s - n, s)
        slots.append(block_tables[b, pos // block_size].long() * block_size + pos % block_size)
    num_tokens = sum(query_lens)
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    return PagedBatch(
        q=rand(num_tokens, num_heads, head_dim), k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        k_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=rand(num_blocks, block_size, num_kv_heads, head_dim),
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_size=block_size,
    )


def reference_attention(batch: PagedBatch, q: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference in float32 over the batch's (already written) cache."""
    q = batch.q if q is None else q
    plan = build_ref_plan(batch.query_start_loc, batch.seq_lens, batch.block_tables,
                              batch.max_query_len, batch.max_seq_len, batch.block_size)
    return paged_attention_ref(q.float(), batch.k_cache.float(), batch.v_cache.float(), plan,
                               batch.max_query_len, head_scale(q.shape[-1]))


def head_scale(head_dim: int) -> float:
    return head_dim ** -0.5
