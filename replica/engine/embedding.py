"""Embeddings: each input's final hidden state (after the last norm), pooled, L2-normalised.

Invariants:
- The engine's KV pool is never touched: a batch runs the model's ordinary forward over scratch
  K/V tensors of its own, sized for that batch. One scratch pair serves every layer, because a
  layer writes its K/V and attends over them before the next layer runs; so the extra memory
  is one layer's K/V for the batch's tokens, freed when the batch ends.
- Inputs are packed into batches of at most `max_num_batched_tokens` tokens (an input longer than
  that runs alone), in input order; the result is in input order.
- Runs on the engine thread between steps (`LLMEngine.embed`, `AsyncEngine.embed`), so it never
  shares the device with a step.

Scratch layout: input i owns the contiguous blocks [first_block_i, first_block_i + ceil(L_i/B)),
and its token t sits in slot first_block_i * B + t.
"""
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from replica.layers.attention import AttentionMetadata

POOLINGS = ("mean", "last")


def pack(lengths: list[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Indices of inputs, grouped into batches of at most `max_batch_tokens` tokens."""
    batch: list[int] = []
    num_tokens = 0
    for i, length in enumerate(lengths):
        if batch and num_tokens + length > max_batch_tokens:
            yield batch
            batch, num_tokens = [], 0
        batch.append(i)
        num_tokens += length
    if batch:
        yield batch


@torch.inference_mode()
def embed_batch(model, token_lists: list[list[int]], pooling: str, block_size: int) -> torch.Tensor:
    """One forward over the inputs; returns float32 unit vectors [len(token_lists), hidden]."""
    cfg, device = model.cfg, model.device
    lengths = [len(ids) for ids in token_lists]
    blocks_per_input = [-(-n // block_size) for n in lengths]
    first_blocks = [sum(blocks_per_input[:i]) for i in range(len(lengths))]
    width = max(blocks_per_input)
    slots, positions, tables = [], [], []
    for n, first, num_blocks in zip(lengths, first_blocks, blocks_per_input):
        slots.extend(range(first * block_size, first * block_size + n))
        positions.extend(range(n))
        tables.append(list(range(first, first + num_blocks)) + [0] * (width - num_blocks))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    shape = (sum(blocks_per_input), block_size, cfg.num_kv_heads, cfg.head_dim)
    k_scratch = torch.zeros(shape, dtype=model.dtype, device=device)
    v_scratch = torch.zeros(shape, dtype=model.dtype, device=device)

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=tensor(slots, torch.int64), query_start_loc=tensor(starts, torch.int32),
        seq_lens=tensor(lengths, torch.int32), block_tables=tensor(tables, torch.int32),
        max_query_len=max(lengths), max_seq_len=max(lengths),
        is_decode_only=all(n == 1 for n in lengths), block_size=block_size)
    input_ids = tensor([t for ids in token_lists for t in ids], torch.int64)
    hidden = model.forward(input_ids, tensor(positions, torch.int64), meta,
                           [(k_scratch, v_scratch)] * cfg.num_layers)   # [T, hidden]
    if pooling == "last":
        pooled = hidden.index_select(0, tensor(starts[1:], torch.int64) - 1).float()
    else:
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                        tensor(lengths, torch.int64))
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=device)
        sums.index_add_(0, owner, hidden.float())
        pooled = sums / tensor(lengths, torch.float32).unsqueeze(1)
    return F.normalize(pooled, dim=-1)


def embed(model, token_lists: list[list[int]], pooling: str, max_batch_tokens: int,
          block_size: int) -> list[list[float]]:
    """Unit vectors, one per input, in input order."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    vectors: list[list[float] | None] = [None] * len(token_lists)
    for batch in pack([len(ids) for ids in token_lists], max_batch_tokens):
        out = embed_batch(model, [token_lists[i] for i in batch], pooling, block_size).cpu()
        for i, row in zip(batch, out.tolist()):
            vectors[i] = row
    return vectors
