"""TritonAttentionBackend against TorchAttentionBackend over two engine-like steps: a mixed
batch (a prompt chunk after a cached prefix, a whole prompt, a decode), then a decode-only step.
Both read the new keys and values from the cache, where the model's rotary kernel wrote them."""
import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.triton_backend import TritonAttentionBackend
from replica.layers.attention import AttentionMetadata, TorchAttentionBackend
from tests.kernels.paged_batch import ON_GPU, assert_close_rel, head_scale, make_batch


def _meta(batch, is_decode_only, num_decode_prefix=0):
    return AttentionMetadata(
        slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
        is_decode_only=is_decode_only, block_size=batch.block_size, num_decode_prefix=num_decode_prefix,
    )


def _run_both(batch, is_decode_only, num_decode_prefix=0):
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache_ref(batch.k, batch.v, k_cache, v_cache, batch.slot_mapping)
    scale = head_scale(batch.q.shape[-1])
    meta = _meta(batch, is_decode_only, num_decode_prefix)
    out = TritonAttentionBackend().forward(batch.q, k_cache, v_cache, meta, scale)
    ref = TorchAttentionBackend().forward(batch.q.float(), k_cache.float(), v_cache.float(),
                                          _meta(batch, is_decode_only), scale)
    assert_close_rel(out, ref, batch.q.dtype)
    return meta


def test_mixed_step_then_decode_step():
    if ON_GPU:
        shapes = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
        seq_lens, query_lens = [1300, 512, 2049], [256, 512, 1]
    else:
        shapes = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 4}
        seq_lens, query_lens = [30, 9, 17], [6, 9, 1]
    _run_both(make_batch(seq_lens, query_lens, seed=11, **shapes), is_decode_only=False)
    decode_lens = [s + 1 for s in seq_lens]
    _run_both(make_batch(decode_lens, [1] * len(seq_lens), seed=12, **shapes), is_decode_only=True)


def test_a_mixed_steps_leading_decodes_run_through_the_decode_kernel():
    """Running sequences come first in a step: their one-token rows go to the split-KV decode
    kernel, the prompt chunks after them to the prefill kernel (query offsets rebased)."""
    if ON_GPU:
        shapes = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
        seq_lens, query_lens = [2049, 700, 1300, 512, 90], [1, 1, 256, 512, 1]
    else:
        shapes = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 4}
        seq_lens, query_lens = [30, 17, 30, 9, 12], [1, 1, 6, 9, 1]
    batch = make_batch(seq_lens, query_lens, seed=13, **shapes)
    meta = _run_both(batch, is_decode_only=False, num_decode_prefix=2)
    assert meta.prefill_query_start_loc.tolist() == (batch.query_start_loc[2:] - 2).tolist()
    assert meta.decode_num_splits is not None


