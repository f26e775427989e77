"""Attention over the paged KV cache for a flat batch of mixed prefill chunks and decodes.

The reference gathers every sequence's context into a padded [B, max_seq_len] view and runs one
masked SDPA call. New token i of sequence b (query row i, 0-based) sits at position
ctx_len[b] + i, where ctx_len = seq_len - query_len, and may attend keys 0..ctx_len[b] + i.
The gather indices and the mask depend only on the step, not the layer, so they are built once
per step (`RefAttentionPlan`) and shared by every layer.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RefAttentionPlan:
    slots: torch.Tensor             # [B, max_seq_len] int64, cache slot of each key position
    mask: torch.Tensor              # [B, 1, max_query_len, max_seq_len] bool, which keys a row sees
    seq_of_token: torch.Tensor      # [T] sequence of each new token
    row_of_token: torch.Tensor      # [T] its query row in the padded layout
    num_seqs: int


def build_ref_plan(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, max_seq_len: int, block_size: int,
) -> RefAttentionPlan:
    device = seq_lens.device
    num_seqs = seq_lens.numel()
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    ctx_lens = seq_lens.long() - query_lens
    key_pos = torch.arange(max_seq_len, device=device)
    # slots: [B, max_seq_len]; positions past seq_len point at whatever block 0 holds and are masked
    slots = block_tables.long().index_select(1, key_pos // block_size) * block_size + key_pos % block_size
    query_row = torch.arange(max_query_len, device=device)
    # mask: [B, 1, max_query_len, max_seq_len]
    limit = ctx_lens[:, None] + query_row[None, :]  # last key each query row may see
    mask = key_pos[None, None, :] <= limit[:, :, None]
    mask &= (query_row[None, :] < query_lens[:, None])[:, :, None]
    # token t of the flat batch → (sequence, row) in the padded layout
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens)
    row_of_token = torch.arange(int(query_lens.sum()), device=device) - query_start_loc.long()[seq_of_token]
    return RefAttentionPlan(slots, mask[:, None], seq_of_token, row_of_token, num_seqs)


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: RefAttentionPlan,
    max_query_len: int, scale: float,
) -> torch.Tensor:
    # q: [T, H, D]; caches: [num_blocks, block_size, Hkv, D] (q's dtype or FP8) → out: [T, H, D]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    slots = plan.slots
    # [B, L, Hkv, D], in q's dtype (an FP8 cache widens exactly)
    keys = k_cache.view(-1, num_kv_heads, head_dim)[slots].to(q.dtype)
    values = v_cache.view(-1, num_kv_heads, head_dim)[slots].to(q.dtype)
    padded_q = q.new_zeros(plan.num_seqs, max_query_len, num_heads, head_dim)
    padded_q[plan.seq_of_token, plan.row_of_token] = q
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=plan.mask, scale=scale, enable_gqa=num_heads != num_kv_heads,
    )                                                              # [B, H, Qmax, D]
    return out.transpose(1, 2)[plan.seq_of_token, plan.row_of_token]
