"""CUDA graphs of a mixed step's forward, in pieces between attentions, one set per token bucket.

A step with prefill chunks cannot replay one whole-forward graph as decode does: its attention
grid and metadata depend on each sequence's query length. Everything else in a layer depends only
on the step's token count, so the forward is cut at attention (`LlamaForCausalLM.piece`) into
num_layers + 1 pieces, each captured once per bucket of token counts, and a step replays them in
turn with attention run eagerly between them, as vLLM's piecewise graphs do. An eager mixed step
launches ~12 kernels a layer, each costing 40-90 µs of host time on the H200 machines, i.e. more
host time than the step's GPU time (bench/NOTES.md, "PDL, and fewer kernels a layer"); a piecewise
step launches one graph and 1-3 attention kernels a layer.

Static buffers, outside the graphs' memory pool, carry everything from one piece to the next:

    input_ids, positions, slot_mapping [max_tokens]    the step's rows, then padding to the bucket
    q         [max_tokens, heads, head_dim]            piece i → layer i's attention
    attn      [max_tokens, heads, head_dim]            layer i's attention → piece i + 1
    residual  [max_tokens, hidden]                     piece i → piece i + 1
    hidden    [max_tokens, hidden]                     the last piece → the logits

A graph reads and writes only these (its temporaries live in the pool), so the pieces can share
one pool with the decode graphs. Padding rows (T..bucket) write their K/V into the scratch slot
that the block manager never hands out; attention reads q[:T] and writes attn[:T] only, so a
padding row's attn keeps stale, finite values, and nothing reads its outputs.

Without `capture()` (the CPU, tests) `run` executes the pieces eagerly through the same buffers.
"""
import bisect
import logging

import torch

from replica.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2048


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get graphs: multiples of 16 up to 256, then the step doubles with the size,
    so that padding a step of more than 128 tokens to its bucket adds less than 1/8 of its rows
    (small steps are bound by the host, where padding costs nothing)."""
    sizes, size, step = [], 16, 16
    while size < max_tokens:
        sizes.append(size)
        if size >= 16 * step:
            step *= 2
        size += step
    return sizes + [max_tokens]


class PiecewiseGraphs:
    def __init__(self, model, kv_caches, scratch_block: int, block_size: int, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"piecewise graphs need max_tokens >= 1, got {max_tokens}")
        self.model = model
        self.kv_caches = kv_caches
        self.num_pieces = len(kv_caches) + 1
        self.scratch_slot = scratch_block * block_size
        self.buckets = token_buckets(max_tokens)
        cfg, device, dtype = model.cfg, model.device, model.dtype
        heads = (max_tokens, cfg.num_heads, cfg.head_dim)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), self.scratch_slot, dtype=torch.int64, device=device)
        self.q = torch.zeros(heads, dtype=dtype, device=device)
        self.attn = torch.zeros(heads, dtype=dtype, device=device)
        self.residual = torch.zeros(max_tokens, cfg.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(max_tokens, cfg.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def bucket(self, num_tokens: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_tokens)]

    def _run_piece(self, i: int, bs: int) -> None:
        """Piece i over the first bs rows of the static buffers, its outputs copied into them."""
        x = self.input_ids[:bs] if i == 0 else self.attn[:bs]
        out, residual = self.model.piece(i, x, None if i == 0 else self.residual[:bs], self.positions[:bs],
                                         self.slot_mapping[:bs], self.kv_caches)
        if i + 1 < self.num_pieces:
            self.q[:bs].copy_(out)
            self.residual[:bs].copy_(residual)
        else:
            self.hidden[:bs].copy_(out)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Captures every piece at every bucket, sharing `pool` (the decode graphs') if given."""
        from replica.kernels import pdl                # Triton: imported where graphs exist

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), pdl.capturing_graphs():
            for bs in reversed(self.buckets):       # largest first, so smaller ones reuse its pool
                for i in range(self.num_pieces):    # warm-up: Triton compiles, cuBLAS picks kernels
                    self._run_piece(i, bs)
                pieces = []
                for i in range(self.num_pieces):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self._run_piece(i, bs)
                    pool = graph.pool() if pool is None else pool
                    pieces.append(graph)
                self.graphs[bs] = pieces
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured piecewise CUDA graphs (%d pieces) for token counts %s", self.num_pieces,
                 self.buckets)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The forward of a step of T ≤ max_tokens tokens (`meta` describes them, unpadded):
        returns hidden states [T, hidden], a view of a static buffer that the next step overwrites."""
        # input_ids, positions: [T] int64
        num_tokens = input_ids.shape[0]
        bs = self.bucket(num_tokens)
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        if bs > num_tokens:     # a previous step's real slots there would overwrite live K/V
            self.slot_mapping[num_tokens:bs].fill_(self.scratch_slot)
        graphs = self.graphs.get(bs)
        backend, scale = self.model.backend, self.model.scale
        for i in range(self.num_pieces):
            if graphs is None:
                self._run_piece(i, bs)
            else:
                graphs[i].replay()
            if i + 1 < self.num_pieces:
                k_cache, v_cache = self.kv_caches[i]
                backend.forward(self.q[:num_tokens], k_cache, v_cache, meta, scale, out=self.attn[:num_tokens])
        return self.hidden[:num_tokens]
