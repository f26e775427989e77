"""The Triton attention backend: the GPU path behind `AttentionBackend`.

forward = attention over the paged cache (the model already wrote the new keys and values, fused
with rotary): the split-KV decode kernel when every sequence has exactly one new token, else the
variable-length prefill kernel; in a mixed step the leading decode rows (`meta.num_decode_prefix`,
the running sequences the scheduler puts first) go through the decode kernel and only the rest
through the prefill kernel. The prefill kernel's 64-row tiles hold 16 query tokens x 4 heads, so
a decode row there fills 4 rows of 64 and gets no KV split (bench/NOTES.md, "Where the rest of
W1's and W3's targets goes").

With `rotary` (the model's `FUSE_DECODE_ROTARY`) q and the new keys and values come before rotary:
at decode the split kernel rotates them and writes the cache itself (one launch a layer fewer);
the model passes it for decode-only steps only.

With `round_x8` (a 4-bit o_proj on int8 x next, at decode) the decode kernel's reduce also
writes the output rounded for it, and forward returns that `XInt8` (one launch a layer fewer);
where the step has no reduce (one split) it returns the tensor as usual.

Per-step launch parameters are computed once, on the first layer, into `meta.decode_num_splits`;
nothing here reads device memory on the host. For CUDA-graph capture of the decode path, set
`meta.decode_num_splits = choose_num_splits(bucket_size, num_kv_heads, max_model_len, device)`
before capturing so the grid depends only on static sizes, never on this step's max_seq_len.
"""
import torch

from replica.kernels.gguf_linear import XInt8
from replica.kernels.paged_decode_triton import (
    DecodeRotary, can_round_x8, choose_num_splits, paged_decode_attention,
)
from replica.kernels.paged_prefill_triton import paged_prefill_attention

SPLIT_MIXED_DECODES = True   # a mixed step's leading decode rows through the decode kernel


class TritonAttentionBackend:
    name = "triton"
    takes_decode_rotary = True     # forward(rotary=...): q and the new K/V before rotary

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                scale: float, out: torch.Tensor | None = None, round_x8: bool = False,
                rotary: DecodeRotary | None = None) -> torch.Tensor | XInt8:
        # q: [T, num_heads, head_dim] → out like q (allocated unless given), or its XInt8 [T, heads · head_dim]
        if rotary is not None and not meta.is_decode_only:
            raise ValueError("rotary: only a decode-only step's attention applies rotary (the decode kernel)")
        if meta.is_decode_only:
            if meta.decode_num_splits is None:
                meta.decode_num_splits = choose_num_splits(q.shape[0], k_cache.shape[2], meta.max_seq_len,
                                                           q.device)
            num_tokens, num_heads, head_dim = q.shape
            x8 = None
            if round_x8 and can_round_x8(meta.decode_num_splits, head_dim):
                x8 = XInt8.empty(num_tokens, num_heads * head_dim, q.dtype, q.device)
            out = paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                num_splits=meta.decode_num_splits, out=out, out_x8=x8, rotary=rotary,
            )
            return out if x8 is None else x8
        num_decodes = meta.num_decode_prefix if SPLIT_MIXED_DECODES else 0
        if num_decodes == 0:
            return paged_prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, scale, out=out,
            )
        # the decode rows are the first num_decodes tokens (one each); the prefill kernel takes the
        # rest with its query offsets rebased (computed once a step, on the first layer)
        if meta.prefill_query_start_loc is None:
            meta.prefill_query_start_loc = meta.query_start_loc[num_decodes:] - num_decodes
            meta.decode_num_splits = choose_num_splits(num_decodes, k_cache.shape[2], meta.max_seq_len,
                                                       q.device)
        out = torch.empty_like(q) if out is None else out
        paged_decode_attention(
            q[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes], meta.seq_lens[:num_decodes],
            scale, num_splits=meta.decode_num_splits, out=out[:num_decodes],
        )
        paged_prefill_attention(
            q[num_decodes:], k_cache, v_cache, meta.prefill_query_start_loc, meta.seq_lens[num_decodes:],
            meta.block_tables[num_decodes:], meta.max_query_len, scale, out=out[num_decodes:],
        )
        return out
