"""The engine on a CUDA GPU: Triton backend, CUDA graphs. Skipped without CUDA."""
import pytest
import torch

from replica.config import EngineConfig
from replica.engine.engine import LLMEngine
from replica.engine.llm import LLM
from replica.models.loader import checkpoint_from_hf_model
from replica.sampling_params import SamplingParams
from tests.tiny_models import load_hf_model, make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(length),), generator=gen).tolist()
            for length in torch.randint(1, 200, (n,), generator=gen)]


def _tokens_with_switch(monkeypatch, module, name: str, cfg, fmt: str, prompts, after=None) -> dict:
    """{True: tokens, False: tokens} of a small engine built with module.name set each way;
    after(value) runs once that engine is done (the callers' spies)."""
    from bench.quant_accuracy import build_engine
    tokens = {}
    for value in (True, False):
        monkeypatch.setattr(module, name, value)
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=8, token_budget=2048,
                              engine_args=dict(num_kv_blocks=512, max_model_len=1024))
        tokens[value] = _greedy_tokens(engine, prompts)
        del engine
        torch.cuda.empty_cache()
        if after is not None:
            after(value)
    return tokens


def _llama(hidden: int, intermediate: int, num_layers: int, num_heads: int = 8, num_kv_heads: int = 2):
    """A random Llama's config for the engine tests: vocab 2048, contexts up to 1024."""
    from replica.models.model_config import ModelConfig
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5})


def _greedy_tokens(engine, prompts) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].new_token_ids)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return got


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp32_greedy_tokens_equal_transformers_on_gpu(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch, with_tokenizer=False, hidden_size=256,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    hf = load_hf_model(path).cuda()
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=512,
              max_model_len=512, max_num_batched_tokens=256)
    prompts = _prompts(12, 512)
    results = llm.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, results):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.outputs[0].token_ids == ref
    assert llm.engine.runner.graphs is not None, "decode ran through CUDA graphs"


@pytest.mark.parametrize("max_model_len", [1024, 2048])
def test_cuda_graphs_and_eager_give_the_same_tokens(tmp_path, max_model_len):
    # fp32: in bf16 the eager path's split-KV count (from this step's max_seq_len) and cuBLAS's
    # choice of kernel by exact batch size round differently from the padded graph, and random
    # weights turn those last-bit differences into different near-tie tokens. At 2048 the small
    # buckets also have a graph for contexts up to SHORT_CONTEXT, which these prompts replay.
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                   max_position_embeddings=2048, initializer_range=0.05)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.float32).eval()
    prompts = _prompts(40, 4096, seed=1)
    tokens = {}
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(model="bench", device="cuda", dtype="float32", num_kv_blocks=2048,
                                        max_model_len=max_model_len, enforce_eager=eager),
                           checkpoint=checkpoint_from_hf_model(hf))
        assert (engine.runner.graphs is None) == eager
        if not eager:
            assert bool(engine.runner.graphs.short_graphs) == (max_model_len > 1024)
        assert (engine.runner.piecewise is None) == eager, "mixed steps replay piecewise graphs"
        tokens[eager] = _greedy_tokens(engine, prompts)
        del engine
        torch.cuda.empty_cache()
    assert tokens[False] == tokens[True]


def test_gpu_memory_profile_sizes_the_cache(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama", with_tokenizer=False)
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", gpu_memory_utilization=0.3,
                                    max_model_len=512))
    free, total = torch.cuda.mem_get_info()
    kv_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    assert kv_bytes > 0.1 * total, "most of the 30% budget went to the KV cache"
    assert torch.cuda.memory_allocated() < 0.3 * total + (512 << 20)


