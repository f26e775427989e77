"""What `/api/tags`, `/api/show`, `/api/ps` and `/v1/models` say about the served weights.

Read once at start-up from the checkpoint on disk and the model's config; nothing here touches
the engine's state. `digest` identifies the weights file by path, size and modification time
(hashing a multi-gigabyte file at start-up would delay readiness); it changes when the file does.
"""
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


_GGUF_QUANT = re.compile(r"(?i)\b(IQ\d_\w+|Q\d_K_[SML]|Q\d_K|Q\d_\d|Q\d|BF16|F16|F32)\b")


@dataclass
class ModelInfo:
    weights_name: str              # what --model named: "smollm2", a file or a folder name
    format: str                    # "gguf" or "safetensors"
    family: str                    # the architecture: llama, qwen2...
    parameter_size: str            # "135M", "1.7B"
    num_parameters: int
    quantization_level: str
    size_bytes: int
    modified_at: str               # RFC 3339, UTC
    digest: str
    context_length: int
    model_info: dict = field(default_factory=dict)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def count_parameters(cfg) -> int:
    """Llama-family parameter count from the config's shapes (embeddings counted once if tied)."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * inter + 2 * hidden
    embeddings = cfg.vocab_size * hidden * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embeddings + hidden


def _human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}".replace(".0" + unit, unit) if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def describe_model(model: str, path: Path, model_config, max_model_len: int,
                   dtype: str, store_model=None) -> ModelInfo:
    """`model` as the operator named it (--model), `path` the checkpoint it resolved to;
    `store_model` its Ollama store entry, whose digest, size and date are reported as Ollama's."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    size_bytes = sum(f.stat().st_size for f in files)
    mtime = max((f.stat().st_mtime for f in files), default=0.0)
    is_gguf = path.suffix == ".gguf" or store_model is not None
    quant = dtype
    if is_gguf:
        match = _GGUF_QUANT.search(path.name.replace(".", " "))
        quant = match.group(1).upper() if match else "unknown"
    num_parameters = count_parameters(model_config)
    arch = model_config.architecture
    digest = hashlib.sha256(f"{path}:{size_bytes}:{mtime}".encode()).hexdigest()
    modified_at = _rfc3339(mtime)
    weights_name = path.name if Path(model).exists() else model
    if store_model is not None:
        weights_name, digest = store_model.name.display, store_model.digest
        size_bytes, modified_at = store_model.size_bytes, store_model.modified_at
        quant = store_model.config.get("file_type") or quant
    return ModelInfo(
        weights_name=weights_name,
        format="gguf" if is_gguf else "safetensors",
        family=arch,
        parameter_size=_human_count(num_parameters),
        num_parameters=num_parameters,
        quantization_level=quant,
        size_bytes=size_bytes,
        modified_at=modified_at,
        digest=digest,
        context_length=max_model_len,
        model_info={
            "general.architecture": arch,
            "general.basename": path.stem,
            "general.parameter_count": num_parameters,
            f"{arch}.context_length": max_model_len,
            f"{arch}.embedding_length": model_config.hidden_size,
            f"{arch}.feed_forward_length": model_config.intermediate_size,
            f"{arch}.block_count": model_config.num_layers,
            f"{arch}.attention.head_count": model_config.num_heads,
            f"{arch}.attention.head_count_kv": model_config.num_kv_heads,
            f"{arch}.vocab_size": model_config.vocab_size,
            f"{arch}.rope.freq_base": model_config.rope_theta,
            # embeddings: llama.cpp's enum (1 mean, 3 last) and its name
            f"{arch}.pooling_type": 3 if model_config.pooling == "last" else 1,
            "pagefleet.embedding_pooling": model_config.pooling or "mean",
        },
    )
