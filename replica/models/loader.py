"""Checkpoints on disk → (ModelConfig, a stream of (HF parameter name, tensor)).

Two formats: Hugging Face folders (config.json + *.safetensors) and GGUF files. Tensors stream one
at a time (safetensors and GGUF are memory-mapped), so peak host memory stays near one tensor.
GGUF names are mapped to HF names, quantised tensors are dequantised (or, with
`keep_quantized`, projections and the output head of a type the GGUF kernels read are yielded as
`GGUFTensor` block data), and the Q/K rows that llama.cpp's converter permutes for its interleaved rotary layout are
put back in HF's order.
"""
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from replica.models.gguf_file import GGUFFile
from replica.models.model_config import ModelConfig
from replica.models.registry import resolve_model_path

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs",
}


@dataclass
class Checkpoint:
    path: Path
    format: str            # "hf" or "gguf"
    config: ModelConfig
    gguf: GGUFFile | None = None   # a GGUF's index, read once by open_checkpoint

    def weights(self, device: torch.device | str = "cpu",
                keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """device: where dummy weights are drawn (files are read on the host either way).
        keep_quantized: GGUF projections (and lm_head) of a `gguf_packed.SUPPORTED_TYPES` type come as
        `GGUFTensor` (block data, rows in HF order) instead of dequantised tensors."""
        if self.format == "hf":
            return _hf_weights(self.path)
        if self.format == "dummy":
            return _dummy_weights(self.config, device)
        return _gguf_weights(self.gguf or GGUFFile(self.path), self.config, keep_quantized)


def open_checkpoint(model: str, load_format: str = "auto") -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf" and not _has_gguf_magic(path):   # Ollama's blobs have no suffix
            raise ValueError(f"{path.name}: a model file must be GGUF; otherwise give a checkpoint folder")
        index = GGUFFile(path)
        return Checkpoint(path, "gguf", ModelConfig.from_gguf_fields(_config_fields(index), index.tensor_names),
                          index)
    config = ModelConfig.from_hf_folder(path)
    if load_format == "dummy":
        return Checkpoint(path, "dummy", config)
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path.name}: no *.safetensors files (only safetensors checkpoints are loaded)")
    return Checkpoint(path, "hf", config)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file.name} is corrupt or unreadable ({type(err).__name__}); "
                             "re-download the checkpoint") from None


def _dummy_weights(config: ModelConfig, device, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for every parameter the config implies (benchmarks: same cost per token as
    real weights). Projections ~ N(0, 0.02), norms 1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device) * 0.02
    yield "model.embed_tokens.weight", rand(config.vocab_size, h)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", rand(config.vocab_size, h)
    yield "model.norm.weight", torch.ones(h)
    for n in range(config.num_layers):
        prefix = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
            yield prefix + name + ".weight", rand(*shape)
        if config.qkv_bias:
            for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                yield prefix + f"self_attn.{name}.bias", torch.zeros(size)
        if config.qk_norm:
            yield prefix + "self_attn.q_norm.weight", torch.ones(config.head_dim)
            yield prefix + "self_attn.k_norm.weight", torch.ones(config.head_dim)
        yield prefix + "input_layernorm.weight", torch.ones(h)
        yield prefix + "post_attention_layernorm.weight", torch.ones(h)


def _config_fields(index: GGUFFile) -> dict:
    """The fields ModelConfig reads: all but the tokenizer's arrays, of which only the number of
    tokens is needed (its vocabulary size when the architecture omits it)."""
    fields = {k: v for k, v in index.fields.items() if not k.startswith("tokenizer.ggml.")}
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in index.fields:
            fields[key] = index.fields[key]
    if "tokenizer.ggml.tokens" in index.fields:
        fields["tokenizer.ggml.tokens"] = range(len(index.fields["tokenizer.ggml.tokens"]))
    return fields


def _gguf_weights(index: GGUFFile, config: ModelConfig,
                  keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    from replica.quantization.gguf_packed import SUPPORTED_TYPES, GGUFTensor

    for tensor in index.tensors:
        name = _gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        if (keep_quantized and (name.endswith("proj.weight") or name == "lm_head.weight")
                and tensor.tensor_type.name in SUPPORTED_TYPES):
            # tensor.data: uint8 [rows, row bytes] of GGML blocks; rows permute as whole rows
            data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, order="C"))
            if config.architecture == "llama":
                if name.endswith("q_proj.weight"):
                    data = _unpermute_rows(data, config.num_heads)
                elif name.endswith("k_proj.weight"):
                    data = _unpermute_rows(data, config.num_kv_heads)
            rows, cols = int(tensor.shape[1]), int(tensor.shape[0])   # GGUF lists dims fastest first
            yield name, GGUFTensor(tensor.tensor_type.name, data.contiguous(), (rows, cols))
            continue
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)   # F32 is a view of the file
        weight = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable copy
        if config.architecture == "llama":
            if name.endswith("q_proj.weight"):
                weight = _unpermute_rows(weight, config.num_heads)
            elif name.endswith("k_proj.weight"):
                weight = _unpermute_rows(weight, config.num_kv_heads)
        yield name, weight


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs;
    # HF's rotate_half layout keeps the two halves apart.
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


@dataclass
class InMemoryCheckpoint:
    """Weights that already live in memory (benchmarks, tests): no files, no tokenizer."""
    config: ModelConfig
    weight_source: object           # a callable returning an iterator of (HF name, tensor)
    path: None = None
    format: str = "memory"

    def weights(self, device: torch.device | str = "cpu",
                keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        return self.weight_source()


def checkpoint_from_hf_model(hf_model) -> InMemoryCheckpoint:
    """Share a live transformers model's weights (copied into the engine's own layout)."""
    cfg = hf_model.config.to_dict()
    cfg.setdefault("architectures", [type(hf_model).__name__])
    if not cfg["architectures"]:
        cfg["architectures"] = [type(hf_model).__name__]
    return InMemoryCheckpoint(ModelConfig.from_hf_dict(cfg), lambda: iter(hf_model.state_dict().items()))
