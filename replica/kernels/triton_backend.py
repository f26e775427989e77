"""The Triton attention backend: the GPU path behind `AttentionBackend`.

forward = one attention launch over the paged cache (the model already wrote the new keys and
values, fused with rotary): the split-KV decode kernel when every sequence has exactly one new
token, else the variable-length prefill kernel (which takes decode rows mixed into a prefill
batch too).

Per-step launch parameters are computed once, on the first layer, into `meta.decode_num_splits`;
nothing here reads device memory on the host. For CUDA-graph capture of the decode path, set
`meta.decode_num_splits = choose_num_splits(bucket_size, num_kv_heads, max_model_len, device)`
before capturing so the grid depends only on static sizes, never on this step's max_seq_len.
"""
import torch

from replica.kernels.paged_decode_triton import choose_num_splits, paged_decode_attention
from replica.kernels.paged_prefill_triton import paged_prefill_attention


class TritonAttentionBackend:
    name = "triton"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                scale: float) -> torch.Tensor:
        # q: [T, num_heads, head_dim] → out like q
        if meta.is_decode_only:
            if meta.decode_num_splits is None:
                meta.decode_num_splits = choose_num_splits(q.shape[0], k_cache.shape[2], meta.max_seq_len,
                                                           q.device)
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                num_splits=meta.decode_num_splits,
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, scale,
        )
