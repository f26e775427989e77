"""Small Llama GGUF files written with the `gguf` package, one per quantisation Ollama ships.

Types that `gguf` can quantise (Q4_0, Q4_1, Q8_0, F16, BF16) are quantised from seeded random
weights; for the K-quants (Q4_K, Q5_K, Q6_K), which `gguf` only dequantises, blocks are seeded
random bytes with their f16 super-block scales set to small finite values, which is a valid
encoding of some weights. The mixtures follow llama.cpp's presets: Q4_K_M keeps attn_v,
ffn_down and the output in Q6_K, Q4_K_S keeps the output in Q6_K, Q5_K_M keeps attn_v and ffn_down
and the output in Q6_K.
"""
import functools
from pathlib import Path

import numpy as np

HIDDEN = 256          # K-quant rows hold whole 256-element super-blocks
INTERMEDIATE = 512
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 64
VOCAB = 512

# Ollama's quantisation name → (GGUF file_type, {tensor kind: ggml type name}); "*" the default
PRESETS = {
    "Q4_0": (2, {"*": "Q4_0"}),
    "Q4_1": (3, {"*": "Q4_1"}),
    "Q8_0": (7, {"*": "Q8_0"}),
    "F16": (1, {"*": "F16"}),
    "BF16": (32, {"*": "BF16"}),
    "Q4_K_S": (14, {"*": "Q4_K", "output": "Q6_K"}),
    "Q4_K_M": (15, {"*": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}),
    "Q5_K_M": (17, {"*": "Q5_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}),
    "Q6_K": (18, {"*": "Q6_K"}),
}
# Where each K-quant block keeps its f16 scales (byte offsets of d, and dmin when it has one).
_K_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _encode(rng: np.random.Generator, values: np.ndarray, type_name: str) -> tuple[np.ndarray, object]:
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _K_SCALE_OFFSETS:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in _K_SCALE_OFFSETS[type_name]:
            scale = rng.uniform(0.0005, 0.002, size=blocks.shape[:2]).astype(np.float16)
            blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        return blocks.reshape(rows, -1), qtype
    return gguf.quants.quantize(values, qtype), qtype


def tensor_shapes() -> dict[str, tuple[int, int] | tuple[int]]:
    q, kv = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    return {
        "token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (q, HIDDEN), "blk.0.attn_k.weight": (kv, HIDDEN),
        "blk.0.attn_v.weight": (kv, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, q),
        "blk.0.ffn_gate.weight": (INTERMEDIATE, HIDDEN), "blk.0.ffn_up.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTERMEDIATE),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
    }


def write_tiny_gguf(path: Path, quant: str, seed: int = 0, tokenizer_from: Path | None = None,
                    chat_template: str | None = None, pooling_type: int | None = None) -> Path:
    """A one-layer Llama in preset `quant`; norms stay F32 as llama.cpp keeps them.
    `tokenizer_from`: copy that GGUF's tokenizer (then the vocabulary is its size)."""
    import gguf

    file_type, kinds = PRESETS[quant]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    vocab = VOCAB
    if tokenizer_from is not None:
        vocab = _copy_tokenizer(writer, tokenizer_from, chat_template)
    writer.add_name(f"tiny-{quant.lower()}")
    writer.add_file_type(file_type)
    writer.add_vocab_size(vocab)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(1)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    for name, shape in tensor_shapes().items():
        if name in ("token_embd.weight", "output.weight"):
            shape = (vocab, HIDDEN)
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        kind = name.split(".")[-2]
        values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        data, qtype = _encode(rng, values, kinds.get(kind, kinds["*"]))
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_tokenizer(writer, source: Path, chat_template: str | None) -> int:
    """Copies `tokenizer.ggml.*` from another GGUF (and a chat template only if given)."""
    num_tokens = 0
    for key, value, value_type, sub_type in _tokenizer_fields(source):
        if key == "tokenizer.ggml.tokens":
            num_tokens = len(value)
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return num_tokens


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: Path) -> tuple:
    """(key, value, type, element type) of a GGUF's tokenizer fields, read once a session:
    gguf-py's reader takes seconds over a 49k-token vocabulary."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), value_type, sub_type))
    return tuple(fields)