def test_holes_in_torchs_allocator_do_not_shrink_the_kv_cache(tmp_path):
    """Packed GGUF weights leave holes in the allocator's segments (raw bytes freed between the
    tensors that stay). The budget counts live tensors: ~1 GiB of holes costs the cache only the
    tensors that keep them open, not the holes."""
    import gc
    path = make_tiny_model(tmp_path / "m", "llama", with_tokenizer=False)
    config = EngineConfig(model=str(path), device="cuda", gpu_memory_utilization=0.3, max_model_len=512)
    engine = LLMEngine(config)
    budget_without_holes = engine.memory_profile.kv_budget_bytes
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    # Each round: a new 64 MiB segment (no hole left is that large), freed, then a 33 MiB pin
    # split from it (best fit: the older 31 MiB holes are too small), leaving a 31 MiB hole.
    pins = []
    for _ in range(32):
        del_me = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        del del_me
        pins.append(torch.empty(33 << 20, dtype=torch.uint8, device="cuda"))
    engine = LLMEngine(config)
    profile = engine.memory_profile
    holes = profile.reserved_after_weights_bytes - profile.allocated_after_weights_bytes
    assert holes > 768 << 20, "the setup left the holes it meant to"
    pinned = 32 * (33 << 20)
    assert abs(profile.kv_budget_bytes - (budget_without_holes - pinned)) < 128 << 20
    del engine, pins


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q5_K_M", "fp32_kv8"])
def test_packed_gguf_and_an_fp8_cache_run_in_graphs_as_eagerly(fmt):
    """The GGUF formats as llama.cpp mixes them (8-bit Q6_K head and v/down, segments in qkv)
    and the FP8 KV cache: decode through CUDA graphs gives the eager path's tokens (fp32
    activations: the GEMVs' exact products, no near-tie rounding)."""
    from bench.quant_accuracy import build_engine

    cfg = _llama(512, 1024, 8)
    prompts = _prompts(24, 2048, seed=3)
    tokens = {}
    for eager in (False, True):
        engine = build_engine(cfg, fmt.replace("fp32", "bf16"), "cuda", max_num_seqs=32, token_budget=2048,
                              engine_args=dict(dtype="float32", enforce_eager=eager, num_kv_blocks=1024,
                                               max_model_len=1024))
        if fmt.endswith("_kv8"):
            assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn
        else:
            assert engine.model.lm_head.packed.qtype == "Q6_K"
        tokens[eager] = _greedy_tokens(engine, prompts)
        del engine
        torch.cuda.empty_cache()
    assert tokens[False] == tokens[True]


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q4_0"])
def test_decode_batches_through_the_small_batch_gemm_keep_the_dequantise_paths_tokens(fmt, monkeypatch):
    """12 sequences decode in batches of 5-12 rows: through `gguf_mm_triton` (in the CUDA graphs),
    the same greedy tokens as dequantise + cuBLAS gives (fp32 activations: both exact to ~1e-6)."""
    from bench.quant_accuracy import build_engine
    from replica.kernels import gguf_gemv_triton, gguf_mm_triton

    cfg = _llama(512, 1024, 4)
    calls = []
    real = gguf_mm_triton.gguf_mm
    monkeypatch.setattr(gguf_mm_triton, "gguf_mm", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    tokens = {}
    for mm_rows in (gguf_mm_triton.MM_ROWS, gguf_gemv_triton.GEMV_ROWS):
        monkeypatch.setattr(gguf_mm_triton, "MM_ROWS", mm_rows)
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=16, token_budget=2048,
                              engine_args=dict(dtype="float32", num_kv_blocks=512, max_model_len=1024))
        tokens[mm_rows] = _greedy_tokens(engine, _prompts(12, 2048, seed=7))
        del engine
        torch.cuda.empty_cache()
        if mm_rows == gguf_gemv_triton.GEMV_ROWS:
            assert not calls
        else:
            assert calls and max(calls) > gguf_gemv_triton.GEMV_ROWS
            calls.clear()
    assert tokens[gguf_mm_triton.MM_ROWS] == tokens[gguf_gemv_triton.GEMV_ROWS]


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q4_0"])
def test_fused_gguf_epilogues_and_pdl_graphs_keep_the_tokens(fmt, monkeypatch):
    """bf16 decode through the fused GGUF GEMV epilogues (silu·mul in gate_up's GEMV, split-K
    sums in the next norm) and PDL inside the graphs gives the tokens of the unfused kernels."""
    from replica.kernels import gguf_gemv_triton, gguf_linear_triton, rms_norm_triton, rms_norm_x8_triton
    from replica.layers import quantized_linear

    # o_proj's and down_proj's GEMVs split K in 2 (the default tiles split none at these shapes),
    # so that their partials go through the norm's sum; every type of both formats, 1-4 rows
    split = gguf_gemv_triton.GemvConfig(2, 32, 2, 1)
    for qtype in ("Q4_0", "Q4_K", "Q6_K"):
        for rows in range(1, 5):
            for n, k in ((4096, 4096), (4096, 8192)):
                monkeypatch.setitem(gguf_gemv_triton.TUNED, (qtype, rows, n, k), split)
    cfg = _llama(4096, 8192, 2, num_heads=32, num_kv_heads=8)
    # the sum goes to the x8 norm where the next GEMV is 4-bit on int8 x, else to the bf16 one
    calls = {"gated": 0, "sum_norm": 0}
    for module, name, key in ((gguf_linear_triton, "gguf_linear_gated", "gated"),
                              (rms_norm_triton, "split_k_sum_add_rms_norm", "sum_norm"),
                              (rms_norm_x8_triton, "add_rms_norm_x8", "sum_norm")):
        def spy(*args, _fn=getattr(module, name), _key=key, _name=name, **kwargs):
            if _name != "add_rms_norm_x8" or kwargs.get("partial") is not None:
                calls[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    def spied(fused):
        if fused:
            assert calls["gated"] > 0 and calls["sum_norm"] > 0, calls
    tokens = _tokens_with_switch(monkeypatch, quantized_linear, "FUSE_GGUF_EPILOGUES", cfg, fmt,
                                 _prompts(4, 2048, seed=5), after=spied)
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "Q4_0"])
def test_piecewise_graph_replays_equal_the_same_pieces_run_eagerly(fmt, monkeypatch):
    """A mixed step replaying its pieces' graphs computes exactly what the same pieces compute
    eagerly through the same padded buffers (same kernels, same shapes): the same tokens, in each
    weight format, while every step with a prefill chunk goes through the pieces."""
    from bench.quant_accuracy import build_engine

    cfg = _llama(1024, 2048, 4)
    engine = build_engine(cfg, fmt, "cuda", max_num_seqs=16, token_budget=256,
                          engine_args=dict(num_kv_blocks=512, max_model_len=1024,
                                           enable_prefix_caching=False))   # the same steps twice
    piecewise = engine.runner.piecewise
    assert piecewise is not None and set(piecewise.graphs) == set(piecewise.buckets)
    sizes = []
    run = piecewise.run

    def counted_run(input_ids, *args):
        sizes.append(len(input_ids))
        return run(input_ids, *args)

    monkeypatch.setattr(piecewise, "run", counted_run)
    prompts = _prompts(24, 2048, seed=7)
    replayed = _greedy_tokens(engine, prompts)
    num_replayed_steps = len(sizes)
    graphs, piecewise.graphs = piecewise.graphs, {}     # no graphs: run() runs the pieces eagerly
    eager = _greedy_tokens(engine, prompts)
    piecewise.graphs = graphs
    assert num_replayed_steps > 5 and len(sizes) == 2 * num_replayed_steps
    assert replayed == eager


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_K"])
def test_int8_x_written_by_the_norms_and_attention_keeps_the_logits(fmt, monkeypatch):
    """Decode rows whose 4-bit GEMVs take int8 x get it from the RMSNorm (codes before its 1/rms,
    rstd in the GEMV) and from decode attention's reduce, instead of x's own rounding kernel: the
    same prefill logits, and decode logits (CUDA graphs) closer to those of that kernel than that
    kernel's are to x unrounded: two roundings of the same x (a code may round the other way at a
    tie, so not bit for bit; this random 4-layer model amplifies one flip: 0.43 of the rounding's
    own effect for Q4_K on the H200), where a wrong scale or code would be far off; and the
    writers ran."""
    from bench.quant_accuracy import build_engine, step_logits
    from replica.kernels import gguf_gemv_triton, rms_norm_x8_triton
    from replica.layers import quantized_linear

    cfg = _llama(1024, 2048, 4)
    calls = []
    norm = rms_norm_x8_triton.add_rms_norm_x8
    monkeypatch.setattr(rms_norm_x8_triton, "add_rms_norm_x8", lambda *a, **k: calls.append(1) or norm(*a, **k))
    prompts = _prompts(3, 2048, seed=9)
    logits = {}
    for variant in ("fused", "own kernel", "unrounded"):
        monkeypatch.setattr(quantized_linear, "FUSE_GGUF_X8_NORM", variant == "fused")
        monkeypatch.setattr(gguf_gemv_triton, "X_INT8", variant != "unrounded")
        calls.clear()
        engine = build_engine(cfg, fmt, "cuda", max_num_seqs=8, token_budget=2048,
                              engine_args=dict(dtype="float32", num_kv_blocks=512, max_model_len=1024))
        logits[variant] = step_logits(engine, prompts)
        del engine
        torch.cuda.empty_cache()
        assert (len(calls) > 0) == (variant == "fused")
    (prefill, decode), (prefill_ref, decode_ref) = logits["fused"], logits["own kernel"]
    assert torch.equal(prefill, prefill_ref)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(decode, decode_ref) < rel(decode_ref, logits["unrounded"][1]), (
        rel(decode, decode_ref), rel(decode_ref, logits["unrounded"][1]))


@pytest.mark.parametrize("fmt", ["bf16", "Q4_0"])
def test_rotary_inside_decode_attention_keeps_the_tokens(fmt, monkeypatch):
    """`llama.FUSE_DECODE_ROTARY` (decode attention rotates q and the new key and writes the cache,
    inside the decode graphs with PDL) gives the tokens of the separate rotary + KV write kernel."""
    from replica.models import llama

    cfg = _llama(1024, 2048, 4)
    tokens = _tokens_with_switch(monkeypatch, llama, "FUSE_DECODE_ROTARY", cfg, fmt, _prompts(4, 2048, seed=7))
    assert tokens[True] == tokens[False]