def test_decode_num_splits_is_chosen_once_per_step():
    batch = make_batch([40, 3], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    meta = _meta(batch, True)
    meta.decode_num_splits = 3           # e.g. a CUDA-graph bucket's static value
    backend = TritonAttentionBackend()
    out = backend.forward(batch.q, batch.k_cache, batch.v_cache, meta, 0.125)
    assert meta.decode_num_splits == 3
    assert not out.isnan().any()
    fresh = _meta(batch, True)
    backend.forward(batch.q, batch.k_cache, batch.v_cache, fresh, 0.125)
    assert fresh.decode_num_splits is not None, "the first layer picks it for the others"


def test_attention_reads_the_cache_and_never_writes_it():
    batch = make_batch([40, 3], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        backend.forward(batch.q, k_cache, v_cache, _meta(batch, True), 0.125)
        assert torch.equal(k_cache, batch.k_cache) and torch.equal(v_cache, batch.v_cache)


def test_an_engine_on_triton_kernels_generates_the_torch_paths_tokens_through_mixed_steps(tmp_path, monkeypatch):
    """The whole step on the Triton kernels (the interpreter on the CPU): a request that is
    decoding when a second one arrives makes mixed steps whose leading row is a decode; greedy
    tokens equal the torch reference engine's."""
    from replica.config import EngineConfig
    from replica.engine.engine import LLMEngine
    from replica.sampling_params import SamplingParams
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    mixed_prefixes = []                 # num_decode_prefix of each mixed step's first layer
    forward = TritonAttentionBackend.forward

    def recording(self, q, k_cache, v_cache, meta, scale, **kwargs):
        if not meta.is_decode_only and meta.prefill_query_start_loc is None:
            mixed_prefixes.append(meta.num_decode_prefix)
        return forward(self, q, k_cache, v_cache, meta, scale, **kwargs)
    monkeypatch.setattr(TritonAttentionBackend, "forward", recording)
    tokens = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"     # the interpreter on the CPU
    for backend in ("triton", "torch"):
        engine = LLMEngine(EngineConfig(model=str(path), device=device, dtype="float32", kernel_backend=backend,
                                        block_size=4, num_kv_blocks=64, max_model_len=64,
                                        max_num_batched_tokens=16, enable_overlap=False))
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        engine.add_request("a", [5, 6, 7, 8, 9], params)
        out = {"a": [], "b": []}
        for step in range(12):
            if step == 2:               # "a" is decoding: "b"'s 30-token prompt arrives
                engine.add_request("b", list(range(10, 40)), params)
            for o in engine.step():
                out[o.request_id] += o.outputs[0].new_token_ids
            if not engine.has_unfinished:
                break
        tokens[backend] = out
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert tokens["triton"] == tokens["torch"] and len(tokens["torch"]["b"]) == 6, tokens
    assert 1 in mixed_prefixes, mixed_prefixes    # "a"'s decode led "b"'s prompt chunks


def test_decode_attention_hands_a_4_bit_o_proj_its_output_rounded_only_where_it_can():
    from replica.kernels.gguf_gemv_x8_triton import quantize_x
    from replica.kernels.gguf_linear import XInt8

    batch = make_batch([30, 9, 17], [1, 1, 1], seed=12, num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache_ref(batch.k, batch.v, k_cache, v_cache, batch.slot_mapping)
    backend, scale = TritonAttentionBackend(), head_scale(64)
    meta = _meta(batch, is_decode_only=True)
    meta.decode_num_splits = 2        # as a CUDA graph's bucket fixes it from max_model_len
    plain = backend.forward(batch.q, k_cache, v_cache, meta, scale)
    rounded = backend.forward(batch.q, k_cache, v_cache, meta, scale, round_x8=True)
    assert isinstance(rounded, XInt8)
    assert torch.equal(rounded.codes, quantize_x(plain.reshape(3, -1)).codes)
    meta.decode_num_splits = 1      # no reduce kernel to write it: the tensor, as without the flag
    assert isinstance(backend.forward(batch.q, k_cache, v_cache, meta, scale, round_x8=True), torch.Tensor)
    mixed = make_batch([30, 9], [6, 1], seed=11, num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    assert isinstance(backend.forward(mixed.q, mixed.k_cache, mixed.v_cache, _meta(mixed, False), scale,
                                      round_x8=True), torch.Tensor)


def test_a_decode_step_with_rotary_in_the_attention_kernel_equals_the_separate_rotary_kernel(monkeypatch):
    """`llama.FUSE_DECODE_ROTARY`: the model hands decode attention q, k, v before rotary and the
    split kernel rotates and writes the cache; the same hidden states and caches as the rotary +
    KV write kernel before attention (a whole 2-layer model's decode step, 3 sequences)."""
    from replica.models import llama
    from replica.models.model_config import ModelConfig

    cfg = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5})
    batch = make_batch([5, 33, 17], [1, 1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                       dtype=torch.float32, seed=21)
    gen = torch.Generator().manual_seed(3)
    model = llama.LlamaForCausalLM(cfg, torch.float32, batch.q.device, TritonAttentionBackend(), 128)
    tensors = [model.embed, model.norm, model.lm_head] + [t for layer in model.layers for t, _, _ in layer.targets.values()]
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.05 + (1.0 if t.dim() == 1 else 0.0))
    input_ids = torch.randint(0, 64, (3,), generator=gen).to(batch.q.device)
    positions = (batch.seq_lens - 1).long()
    from replica.kernels import ops
    separate = []
    rotary_kernel = ops.apply_rotary_and_write_kv
    monkeypatch.setattr(ops, "apply_rotary_and_write_kv", lambda *a: separate.append(1) or rotary_kernel(*a))
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(llama, "FUSE_DECODE_ROTARY", fused)
        separate.clear()
        caches = [(batch.k_cache.clone(), batch.v_cache.clone()) for _ in model.layers]
        hidden = model.forward(input_ids, positions, _meta(batch, is_decode_only=True), caches)
        results[fused] = (hidden, caches)
        assert len(separate) == (0 if fused else 2)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for layer, ((k_fused, v_fused), (k_sep, v_sep)) in enumerate(zip(results[True][1], results[False][1])):
        torch.testing.assert_close(k_fused, k_sep, atol=1e-6, rtol=1e-6)
        if layer == 0:      # copied as they are; a later layer's values follow the rotated keys' last bits
            assert torch.equal(v_fused, v_sep)
        else:
            torch.testing.assert_close(v_fused, v_sep, atol=1e-5, rtol=1e-5)


def test_rotary_is_refused_outside_a_decode_only_step():
    from replica.kernels.paged_decode_triton import DecodeRotary
    batch = make_batch([9, 5], [3, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, seed=2)
    rotary = DecodeRotary(batch.k, batch.v, batch.seq_lens.long(), batch.q.new_zeros(16, 64).float(),
                          batch.slot_mapping)
    import pytest
    with pytest.raises(ValueError, match="decode-only"):
        TritonAttentionBackend().forward(batch.q, batch.k_cache, batch.v_cache, _meta(batch, False), 0.125,
                                         rotary=rotary)
