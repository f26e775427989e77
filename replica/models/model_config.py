"""The model's shape and switches, read from a HF config.json or GGUF metadata."""
import json
from dataclasses import dataclass, field
from pathlib import Path

# Llama, Mistral, Qwen2 and Qwen3 share one implementation; they differ only in these switches.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's `<arch>.pooling_type` enum; CLS pooling means nothing for a causal decoder.
GGUF_POOLING = {1: "mean", 3: "last"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    pooling: str | None = None     # embeddings: "mean" or "last" when the checkpoint names one

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "ModelConfig":
        path = folder / "config.json"
        if not path.is_file():
            raise ValueError(f"{folder.name}: no config.json; a checkpoint folder needs config.json "
                             "and *.safetensors")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder.name}/config.json is not valid JSON ({err.msg})") from None
        return cls.from_hf_dict(cfg)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}: "
                             f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
        num_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or None
        if rope and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[int(e) for e in eos_ids],
            sliding_window=window,
        )

    @classmethod
    def from_gguf_fields(cls, fields: dict, tensor_names: set[str]) -> "ModelConfig":
        gguf_arch = fields.get("general.architecture")
        arch = GGUF_ARCHITECTURES.get(gguf_arch)
        if arch is None:
            raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}: supported are "
                             f"{', '.join(GGUF_ARCHITECTURES)}")

        def key(name, default=None):
            return fields.get(f"{gguf_arch}.{name}", default)

        num_heads = key("attention.head_count")
        hidden = key("embedding_length")
        vocab = key("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
        eos = fields.get("tokenizer.ggml.eos_token_id")
        scaling = None
        if key("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=int(num_heads),
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=int(key("attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            rope_scaling=scaling,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            pooling=GGUF_POOLING.get(key("pooling_type")),
        )
