"""Getting llama.cpp and the weights ready for bench/vs_llamacpp.py on a machine with no network:
the llama.cpp tree that a llama-cpp-python sdist vendors, trimmed to what a CUDA build of
llama-server and llama-quantize and the HF→GGUF converter read; SmolLM2's tokenizer as HF files;
an 8B-shaped checkpoint with random bf16 weights. The commands are in vs_llamacpp.py's docstring
(`python bench/vs_llamacpp.py pack-llamacpp|export-tokenizer|make-checkpoint ...`).
"""
from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

# What neither the llama-server/llama-quantize build (tests, examples off) nor the converter reads.
PACK_DROP = ("docs", "models", "tests", "examples", "pocs", "benches", "media", ".github", "ci", "skills",
             "ggml/src/ggml-vulkan", "ggml/src/ggml-sycl", "ggml/src/ggml-metal", "ggml/src/ggml-cann",
             "ggml/src/ggml-musa", "ggml/src/ggml-opencl", "ggml/src/ggml-webgpu", "ggml/src/ggml-hexagon",
             "ggml/src/ggml-zdnn", "ggml/src/ggml-kompute", "tools/server/tests", "tools/server/bench",
             "tools/ui/src", "tools/ui/tests", "tools/ui/package-lock.json")


def pack_llamacpp(sdist: Path, dest: Path) -> None:
    """Unpack the llama.cpp tree vendored in a llama-cpp-python sdist into dest, keeping what the
    CUDA build of llama-server and llama-quantize and the HF→GGUF converter need."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        prefix = tar.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp"
        for m in tar.getmembers():
            if not m.name.startswith(prefix + "/"):
                continue
            rel = m.name[len(prefix) + 1:]
            if not rel or any(rel == d or rel.startswith(d + "/") for d in PACK_DROP):
                continue
            m.name = rel
            tar.extract(m, dest, filter="data")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MiB")


def export_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer as Hugging Face files (from the bundled GGUF, through transformers)."""
    from transformers import AutoTokenizer
    from replica.models.registry import resolve_model_path
    gguf_path = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(dest))
    print(f"{dest}: {sorted(p.name for p in dest.iterdir())}")


# Llama-3-8B's shape (bench/engine.py's "8b").
SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


def make_checkpoint(dest: Path, tokenizer: Path, shape: dict) -> None:
    """An HF Llama checkpoint with random bf16 weights (std 0.02) and the given tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(dest))
    for f in tokenizer.iterdir():
        shutil.copy(f, dest / f.name)
    print(f"{dest}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vs_llamacpp.py " + argv[0])
    if argv[0] == "pack-llamacpp":
        p.add_argument("sdist", type=Path)
        p.add_argument("dest", type=Path)
        a = p.parse_args(argv[1:])
        pack_llamacpp(a.sdist, a.dest)
    elif argv[0] == "export-tokenizer":
        p.add_argument("dest", type=Path)
        export_tokenizer(p.parse_args(argv[1:]).dest)
    else:
        p.add_argument("dest", type=Path)
        p.add_argument("--tokenizer", type=Path, required=True)
        p.add_argument("--tiny", action="store_true", help="a 2-layer model (checks the flow on a CPU)")
        a = p.parse_args(argv[1:])
        shape = SHAPE_8B if not a.tiny else dict(SHAPE_8B, hidden_size=256, intermediate_size=512,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)
        make_checkpoint(a.dest, a.tokenizer, shape)
    return 0
