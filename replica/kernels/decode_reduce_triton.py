"""Triton: the combine step of split-KV decode attention (`paged_decode_triton`), as a kernel of
its own or inside the split kernel, done by the group's last split to finish.

Each split s of a (sequence, KV head) group leaves, for every query head of the group, its output
o_s normalised by its own softmax sum and the log2-sum-exp lse_s of its scores; the combine is

    out = Σ_s o_s · 2^(lse_s - max lse) / Σ_s 2^(lse_s - max lse)

Fused (`FUSE_DECODE_REDUCE`): the split kernel's programs of one group count their arrivals in
an int32 counter (`arrival_counters`), and the program that arrives last combines the group's
heads, so a decode layer needs no reduce launch. The pattern is CUTLASS's semaphore: the CTA's
threads meet at a barrier after storing their partials, then one atomic add with release and
acquire at GPU scope publishes them and tells the program whether it is last; the last one reads
the partials through L2 (`.cg`) and sets the counter back to 0 for the next launch, which cannot
start its own arrivals before this grid has ended (the next layer's attention is kernels later).

    splits of group (seq, kv_head):  s0 ─┐
                                     s1 ─┼─ atomic_add(counter) → 0, 1, .., S-1
                                     .. ─┤
                                   S-1 ─┘   the one that read S-1 combines its group's heads
"""
import torch
import triton
import triton.language as tl

from replica.kernels import gguf_gemv_x8_triton, pdl

# The split kernel's last program combines (one launch a decode layer fewer). Off until measured
# on a GPU (bench/NOTES.md, "Runs waiting for a GPU").
FUSE_DECODE_REDUCE = False
_NUM_COUNTERS = 1 << 16      # sequences × KV heads a launch may have; more run the reduce kernel
_counters: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, num_groups: int) -> torch.Tensor | None:
    """The device's zeroed int32 counters, one a (sequence, KV head) group; every fused launch
    leaves them zero. None where they cannot be used: too many groups, or the first call comes
    inside a CUDA-graph capture (allocating there would put them in the graph's pool; the decode
    graphs' eager warm-up calls first)."""
    if num_groups > _NUM_COUNTERS:
        return None
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = _counters[device] = torch.zeros(_NUM_COUNTERS, dtype=torch.int32, device=device)
    return counters


@triton.jit
def reduce_head(part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, seq, head, num_heads, num_splits,
                stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                X8: tl.constexpr):
    """Combine one head's splits into out[seq, head] (and its int8 rounding with X8). The partials
    are read through L2: another program of this grid may have written them."""
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_mask = splits < num_splits
    row = (seq * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + row + splits, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)   # every split empty (seq_len 0)
    weights = tl.exp2(lse - lse_max)
    denom = tl.sum(weights, 0)
    denom = tl.where(denom > 0, denom, 1.0)
    parts = tl.load(part_out_ptr + (row + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=s_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0, cache_modifier=".cg")
    out = (tl.sum(parts * weights[:, None], 0) / denom).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out, mask=dims < HEAD_DIM)
    if X8:     # HEAD_DIM == BLOCK_D, a multiple of 32: the head's groups of the row [heads · HEAD_DIM]
        num_groups = num_heads * (HEAD_DIM // 32)
        gs = head * (HEAD_DIM // 32) + tl.arange(0, HEAD_DIM // 32)
        gguf_gemv_x8_triton.round_groups(tl.reshape(out.to(tl.float32), [HEAD_DIM // 32, 32]),
                                         codes_ptr + seq * num_groups * 32, ds_ptr + 2 * seq * num_groups,
                                         gs, gs < num_groups)


@triton.jit
def last_split_reduces(counter_ptr, part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, seq, kv_head,
                       num_heads, num_splits, stride_ot, stride_oh, GROUP_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, X8: tl.constexpr):
    """Called by every split program after storing its partials: the last of the group to arrive
    combines the group's GROUP_SIZE heads and resets the counter."""
    tl.debug_barrier()                          # every thread's partial stores come before the release
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        for g in tl.static_range(GROUP_SIZE):
            reduce_head(part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, seq, kv_head * GROUP_SIZE + g,
                        num_heads, num_splits, stride_ot, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_S, X8)


@triton.jit
def decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, X8: tl.constexpr, PDL: tl.constexpr,
):
    # grid (num_seqs, num_heads)
    pdl.wait_and_release(PDL)
    reduce_head(part_out_ptr, part_lse_ptr, out_ptr, codes_ptr, ds_ptr, tl.program_id(0).to(tl.int64),
                tl.program_id(1), tl.num_programs(1), num_splits, stride_ot, stride_oh, HEAD_DIM, BLOCK_D,
                BLOCK_S, X8)
