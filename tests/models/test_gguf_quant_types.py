"""Every GGUF quantisation an Ollama library model comes in loads, dequantised exactly as the
`gguf` package dequantises it, and runs in the engine."""
import gguf
import numpy as np
import pytest
import torch

from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
from replica.models.loader import InMemoryCheckpoint, _unpermute_rows, open_checkpoint
from replica.sampling_params import SamplingParams
from tests.models.gguf_files import NUM_HEADS, NUM_KV_HEADS, PRESETS, write_tiny_gguf

_HF_NAME = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
            "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    for quant in PRESETS:
        write_tiny_gguf(folder / f"tiny-{quant}.gguf", quant)
    return folder


@pytest.mark.parametrize("quant", list(PRESETS))
def test_loader_dequantises_each_type_as_the_gguf_package_does(gguf_dir, quant):
    path = gguf_dir / f"tiny-{quant}.gguf"
    loaded = dict(open_checkpoint(str(path)).weights())
    reader = gguf.GGUFReader(str(path))
    expected_types = set(PRESETS[quant][1].values())
    seen_types = set()
    for tensor in reader.tensors:
        if tensor.name not in _HF_NAME:
            continue
        seen_types.add(tensor.tensor_type.name)
        reference = torch.from_numpy(np.array(
            gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if tensor.name == "blk.0.attn_q.weight":
            reference = _unpermute_rows(reference, NUM_HEADS)
        elif tensor.name == "blk.0.attn_k.weight":
            reference = _unpermute_rows(reference, NUM_KV_HEADS)
        got = loaded[_HF_NAME[tensor.name]]
        assert got.dtype == torch.float32 and got.shape == reference.shape
        assert torch.equal(got, reference), tensor.name
        assert torch.isfinite(got).all() and got.abs().max() > 0
    assert seen_types == expected_types


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_quantisable_types_round_trip_close_to_the_original_weights(tmp_path, quant):
    """The same seeded weights written in two types dequantise to nearly the same values
    (a sign that block layout and scales are read the right way round)."""
    loaded = dict(open_checkpoint(str(write_tiny_gguf(tmp_path / "a.gguf", quant))).weights())
    exact = dict(open_checkpoint(str(write_tiny_gguf(tmp_path / "b.gguf", "F16"))).weights())
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        error = (loaded[name] - exact[name]).abs().max().item()
        assert error < {"Q4_0": 0.05, "Q4_1": 0.05, "Q8_0": 0.005}.get(quant, 0.002), (name, error)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K", "BF16"])
def test_each_type_runs_in_the_engine(gguf_dir, quant):
    checkpoint = open_checkpoint(str(gguf_dir / f"tiny-{quant}.gguf"))
    engine = LLMEngine(EngineConfig(model=f"tiny-{quant}", dtype="float32", device="cpu",
                                    num_kv_blocks=16, block_size=16, max_model_len=64),
                       checkpoint=InMemoryCheckpoint(checkpoint.config, checkpoint.weights))
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0))
    tokens = []
    while engine.has_unfinished:
        for out in engine.step():
            tokens += out.outputs[0].new_token_ids
    assert len(tokens) == 4 and all(0 <= t < 512 for t in tokens)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# preset → (qkv segments as (type, rows), the other projections' type, bits a weight of each)
_PACKED_MIXES = {"Q4_K_M": ([("Q4_K", 384), ("Q6_K", 128)], "Q4_K", {"Q4_K": 5, "Q6_K": 7}),
                 "Q5_K_M": ([("Q5_K", 384), ("Q6_K", 128)], "Q5_K", {"Q5_K": 9, "Q6_K": 7})}


@pytest.mark.parametrize("quant", list(_PACKED_MIXES))
def test_k_quant_mixes_stay_packed_output_head_included_and_compute_the_dequantised_model(gguf_dir, quant):
    """Ollama's default Q4_K_M (and q5_K_M) with --quantization gguf: q, k, gate, up and o in
    Q4_K (Q5_K), v and down in Q6_K, the output head in Q6_K, all kept packed (qkv as two
    segments), and the first two steps' logits those of the same file dequantised on load (the
    packed scales are rounded to fp16 once: a few 1e-4 apart).
    The engines take the file's weights as their core's load reads them (blocks kept packed
    for gguf), in memory: token-id prompts need no tokenizer, whose build from a GGUF copying
    SmolLM2's vocabulary took 10 s a file. tests/engine/test_quantization.py serves a GGUF path
    with --quantization gguf."""
    from bench.quant_accuracy import compare, step_logits
    from replica.layers.quantized_linear import GGUFWeight

    qkv_segments, main_type, bits = _PACKED_MIXES[quant]
    checkpoint = open_checkpoint(str(gguf_dir / f"tiny-{quant}.gguf"))

    def engine(quantization: str | None) -> LLMEngine:
        def weights():
            return checkpoint.weights("cpu", keep_quantized=quantization == "gguf")
        return LLMEngine(EngineConfig(model=f"tiny-{quant}", dtype="float32", device="cpu",
                                      quantization=quantization, num_kv_blocks=16, block_size=16,
                                      max_model_len=64),
                         checkpoint=InMemoryCheckpoint(checkpoint.config, weights))
    engines = {q: engine(q) for q in ("gguf", None)}
    model = engines["gguf"].model
    layer = model.layers[0]
    assert [(seg.qtype, seg.shape[0]) for _, seg in layer.qkv_weight.segments] == qkv_segments
    assert layer.down_weight.packed.qtype == "Q6_K" and layer.gate_up_weight.packed.qtype == main_type
    assert isinstance(model.lm_head, GGUFWeight) and model.lm_head.packed.qtype == "Q6_K"
    vocab, hidden = model.lm_head.shape
    assert model.lm_head.num_bytes == vocab * hidden * 7 // 8        # 7 bits a weight (bf16: 16)
    assert layer.qkv_weight.num_bytes == sum(rows * hidden * bits[t] / 8 for t, rows in qkv_segments)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    packed_steps, dense_steps = step_logits(engines["gguf"], prompts), step_logits(engines[None], prompts)
    for packed, dense in zip(packed_steps, dense_steps):
        figures = compare(packed, dense)
        assert figures["rel_err"] < 2e-3 and figures["top1"] == 1.0, figures
    for engine in engines.values():
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
