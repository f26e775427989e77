"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) over the paged KV cache.

Weights are plain tensors with fused projections: qkv = [q | k | v] rows, gate_up = [gate | up].
With a quantisation method the seven projections are weight objects instead
(`replica/layers/quantized_linear.py`), and with GGUF's so is an untied lm_head (llama.cpp keeps
it in Q6_K); embeddings and norms stay in the model dtype, and so does lm_head under FP8.
One forward takes a flat batch of T tokens (prefill chunks and decodes mixed) with their positions;
attention reads and writes the paged cache through the attention backend.
"""
import logging
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from replica.kernels import ops
from replica.layers.attention import AttentionBackend, AttentionMetadata
from replica.kernels.gguf_linear import XInt8
from replica.layers.quantized_linear import (
    attention_rounds_x8, gate_up_act, linear, linear_add_norm, make_weight, norm_for, weight_bytes,
)
from replica.layers.rotary import build_cos_sin_cache, compute_inv_freq
from replica.models.model_config import ModelConfig

log = logging.getLogger(__name__)

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Decode steps hand attention q and the new keys and values before rotary, and the Triton decode
# kernel rotates them and writes the cache (`paged_decode_triton.DecodeRotary`): one launch a layer
# fewer. Off until measured on a GPU (bench/NOTES.md, "Runs waiting for a GPU").
FUSE_DECODE_ROTARY = False


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None):
        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        def projection(num_rows, num_cols):
            return make_weight(quantization, num_rows, num_cols, dtype, device)

        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_weight = projection(q_rows + 2 * kv_rows, cfg.hidden_size)
        self.qkv_bias = empty(q_rows + 2 * kv_rows) if cfg.qkv_bias else None
        self.o_weight = projection(cfg.hidden_size, q_rows)
        self.q_norm = empty(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = empty(cfg.head_dim) if cfg.qk_norm else None
        self.input_norm = empty(cfg.hidden_size)
        self.post_norm = empty(cfg.hidden_size)
        self.gate_up_weight = projection(2 * cfg.intermediate_size, cfg.hidden_size)
        self.down_weight = projection(cfg.hidden_size, cfg.intermediate_size)
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
        # An FP8 checkpoint's per-channel or per-tensor scales, beside each projection's weight
        # (optional names: a float checkpoint quantised on load has none).
        self.scale_targets = {name.removesuffix("weight") + "weight_scale": target
                              for name, target in self.targets.items()
                              if name.endswith("proj.weight") and not isinstance(target[0], torch.Tensor)}

    @property
    def projections(self) -> list:
        return [self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight]


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 backend: AttentionBackend, max_positions: int, quantization: str | None = None):
        """quantization: None, "fp8" or "gguf" (`replica.quantization.methods`), already
        resolved against the checkpoint and the device."""
        self.cfg, self.dtype, self.device, self.backend = cfg, dtype, device, backend
        self.quantization = quantization
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = [DecoderLayer(cfg, dtype, device, quantization) for _ in range(cfg.num_layers)]
        self.norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed
        elif quantization == "gguf":    # a GGUF's output head stays packed too (Q6_K in llama.cpp's files)
            self.lm_head = make_weight(quantization, cfg.vocab_size, cfg.hidden_size, dtype, device)
        else:
            self.lm_head = torch.empty_like(self.embed)
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
            if offset is None:
                offset, rows = 0, dest.shape[0]
            if name.endswith(".weight_scale"):
                dest.load_scale(offset, rows, tensor)
                continue
            shape = (rows, *dest.shape[1:])
            if tuple(shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(shape)}: the checkpoint does not match its config")
            if isinstance(dest, torch.Tensor):
                if not isinstance(tensor, torch.Tensor) or tensor.dtype == torch.float8_e4m3fn:
                    raise ValueError(f"weight {name} is quantised ({_describe(tensor)}); this model "
                                     "was built without a quantisation method for it")
                dest.narrow(0, offset, rows).copy_(tensor)
            else:
                dest.load_rows(offset, rows, tensor)
            loaded.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
        for i, layer in enumerate(self.layers):
            for weight in layer.projections:
                if not isinstance(weight, torch.Tensor):
                    weight.finish(f"model.layers.{i}")
        if not isinstance(self.lm_head, torch.Tensor):
            self.lm_head.finish("lm_head")
        log.info("weights on %s: %.2f GiB (%s)", self.device, self.num_weight_bytes / 2**30,
                 self.quantization or str(self.dtype).removeprefix("torch."))

    @property
    def num_weight_bytes(self) -> int:
        """Bytes the weights take on the device: every tensor once (a tied lm_head is the
        embedding), projections in whatever form they are held."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        total = sum(weight_bytes(t) for t in tensors)
        for layer in self.layers:
            total += sum(weight_bytes(w) for w in layer.projections)
            total += sum(weight_bytes(t) for t in (layer.qkv_bias, layer.q_norm, layer.k_norm,
                                                   layer.input_norm, layer.post_norm) if t is not None)
        return total

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
        layer = self.layers[int(match[1])]
        return layer.targets.get(match[2]) or layer.scale_targets.get(match[2])

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # input_ids, positions: [T] → hidden states [T, hidden]
        defer = FUSE_DECODE_ROTARY and meta.is_decode_only and getattr(self.backend, "takes_decode_rotary", False)
        x, residual = self.piece(0, input_ids, None, positions, meta.slot_mapping, kv_caches, defer)
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            rotary = {}
            if defer:      # decode attention rotates q and the new key and writes the cache itself
                from replica.kernels.paged_decode_triton import DecodeRotary
                x, k, v = x
                rotary["rotary"] = DecodeRotary(k, v, positions, self.cos_sin_cache, meta.slot_mapping)
            # the output may come rounded for a 4-bit o_proj on int8 x (`XInt8`)
            attn = self.backend.forward(x, k_cache, v_cache, meta, self.scale,
                                        round_x8=attention_rounds_x8(self.layers[i].o_weight, x), **rotary)
            x, residual = self.piece(i + 1, attn, residual, positions, meta.slot_mapping, kv_caches, defer)
        return x

    @torch.inference_mode()
    def piece(self, i: int, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
              slot_mapping: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
              defer_rotary: bool = False):
        """The forward between two attentions, which reads nothing but its arguments (piecewise
        CUDA graphs capture each piece: `replica/engine/piecewise_graphs.py`).

        Piece i takes layer i-1's attention output ([T, heads, head_dim], or `XInt8` rounded for a
        4-bit o_proj) and the residual (piece 0: the input ids and None), runs layer i-1's o_proj
        and MLP, and ends with layer i's q after rotary, its K and V written to the cache: returns
        (q [T, heads, head_dim], residual [T, hidden]). The last piece (i = num_layers) ends with
        the final norm instead: (hidden [T, hidden], residual). defer_rotary: ((q, k, v) before
        rotary, residual), for a decode attention that applies it (`FUSE_DECODE_ROTARY`).
        """
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        num_tokens = x.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        layer = self.layers[i] if i < len(self.layers) else None
        # Each norm is written in the form the next projection takes (FP8 rows before a W8A8
        # one), and fused with the projection before it where a kernel allows (`linear_add_norm`).
        if i == 0:
            h, residual = norm_for(layer.qkv_weight, F.embedding(x, self.embed), None, layer.input_norm, eps)
        else:
            prev = self.layers[i - 1]
            attn = x if isinstance(x, XInt8) else x.reshape(num_tokens, q_size)
            h, residual = linear_add_norm(attn, prev.o_weight, residual,
                                          prev.post_norm, eps, prev.gate_up_weight)
            act = gate_up_act(h, prev.gate_up_weight, prev.down_weight)
            # down_proj, the residual add and this layer's input norm (the final norm last)
            h, residual = linear_add_norm(act, prev.down_weight, residual,
                                          layer.input_norm if layer else self.norm, eps,
                                          layer.qkv_weight if layer else None)
            if layer is None:
                return h, residual
        qkv = linear(h, layer.qkv_weight, layer.qkv_bias)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = ops.rms_norm(q, layer.q_norm, eps)
            k = ops.rms_norm(k, layer.k_norm, eps)
        if defer_rotary:
            return (q, k, v), residual
        # rotary and the KV-cache write in one kernel; attention then reads the cache
        k_cache, v_cache = kv_caches[i]
        q = ops.apply_rotary_and_write_kv(q, k, v, positions, self.cos_sin_cache, k_cache, v_cache,
                                          slot_mapping)
        return q, residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [S, hidden] (only the rows that sample) → float32 logits [S, vocab]
        return linear(hidden, self.lm_head).float()


def _describe(tensor) -> str:
    qtype = getattr(tensor, "qtype", None)
    return qtype or str(tensor.dtype).removeprefix("torch.")
