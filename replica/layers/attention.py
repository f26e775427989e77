"""Attention backends behind one interface.

The model runner builds one `AttentionMetadata` per step; every layer's attention calls
`backend.forward`, which writes the new keys/values into that layer's paged cache (unless the
caller already did, `is_kv_written=True`, e.g. fused with rotary) and then attends each new
token causally over its sequence's whole context. Backend-specific
precomputation that depends only on the step (not the layer) goes into `meta.extras` on the
first layer and is reused by the others.
"""
from dataclasses import dataclass, field
from typing import Protocol

import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.paged_attention import build_ref_extras, paged_attention_ref


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
    extras: dict = field(default_factory=dict)


class AttentionBackend(Protocol):
    name: str

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
        k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        is_kv_written: bool = False,
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Pure-torch reference; the CPU path and the reference of every attention kernel."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                is_kv_written: bool = False):
        if not is_kv_written:
            write_kv_cache_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        if "ref" not in meta.extras:
            meta.extras["ref"] = build_ref_extras(
                meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, meta.max_seq_len, meta.block_size,
            )
        return paged_attention_ref(q, k_cache, v_cache, meta.extras["ref"], meta.max_query_len, scale)


def get_attention_backend(name: str) -> AttentionBackend:
    """`torch` (reference, any device) or `triton` (CUDA)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from replica.kernels.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose 'torch' or 'triton'")
