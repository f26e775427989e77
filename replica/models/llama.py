"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) over the paged KV cache.

Weights are plain tensors with fused projections: qkv = [q | k | v] rows, gate_up = [gate | up].
One forward takes a flat batch of T tokens (prefill chunks and decodes mixed) with their positions;
attention reads and writes the paged cache through the attention backend.
"""
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from replica.kernels import ops
from replica.layers.attention import AttentionBackend, AttentionMetadata
from replica.layers.rotary import build_cos_sin_cache, compute_inv_freq
from replica.models.model_config import ModelConfig

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_weight = empty(q_rows + 2 * kv_rows, cfg.hidden_size)
        self.qkv_bias = empty(q_rows + 2 * kv_rows) if cfg.qkv_bias else None
        self.o_weight = empty(cfg.hidden_size, q_rows)
        self.q_norm = empty(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = empty(cfg.head_dim) if cfg.qk_norm else None
        self.input_norm = empty(cfg.hidden_size)
        self.post_norm = empty(cfg.hidden_size)
        self.gate_up_weight = empty(2 * cfg.intermediate_size, cfg.hidden_size)
        self.down_weight = empty(cfg.hidden_size, cfg.intermediate_size)
        # HF name (after "model.layers.N.") → (tensor, row offset); row offset None means whole
        inter = cfg.intermediate_size
        self.targets = {
            "self_attn.q_proj.weight": (self.qkv_weight, 0, q_rows),
            "self_attn.k_proj.weight": (self.qkv_weight, q_rows, kv_rows),
            "self_attn.v_proj.weight": (self.qkv_weight, q_rows + kv_rows, kv_rows),
            "self_attn.o_proj.weight": (self.o_weight, None, None),
            "mlp.gate_proj.weight": (self.gate_up_weight, 0, inter),
            "mlp.up_proj.weight": (self.gate_up_weight, inter, inter),
            "mlp.down_proj.weight": (self.down_weight, None, None),
            "input_layernorm.weight": (self.input_norm, None, None),
            "post_attention_layernorm.weight": (self.post_norm, None, None),
        }
        if cfg.qkv_bias:
            self.targets |= {
                "self_attn.q_proj.bias": (self.qkv_bias, 0, q_rows),
                "self_attn.k_proj.bias": (self.qkv_bias, q_rows, kv_rows),
                "self_attn.v_proj.bias": (self.qkv_bias, q_rows + kv_rows, kv_rows),
            }
        if cfg.qk_norm:
            self.targets |= {"self_attn.q_norm.weight": (self.q_norm, None, None),
                             "self_attn.k_norm.weight": (self.k_norm, None, None)}


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 backend: AttentionBackend, max_positions: int):
        self.cfg, self.dtype, self.device, self.backend = cfg, dtype, device, backend
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = [DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers)]
        self.norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else torch.empty_like(self.embed)
        self.scale = cfg.head_dim ** -0.5
        self.max_positions = max_positions
        self.inv_freq = compute_inv_freq(cfg)
        self.cos_sin_cache = build_cos_sin_cache(self.inv_freq, max_positions, device)

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        expected = {f"model.layers.{i}.{n}" for i, layer in enumerate(self.layers) for n in layer.targets}
        expected |= {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.cfg.tie_word_embeddings:
            expected.add("lm_head.weight")
        loaded = set()
        for name, tensor in weights:
            if name == "rope_freqs":  # GGUF Llama 3.1: per-frequency divisors instead of rope_scaling
                self.inv_freq = self.inv_freq / tensor.float()
                self.cos_sin_cache = build_cos_sin_cache(self.inv_freq, self.max_positions, self.device)
                continue
            target = self._target(name)
            if target is None:
                continue
            dest, offset, rows = target
            if offset is not None:
                dest = dest.narrow(0, offset, rows)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(dest.shape)}: the checkpoint does not match its config")
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")

    def _target(self, name: str):
        if name == "model.embed_tokens.weight":
            return self.embed, None, None
        if name == "model.norm.weight":
            return self.norm, None, None
        if name == "lm_head.weight":
            return None if self.cfg.tie_word_embeddings else (self.lm_head, None, None)
        match = _LAYER_NAME.fullmatch(name)
        if match is None or int(match[1]) >= len(self.layers):
            return None
        return self.layers[int(match[1])].targets.get(match[2])

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # input_ids, positions: [T] → hidden states [T, hidden]
        cfg = self.cfg
        num_tokens = input_ids.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        hidden = F.embedding(input_ids, self.embed)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            else:
                x, residual = ops.fused_add_rms_norm(hidden, residual, layer.input_norm, cfg.rms_norm_eps)
            qkv = ops.linear(x, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
            k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
                k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
            # rotary and the KV-cache write in one kernel: the backend must not write again
            q = ops.apply_rotary_and_write_kv(q, k, v, positions, self.cos_sin_cache,
                                              k_cache, v_cache, meta.slot_mapping)
            attn = self.backend.forward(q, None, None, k_cache, v_cache, meta, self.scale,
                                        is_kv_written=True)
            hidden = ops.linear(attn.reshape(num_tokens, q_size), layer.o_weight)
            x, residual = ops.fused_add_rms_norm(hidden, residual, layer.post_norm, cfg.rms_norm_eps)
            hidden = ops.linear(ops.silu_and_mul(ops.linear(x, layer.gate_up_weight)), layer.down_weight)
        out, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, cfg.rms_norm_eps)
        return out

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [S, hidden] (only the rows that sample) → float32 logits [S, vocab]
        return ops.linear(hidden, self.lm_head).float()
