"""Attention backends behind one interface.

The model runner builds one `AttentionMetadata` per step; every layer's attention calls
`backend.forward`, which attends each new token causally over its sequence's whole context. The
new keys and values are already in that layer's paged cache: the model writes them in the same
kernel that applies rotary (`ops.apply_rotary_and_write_kv`). Per-step precomputation that
depends only on the step, not the layer, lives in typed fields of the metadata, filled by the
first layer and reused by the others.
"""
from dataclasses import dataclass
from typing import Protocol

import torch

from replica.kernels.paged_attention import RefAttentionPlan, build_ref_plan, paged_attention_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64, cache slot of each new token
    query_start_loc: torch.Tensor   # [B+1] int32, cumulative new-token counts
    seq_lens: torch.Tensor          # [B] int32, context length after this step
    block_tables: torch.Tensor      # [B, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool
    block_size: int
    # Triton decode: how many KV splits each sequence's attention uses. CUDA graphs fix it per
    # batch-size bucket from static sizes; otherwise the first layer picks it from this step.
    decode_num_splits: int | None = None
    # the first sequences of the batch that have one new token each (a mixed step's decodes),
    # and the Triton backend's query offsets of the others (first layer, reused by the rest)
    num_decode_prefix: int = 0
    prefill_query_start_loc: torch.Tensor | None = None
    ref_plan: RefAttentionPlan | None = None    # the torch reference's gather indices and mask


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
                round_x8: bool = False):
        """q: [T, num_heads, head_dim] → attention output like q (written into `out` if given).
        round_x8: the caller's next projection is a 4-bit GEMV on int8 x; a backend may then
        return the output already rounded for it (`XInt8` [T, heads · head_dim])."""


class TorchAttentionBackend:
    """Pure-torch reference; the CPU path and the reference of every attention kernel."""

    name = "torch"

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None, round_x8=False):
        # q: [T, num_heads, head_dim] → like q
        if meta.ref_plan is None:
            meta.ref_plan = build_ref_plan(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                           meta.max_query_len, meta.max_seq_len, meta.block_size)
        result = paged_attention_ref(q, k_cache, v_cache, meta.ref_plan, meta.max_query_len, scale)
        return result if out is None else out.copy_(result)


def get_attention_backend(name: str) -> AttentionBackend:
    """`torch` (reference, any device) or `triton` (CUDA)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from replica.kernels.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose 'torch' or 'triton'")
