"""Triton: causal attention for a flat batch of prefill chunks (and decodes) over the paged KV
cache, variable lengths in one launch (reference: `paged_attention.paged_attention_ref`).

Grid (num_seqs, cdiv(max_query_len, BLOCK_Q), num_kv_heads). A program takes BLOCK_Q query
tokens of one sequence times all GROUP_SIZE query heads of one KV head, packed as the rows of
one BLOCK_M = BLOCK_Q * BLOCK_G tile (row r = token r // BLOCK_G, head r % BLOCK_G), so each
K/V tile is read once per group:

    rows   t0h0 t0h1 t0h2 t0h3 t1h0 ... (BLOCK_G = 4)
    keys   0 ........ ctx_len ........ ctx_len + last query row of the tile
           (cached prefix)   (this chunk's new keys, already written to the cache)

New token i of sequence b sits at position ctx_len + i, ctx_len = seq_len - query_len, and sees
keys 0..ctx_len + i. Every key, including the chunk's own, is read from the paged cache, so a
chunk of a long prompt, a prompt whose prefix came from the prefix cache, and a decode row
(query_len 1) all take the same path. Programs past a sequence's last query tile exit at once.
"""
import torch
import triton
import triton.language as tl

from replica.kernels import pdl
from replica.kernels.checks import (
    FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_kv_cache_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape, dot_precision, kv_as_f16,
)

LOG2_E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_AS_F16: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait_and_release(PDL)
    # BLOCK_M = BLOCK_Q * BLOCK_G rows: BLOCK_Q query tokens × the group's heads
    seq = tl.program_id(0).to(tl.int64)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    query_len = (tl.load(query_start_loc_ptr + seq + 1) - query_start).to(tl.int32)
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_row = q_tile * BLOCK_Q + rows // BLOCK_G          # query row within the sequence
    group = rows % BLOCK_G
    head = kv_head * GROUP_SIZE + group
    m_mask = (q_row < query_len) & (group < GROUP_SIZE)
    q_pos = ctx_len + q_row                              # last key position each row may see
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + (query_start + q_row)[:, None] * stride_qt + head[:, None] * stride_qh
                + dims[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if KV_AS_F16:                                        # checks.kv_as_f16: K, V widen to fp16
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    kv_end = tl.minimum(ctx_len + (q_tile + 1) * BLOCK_Q, seq_len)   # past the tile's last row
    for tile_start in range(0, kv_end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = pos < kv_end
        block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offsets = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + block_ids[:, None] * stride_kb + offsets[:, None] * stride_ks
                    + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_head + block_ids[:, None] * stride_vb + offsets[:, None] * stride_vs
                    + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # Key 0 is in the first tile and visible to every row, so m_i is finite from the first
        # tile on and a row fully masked in a later tile adds exp2(-inf) = 0.
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (query_start + q_row)[:, None] * stride_ot + head[:, None] * stride_oh
             + dims[None, :], out, mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, out: torch.Tensor | None = None,
    block_m: int = 64, block_n: int = 32, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of T new tokens from B sequences over their paged context (write the
    cache first: the new keys are read from it).

    q: [T, num_heads, head_dim] (last dim contiguous); k_cache, v_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; query_start_loc: [B+1] int32, cumulative
    new-token counts; seq_lens: [B] int32 (cached + new); block_tables: [B, max_blocks] int32;
    max_query_len: a host int ≥ every query length (it sizes the grid; a larger bound only adds
    programs that exit at once). Returns out [T, num_heads, head_dim] (or fills `out`).
    Tiles: block_m=64, block_n=32, 4 warps measured fastest of seven on an H100 (bench/NOTES.md).
    """
    check_shape("q", q, (None, None, None))
    num_tokens, num_heads, head_dim = q.shape
    check_shape("k_cache", k_cache, (None, None, None, head_dim))
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("query_start_loc", query_start_loc, (None,))
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc: expected B + 1 ≥ 1 entries, got none")
    check_shape("seq_lens", seq_lens, (num_seqs,))
    check_shape("block_tables", block_tables, (num_seqs, None))
    if num_heads % num_kv_heads:
        raise ValueError(f"q: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check_dtype("q", q, FLOAT_DTYPES)
    check_kv_cache_dtype(q, k_cache, v_cache)
    check_dtype("query_start_loc", query_start_loc, INDEX_DTYPES)
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    check_dtype("block_tables", block_tables, (torch.int32,))
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, query_start_loc=query_start_loc,
                      seq_lens=seq_lens, block_tables=block_tables)
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be ≥ 0, got {max_query_len}")
    if out is None:
        out = torch.empty_like(q)
    else:
        check_shape("out", out, tuple(q.shape))
        check_same_dtype(q=q, out=out)
        check_last_dim_contiguous("out", out)
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out

    group_size = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group_size)
    block_q = max(1, block_m // block_g)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP_SIZE=group_size, BLOCK_G=block_g,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_Q=block_q,
        BLOCK_M=block_q * block_g, BLOCK_N=block_n, DOT_PRECISION=dot_precision(q.dtype),
        KV_AS_F16=kv_as_f16(q, k_cache),
        **pdl.launch_options(q.device), num_warps=num_warps, num_stages=num_stages,
    )
    return out
