"""Triton: paged decode attention with split-KV (flash-decoding), GQA-aware (reference:
`paged_attention.paged_attention_ref` with one query token per sequence).

Grid (num_seqs, num_kv_heads, num_splits). One program takes every query head of one KV head
group (the group's rows padded to BLOCK_G ≥ 16 for the tensor cores), so each K/V tile is read
from memory once per group, not once per query head. Each sequence's context is cut into
`num_splits` equal runs of whole BLOCK_N tiles, computed in the kernel from that sequence's own
length; a split writes its partial result (output normalised by its own softmax sum, and the
log2-sum-exp of its scores) and a second kernel combines the splits:

    context  0 ........................................... seq_len
    splits   |  split 0  |  split 1  |  split 2  | (empty) |
    each     o_s = softmax_s(q·K_s) V_s,  lse_s = log2 Σ exp2(scores_s)
    reduce   out = Σ_s o_s · 2^(lse_s - max lse) / Σ_s 2^(lse_s - max lse)

The grid depends only on (num_seqs, num_kv_heads, num_splits), never on seq_lens, so the launch
is valid for CUDA-graph capture: replays may change seq_lens and block_tables freely (a
split past the end of a short sequence is empty and costs one early exit). Choose num_splits
from a static upper bound on the context length (`choose_num_splits(.., max_model_len, ..)`)
when capturing. A sequence with seq_len 0 (padding rows of a graph bucket) gets zeros.

With `out_x8` the reduce also writes its head's output rounded to int8 per 32 elements, as
`gguf_gemv_x8_triton.quantize_x` would round the stored row: the input of a 4-bit o_proj on int8
x, one launch a layer fewer at decode (the same codes bit for bit).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from replica.kernels import gguf_gemv_x8_triton, pdl
from replica.kernels.fp8_linear import FP8_DTYPE
from replica.kernels.gguf_linear import XInt8
from replica.kernels.kv_cache_write_triton import to_cache_dtype
from replica.kernels.checks import (
    FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_kv_cache_dtype, check_last_dim_contiguous, check_same_device,
    check_same_dtype, check_shape, dot_precision, kv_as_f16,
)

LOG2_E = 1.4426950408889634
MAX_SPLITS = 64
# Splits past a sequence's context exit without storing, and the reduce reads only the others
# (at batch 1, W2's ~600 tokens fill 10 of the graphs' 32 splits): W2 on an H200 +0.5% (Q4_0),
# +0.3% (bf16), bench/NOTES.md "Moving short kernels' work into their neighbours lost".
SKIP_EMPTY_SPLITS = True
_DEFAULT_BLOCK_N = 64
_MIN_TOKENS_PER_SPLIT = _DEFAULT_BLOCK_N   # at least one whole tile per split


@triton.jit
def _rotate(x, x_partner, cos, sin, first_half):
    return tl.where(first_half, x * cos - x_partner * sin, x * cos + x_partner * sin)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_AS_F16: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr,             # PDL: read the host-written operands before the wait (`pdl` module)
    LINE: tl.constexpr,              # cache elements in a 128-byte line (the first tile's prefetch)
    prefetch_programs,               # EARLY: programs below this (launch order) prefetch their first tile
    ROTARY: tl.constexpr,            # q, k_new, v_new before rotary: rotate them, write the new K/V (`DecodeRotary`)
    k_new_ptr, v_new_ptr, positions_ptr, cos_sin_ptr, slot_mapping_ptr,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs,
    SKIP_EMPTY: tl.constexpr,        # a split past the context stores nothing (the reduce reads only the others)
):
    if not EARLY:
        pdl.wait_and_release(PDL)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # the length and the block table are copied in before the step: no kernel of it writes them
    seq_len = tl.load(seq_lens_ptr + seq)
    if ROTARY:       # host-written too, and the rotary table is fixed
        position = tl.load(positions_ptr + seq).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
        rot_dims = tl.arange(0, BLOCK_D)
        # rotate_half: out[d] = x[d] cos[d mod half] ∓ x[d ± half] sin[d mod half], − in the first half
        # (`_rotate`, written as the rotary kernel's x1 cos − x2 sin and x2 cos + x1 sin: the same bits)
        partner = (rot_dims + HEAD_DIM // 2) % HEAD_DIM
        first_half = rot_dims < HEAD_DIM // 2
        cos = tl.load(cos_sin_ptr + position * stride_cs + rot_dims % (HEAD_DIM // 2), mask=rot_dims < HEAD_DIM)
        sin = tl.load(cos_sin_ptr + position * stride_cs + HEAD_DIM // 2 + rot_dims % (HEAD_DIM // 2),
                      mask=rot_dims < HEAD_DIM)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    block_table = block_tables_ptr + seq * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    if EARLY:
        pid = tl.program_id(0) + (tl.program_id(1) + split * tl.num_programs(1)) * tl.num_programs(0)
        if pid < prefetch_programs:
            # the first wave asks L2 for its first tile's K and V while the kernel before it (rotary,
            # which writes q and the newest key and value) still runs; the newest row is left out
            last = tl.minimum(end, seq_len - 1) - 1
            pos = tl.maximum(tl.minimum(start + offs_n, last), 0)
            block_ids = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
            lines = (tl.arange(0, BLOCK_D // LINE) * LINE)[None, :]
            if start <= last:
                pdl.prefetch_l2(k_head + (block_ids * stride_kb + pos % BLOCK_SIZE * stride_ks)[:, None] + lines)
                pdl.prefetch_l2(v_head + (block_ids * stride_vb + pos % BLOCK_SIZE * stride_vs)[:, None] + lines)
        pdl.wait_and_release(PDL)
    if SKIP_EMPTY:
        if start >= end:
            return

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP_SIZE + groups
    g_mask = groups < GROUP_SIZE
    d_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)   # [BLOCK_G, BLOCK_D]
    if ROTARY:
        q_partner = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + partner[None, :],
                            mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        q = _rotate(q.to(tl.float32), q_partner, cos[None, :], sin[None, :], first_half[None, :]).to(q.dtype)
        newest = seq_len - 1
        if (newest >= start) & (newest < end) & (slot >= 0):      # the one split that holds the new token
            k_row = k_new_ptr + seq * stride_knt + kv_head * stride_knh
            k_new = _rotate(tl.load(k_row + dims, mask=d_mask, other=0.0).to(tl.float32),
                            tl.load(k_row + partner, mask=d_mask, other=0.0).to(tl.float32), cos, sin, first_half)
            v_new = tl.load(v_new_ptr + seq * stride_vnt + kv_head * stride_vnh + dims, mask=d_mask)
            block_id, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            tl.store(k_head + block_id * stride_kb + offset * stride_ks + dims,
                     to_cache_dtype(k_new, k_cache_ptr), mask=d_mask)
            tl.store(v_head + block_id * stride_vb + offset * stride_vs + dims, to_cache_dtype(v_new, v_cache_ptr),
                     mask=d_mask)
        tl.debug_barrier()                                   # the program's loads below see the new row
    if KV_AS_F16:                                        # checks.kv_as_f16: K, V widen to fp16
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)    # running max of scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)                  # running sum of 2^(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        n_mask = pos < end
        # token pos lives in block block_table[pos // BLOCK_SIZE], slot pos % BLOCK_SIZE
        block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offsets = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + block_ids[:, None] * stride_kb + offsets[:, None] * stride_ks
                    + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)      # [BLOCK_N, BLOCK_D]
        v = tl.load(v_head + block_ids[:, None] * stride_vb + offsets[:, None] * stride_vs
                    + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))          # finite: the tile has ≥ 1 key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)                    # empty split or seq_len 0 → zeros
    out = acc / l_safe[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if IS_SINGLE_SPLIT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :], out,
                 mask=out_mask)
    else:
        # partials: part_out [num_seqs, num_heads, num_splits, HEAD_DIM], part_lse [.., num_splits]
        row = (seq * (tl.num_programs(1) * GROUP_SIZE) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, num_splits, stride_ot, stride_oh, seq_lens_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, X8: tl.constexpr, PDL: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, BLOCK_N: tl.constexpr,     # only the splits the context reaches (as the split kernel)
):
    pdl.wait_and_release(PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    if SKIP_EMPTY:
        num_tiles = tl.cdiv(tl.load(seq_lens_ptr + seq), BLOCK_N)
        tiles_per_split = tl.cdiv(num_tiles, num_splits)
        s_mask = splits < tl.where(tiles_per_split > 0, tl.cdiv(num_tiles, tl.maximum(tiles_per_split, 1)), 0)
    else:
        s_mask = splits < num_splits
    row = (seq * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + row + splits, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)   # every split empty (seq_len 0)
    weights = tl.exp2(lse - lse_max)
    denom = tl.sum(weights, 0)
    denom = tl.where(denom > 0, denom, 1.0)
    parts = tl.load(part_out_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=s_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    out = (tl.sum(parts * weights[:, None], 0) / denom).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out, mask=dims < HEAD_DIM)
    if X8:     # HEAD_DIM == BLOCK_D, a multiple of 32: the head's groups of the row [heads · HEAD_DIM]
        num_groups = tl.num_programs(1) * (HEAD_DIM // 32)
        gs = head * (HEAD_DIM // 32) + tl.arange(0, HEAD_DIM // 32)
        gguf_gemv_x8_triton.round_groups(tl.reshape(out.to(tl.float32), [HEAD_DIM // 32, 32]),
                                         codes_ptr + seq * num_groups * 32, ds_ptr + 2 * seq * num_groups,
                                         gs, gs < num_groups)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8   # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """About two waves of (seq, KV head, split) programs over the GPU's SMs, rounded down to a
    power of two, and no split shorter than one tile of the longest context. Measured on an H100
    at Llama-3-8B shapes (bench/NOTES.md): batch 1 wants 8 splits at ctx 512 and 32 from ctx 2048
    on; batch 64 (512 programs) wants 1. Pure host arithmetic on static sizes: pass a static
    bound (max_model_len) as max_seq_len for CUDA graphs."""
    num_groups = max(1, num_seqs * num_kv_heads)
    wanted = 1 << (max(1, triton.cdiv(2 * _num_sms(device), num_groups)).bit_length() - 1)
    useful = triton.cdiv(max(1, max_seq_len), _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def can_round_x8(num_splits: int, head_dim: int) -> bool:
    """Whether the reduce can write the output rounded (`out_x8`): there is a reduce (more than
    one split), and each head is whole 32-element groups in one power-of-two tile."""
    return num_splits > 1 and head_dim >= 32 and not head_dim & (head_dim - 1)


@dataclass
class DecodeRotary:
    """The new token's key and value before rotary ([B, num_kv_heads, head_dim], last dim
    contiguous), its position and cache slot ([B]; a negative slot writes nothing), and the rotary
    table [max_positions, head_dim] float32 (cos | sin): what `paged_decode_attention` needs to
    apply rotary and write the cache itself."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor

    @classmethod
    def none(cls, q: torch.Tensor) -> "DecodeRotary":
        # placeholders for a launch without rotary (never read)
        return cls(q, q, q, q, q)

    def check(self, q: torch.Tensor, k_cache: torch.Tensor) -> None:
        num_seqs, _, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        if head_dim & (head_dim - 1):
            raise ValueError(f"rotary: head_dim must be a power of two, got {head_dim}")
        check_shape("rotary.k", self.k, (num_seqs, num_kv_heads, head_dim))
        check_shape("rotary.v", self.v, (num_seqs, num_kv_heads, head_dim))
        check_shape("rotary.positions", self.positions, (num_seqs,))
        check_shape("rotary.slot_mapping", self.slot_mapping, (num_seqs,))
        check_shape("rotary.cos_sin_cache", self.cos_sin_cache, (None, head_dim))
        check_dtype("rotary.cos_sin_cache", self.cos_sin_cache, (torch.float32,))
        check_dtype("rotary.positions", self.positions, INDEX_DTYPES)
        check_dtype("rotary.slot_mapping", self.slot_mapping, INDEX_DTYPES)
        check_same_dtype(q=q, k=self.k, v=self.v)
        for name, t in (("rotary.k", self.k), ("rotary.v", self.v), ("rotary.cos_sin_cache", self.cos_sin_cache)):
            check_last_dim_contiguous(name, t)

    def launch_args(self) -> dict:
        return dict(k_new_ptr=self.k, v_new_ptr=self.v, positions_ptr=self.positions, cos_sin_ptr=self.cos_sin_cache,
                    slot_mapping_ptr=self.slot_mapping, stride_knt=self.k.stride(0), stride_knh=self.k.stride(1),
                    stride_vnt=self.v.stride(0), stride_vnh=self.v.stride(1), stride_cs=self.cos_sin_cache.stride(0))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, num_splits: int | None = None,
    max_seq_len: int | None = None, out: torch.Tensor | None = None,
    block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
    out_x8: XInt8 | None = None, rotary: "DecodeRotary | None" = None,
) -> torch.Tensor:
    """One new token per sequence attends its whole cached context (its own key included, so
    write the cache first).

    q: [B, num_heads, head_dim] (last dim contiguous); k_cache, v_cache:
    [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32, context length including the new token, ≤ max_blocks * block_size
    (not checked: that would need a host sync). Returns out [B, num_heads, head_dim] (or fills
    `out`).

    block_n, num_stages: None → 64 keys a tile and 2 stages, or 128 and 3 over an e4m3 cache,
    whose tiles are half the bytes (H200, batch 64 / 256 at 1,024 tokens of context: 68 / 228 µs
    against 92 / 257 with 64 and 2; `bench/kernels.py --decode-only --kv-dtypes fp8 --sweep`).

    num_splits: None → `choose_num_splits` from max_seq_len (or, if that is None too, from the
    largest context the block table can hold). Launch shapes depend only on B, the head counts and
    num_splits, never on tensor contents: safe inside a CUDA graph with a fixed num_splits.

    out_x8: also the output rounded for a 4-bit GEMV (`XInt8` [B, num_heads · head_dim], filled);
    needs num_splits > 1 (the reduce writes it) and head_dim a power of two ≥ 32.

    rotary: q, and `rotary.k`, `rotary.v` (the new token's), come before rotary: the kernel rotates
    q, and the split that holds the new token rotates k and writes it and v into the caches first
    (what `rotary_kv_write_triton` does in a launch of its own). head_dim a power of two.
    """
    check_shape("q", q, (None, None, None))
    num_seqs, num_heads, head_dim = q.shape
    check_shape("k_cache", k_cache, (None, None, None, head_dim))
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("block_tables", block_tables, (num_seqs, None))
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if num_heads % num_kv_heads:
        raise ValueError(f"q: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check_dtype("q", q, FLOAT_DTYPES)
    check_kv_cache_dtype(q, k_cache, v_cache)
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        check_last_dim_contiguous(name, t)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      seq_lens=seq_lens)
    if out is None:
        out = torch.empty_like(q)
    else:
        check_shape("out", out, tuple(q.shape))
        check_same_dtype(q=q, out=out)
        check_last_dim_contiguous("out", out)
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, bound, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    if out_x8 is not None:
        if not can_round_x8(num_splits, head_dim):
            raise ValueError(f"out_x8: needs num_splits > 1 and head_dim a power of two >= 32, got "
                             f"{num_splits} and {head_dim}")
        check_shape("out_x8.codes", out_x8.codes, (num_seqs, num_heads * head_dim))
        check_dtype("out_x8.codes", out_x8.codes, (torch.int8,))
        check_shape("out_x8.dx_sum", out_x8.dx_sum, (num_seqs, num_heads * head_dim // 32, 2))
        if not (out_x8.codes.is_contiguous() and out_x8.dx_sum.is_contiguous()):
            raise ValueError("out_x8: codes and dx_sum must be contiguous")
    if num_seqs == 0:
        return out

    if rotary is not None:
        rotary.check(q, k_cache)
    is_fp8_cache = k_cache.dtype == FP8_DTYPE
    block_n = block_n or (128 if is_fp8_cache else _DEFAULT_BLOCK_N)
    num_stages = num_stages or (3 if is_fp8_cache else 2)
    group_size = num_heads // num_kv_heads
    is_single_split = num_splits == 1
    if is_single_split:
        part_out = part_lse = out   # unused
    else:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    launch = pdl.launch_options(q.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2_E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP_SIZE=group_size,
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        IS_SINGLE_SPLIT=is_single_split, DOT_PRECISION=dot_precision(q.dtype),
        KV_AS_F16=kv_as_f16(q, k_cache), **launch, EARLY=launch["PDL"] and pdl.EARLY_LOADS,
        LINE=min(block_d, max(1, 128 // k_cache.element_size())), prefetch_programs=2 * _num_sms(q.device),
        ROTARY=rotary is not None, **(rotary or DecodeRotary.none(q)).launch_args(),
        SKIP_EMPTY=SKIP_EMPTY_SPLITS and not is_single_split, num_warps=num_warps, num_stages=num_stages,
    )
    if not is_single_split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out if out_x8 is None else out_x8.codes,
            out if out_x8 is None else out_x8.dx_sum, num_splits, out.stride(0), out.stride(1), seq_lens,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), X8=out_x8 is not None,
            **pdl.launch_options(q.device), SKIP_EMPTY=SKIP_EMPTY_SPLITS, BLOCK_N=block_n, num_warps=4,
        )
    return out
