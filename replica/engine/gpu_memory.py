"""KV-cache sizing on the GPU: profile the peak activation memory once, give the rest to the cache.

budget = total * gpu_memory_utilization - (this process's memory after loading the weights: the
bytes of its live tensors plus an allowance for the CUDA context and libraries) - (peak extra
memory of one forward at the full token budget and of the logits of max_num_seqs rows) - a margin
for CUDA graphs, and never more than the memory free on the device at that moment.

Live tensors, not what torch's allocator has reserved: loading packed GGUF weights leaves holes
in the allocator's segments (their raw bytes and fused parts are freed between the tensors that
stay), 0.5-0.7 GiB for a 4-bit 8B. Counted as used, they took that much from the KV cache, so
the cache did not grow by what the weights no longer take; later activations reuse them
(bench/results/quant-memory-H200-8b-2026-11-30.json; vLLM counts its weights the same way).

gpu_memory_utilization is this replica's share of the GPU, so that several replicas can share one
(0.2 each for four): the device-wide memory in use would count the other replicas' weights and
caches as this one's, and would leave the later replicas nothing.
"""
import logging
from dataclasses import dataclass

import torch

from replica.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

_GRAPH_MARGIN_BYTES = 512 << 20
_CONTEXT_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces: outside torch's allocator


@dataclass(frozen=True)
class MemoryProfile:
    """What the profile saw, for logs and benchmarks. reserved - allocated after the weights:
    holes in the allocator's segments that live tensors keep (not counted, see above)."""
    total_bytes: int
    utilization: float
    allocated_after_weights_bytes: int
    reserved_after_weights_bytes: int
    free_bytes: int
    activation_peak_bytes: int
    kv_budget_bytes: int


def kv_budget_bytes(total_bytes: int, utilization: float, own_bytes: int, free_bytes: int,
                    activation_peak_bytes: int) -> int:
    """The KV cache's bytes: this replica's share of the GPU less what it holds already (weights,
    context), never more than is free on the device, less the activation peak and a graph margin.
    Other processes on the GPU change `free_bytes` only, never the share."""
    return int(min(total_bytes * utilization - own_bytes, free_bytes) - activation_peak_bytes
               - _GRAPH_MARGIN_BYTES)


@torch.inference_mode()
def kv_cache_bytes_from_profile(engine) -> int:
    model, config = engine.model, engine.config
    device = engine.device
    cfg = model.cfg
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free_before, total = torch.cuda.mem_get_info(device)
    reserved_after_weights = torch.cuda.memory_reserved(device)
    base_allocated = torch.cuda.memory_allocated(device)
    in_use_after_weights = base_allocated + _CONTEXT_BYTES

    num_tokens = min(config.max_num_batched_tokens, engine.max_model_len)
    block_size = config.block_size
    num_blocks = -(-num_tokens // block_size)
    cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                        dtype=engine.kv_dtype, device=device)
    cache_bytes = cache.numel() * cache.element_size()
    kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(cfg.num_layers)]
    positions = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(
        slot_mapping=positions.clone(),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_tokens, max_seq_len=num_tokens, is_decode_only=False, block_size=block_size)
    input_ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=device)
    hidden = model.forward(input_ids, positions, meta, kv_caches)
    rows = min(config.max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden[:rows])
    torch.softmax(logits, dim=-1)           # the sampler's largest temporary
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - base_allocated - cache_bytes
    del cache, kv_caches, hidden, logits, meta
    torch.cuda.empty_cache()

    budget = kv_budget_bytes(total, config.gpu_memory_utilization, in_use_after_weights, free_before,
                             activation_peak)
    engine.memory_profile = MemoryProfile(total, config.gpu_memory_utilization, base_allocated,
                                          reserved_after_weights, free_before, activation_peak, budget)
    log.info("GPU memory: total %.1f GiB x %.2f; in use after weights %.1f GiB (tensors %.2f GiB in "
             "%.2f GiB the allocator holds, context %.1f GiB); activation peak %.2f GiB (%d tokens); free "
             "on the device %.1f GiB; KV cache gets %.1f GiB", total / 2**30, config.gpu_memory_utilization,
             in_use_after_weights / 2**30, base_allocated / 2**30, reserved_after_weights / 2**30,
             _CONTEXT_BYTES / 2**30, activation_peak / 2**30, num_tokens, free_before / 2**30, budget / 2**30)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache: this replica holds "
                         f"{in_use_after_weights / 2**30:.1f} GiB after its weights, its share is "
                         f"{total * config.gpu_memory_utilization / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
                         f"and {free_before / 2**30:.1f} GiB are free; raise --gpu-memory-utilization, "
                         "lower --max-num-batched-tokens, or free the GPU")
    return budget
