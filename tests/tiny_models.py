"""Tiny random checkpoints built from transformers configs, saved as HF folders.

`make_tiny_model(path, arch)` writes config.json + model.safetensors (+ the SmolLM2 tokenizer, taken
from the bundled GGUF, when `with_tokenizer`). Weights are random but seeded, with a wider init
than the default so that greedy choices are not near-ties.
"""
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_VOCAB = 49152
_TOKENIZER_CACHE = Path(tempfile.gettempdir()) / "pagefleet-test-tokenizer"

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _config(arch: str, vocab_size: int, **overrides):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.1, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=32, **common)
    raise ValueError(f"unknown arch {arch}")


def smollm2_tokenizer_dir() -> Path:
    """The bundled SmolLM2 tokenizer saved as HF files (built once per machine)."""
    marker = _TOKENIZER_CACHE / "tokenizer_config.json"
    if not marker.exists():
        from transformers import AutoTokenizer

        from replica.models.registry import resolve_model_path

        gguf = resolve_model_path("smollm2")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix="pagefleet-tok-"))
        tok.save_pretrained(tmp)
        shutil.rmtree(_TOKENIZER_CACHE, ignore_errors=True)
        shutil.move(str(tmp), _TOKENIZER_CACHE)
    return _TOKENIZER_CACHE


def make_tiny_model(path, arch: str = "llama", with_tokenizer: bool = True, seed: int = 0,
                    **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    path = Path(path)
    vocab = SMOLLM2_VOCAB if with_tokenizer else overrides.pop("vocab_size", 512)
    config = _config(arch, vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if with_tokenizer:
        for f in smollm2_tokenizer_dir().iterdir():
            shutil.copy(f, path / f.name)
    return path


def load_hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
