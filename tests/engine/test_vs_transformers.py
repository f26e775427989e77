"""Greedy output is token-for-token transformers' greedy `generate`, on the same weights.

Every case uses a small block size (sequences span many blocks), a small token budget (prefills
are chunked and mixed with decodes) and, in the tight-pool case, so few blocks that sequences are
preempted and recomputed. Requests are submitted together and staggered.
"""
import pytest
import torch

from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams
from tests.tiny_models import ARCHS, load_hf_model, make_tiny_model

PROMPT_LENGTHS = (1, 5, 16, 17, 33, 60, 90)
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, with_tokenizer=False)
    return request.param, path, load_hf_model(path)


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _assert_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.requests


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("pool", ["roomy", "tight"])
def test_greedy_tokens_equal_transformers_submitted_together(tiny, pool):
    arch, path, hf = tiny
    num_blocks = 400 if pool == "roomy" else 36   # tight: 36 x 4 = 144 tokens for 7 sequences
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=16, num_kv_blocks=num_blocks,
              max_model_len=128)
    prompts = _prompts(seed=1)
    results = llm.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == _hf_greedy(hf, prompt), f"{arch}, prompt of {len(prompt)}"
    if pool == "tight":
        assert llm.engine.stats().num_preemptions > 0, "the tight pool must force preemption"
    _assert_pool_free(llm)


def test_greedy_tokens_equal_transformers_staggered(tiny):
    arch, path, hf = tiny
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=8, num_kv_blocks=200, max_model_len=128)
    prompts = _prompts(seed=2)
    engine = llm.engine
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished:
        if pending and steps % 3 == 0:          # a new request every third step
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, GREEDY)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].new_token_ids)
        steps += 1
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == _hf_greedy(hf, prompt), f"{arch}, prompt of {len(prompt)}"
    _assert_pool_free(llm)


def test_first_step_logits_match_transformers(tiny):
    arch, path, hf = tiny
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=256, num_kv_blocks=200, max_model_len=128)
    engine = llm.engine
    prompts = _prompts(seed=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    plan = engine.scheduler.schedule()
    assert len(plan.samplers) == len(prompts), "every prompt fits one step"
    logits = engine.runner.execute(plan)
    for (seq, _), row in zip(plan.samplers, logits):
        ref = hf(torch.tensor([seq.token_ids])).logits[0, -1].float()
        torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4, msg=f"{arch}")
    for i in range(len(prompts)):
        engine.abort_request(str(i))
    engine.step()
    _assert_pool_free(llm)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
])
def test_rope_scaling_greedy_equals_transformers(tmp_path, scaling):
    """Llama 3.1's rope scaling (and linear scaling), with an original context short enough that
    the test prompts reach the scaled frequencies."""
    path = make_tiny_model(tmp_path / scaling["rope_type"], "llama", with_tokenizer=False,
                           rope_theta=500000.0, rope_scaling=scaling)
    hf = load_hf_model(path)
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=32, num_kv_blocks=300, max_model_len=256)
    prompts = _prompts(seed=4)
    for prompt, result in zip(prompts, llm.generate(prompts, GREEDY)):
        assert result.outputs[0].token_ids == _hf_greedy(hf, prompt)
    _assert_pool_free(llm)
