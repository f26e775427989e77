"""--kv-cache-dtype fp8: keys and values in FP8 e4m3 take 1 byte each, so the same cache memory
holds more blocks, and generation stays close to the model-dtype cache (on the CPU: the torch
reference path; the GPU kernels are tested in tests/kernels/test_fp8_kv_cache.py)."""
import pytest
import torch

from bench.quant_accuracy import compare, step_logits
from replica.config import EngineConfig
from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams
from tests.engine.conftest import TINY_ENGINE

_ENGINE = TINY_ENGINE | dict(num_kv_blocks=None, kv_cache_memory_bytes=1 << 20)


def test_an_unknown_cache_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or fp8, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")


def test_an_fp8_cache_holds_four_times_the_float32_blocks_and_generates_close(token_model_path):
    llms = {dtype: LLM(str(token_model_path), kv_cache_dtype=dtype, **_ENGINE) for dtype in ("auto", "fp8")}
    engines = {dtype: llm.engine for dtype, llm in llms.items()}
    assert engines["fp8"].runner.kv_cache.dtype == torch.float8_e4m3fn
    assert engines["auto"].runner.kv_cache.dtype == torch.float32
    assert engines["fp8"].block_manager.num_blocks == 4 * engines["auto"].block_manager.num_blocks
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 500, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    fp8_steps, ref_steps = step_logits(engines["fp8"], prompts), step_logits(engines["auto"], prompts)
    # keys and values rounded to e4m3 (3 mantissa bits, ~3 % an element) move the logits of this
    # random model by a few percent (its top-1 margins are a few hundredths, so some top-1s flip);
    # a cache read wrongly (zeros, another layout, a lost scale) moves them by ~100 %
    for fp8, ref in zip(fp8_steps, ref_steps):
        figures = compare(fp8, ref)
        assert 0 < figures["rel_err"] < 0.05, figures
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts = {dtype: [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for dtype, llm in llms.items()}
    assert all(len(t) == 8 for t in texts["fp8"]), texts
    for engine in engines.values():
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
