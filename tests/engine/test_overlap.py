"""Overlap scheduling: step t+1 is planned and launched before step t's tokens are read, and
nothing a client sees changes: the same tokens, finish reasons and stop reasons as with overlap
off, under chunked prefill, preemption, n > 1, stop token ids, penalties (which read step t's
tokens first) and seeds. A sequence that ended at step t computes one more token at t+1; it is
never reported, and its blocks come back.
"""
import pytest

from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams

from .conftest import assert_pool_free

PROMPTS = [[5, 17, 99], [240, 31, 7, 300, 8, 9, 10] * 3, [1] * 12, [400, 401], [33] * 20, [77] * 9]


def engine_settings(**overrides) -> dict:
    # block size 4 and a 36-block pool: six sequences of up to ~50 tokens must preempt; a budget
    # of 8 tokens chunks every prefill and mixes it with decodes
    return dict(dtype="float32", block_size=4, num_kv_blocks=36, max_model_len=64,
                max_num_batched_tokens=8) | overrides


def outputs(llm: LLM, params) -> list[tuple]:
    results = llm.generate(PROMPTS, params)
    return [(c.index, c.token_ids, c.finish_reason, c.stop_reason) for r in results for c in r.outputs]


@pytest.fixture(scope="module")
def engines(token_model_path):
    return (LLM(str(token_model_path), **engine_settings()),
            LLM(str(token_model_path), **engine_settings(enable_overlap=False)))


CASES = {
    "greedy to max_tokens": SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    "greedy with EOS": SamplingParams(temperature=0.0, max_tokens=40),
    "stop token ids": SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[7, 100, 250, 301]),
    "n=3 seeded": SamplingParams(n=3, temperature=0.9, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3,
                                frequency_penalty=0.5, ignore_eos=True),
    "logprobs and min_tokens": SamplingParams(temperature=0.0, max_tokens=10, min_tokens=5, logprobs=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlap_changes_nothing_a_client_sees(engines, case):
    overlapped, sequential = engines
    params = CASES[case]
    assert outputs(overlapped, params) == outputs(sequential, params)
    for llm in engines:
        assert_pool_free(llm.engine)


def test_the_engine_really_overlaps_and_preempts(engines):
    overlapped, sequential = engines
    for llm in engines:
        llm.engine.num_overlapped_steps = 0
        outputs(llm, CASES["greedy to max_tokens"])
    assert overlapped.engine.num_overlapped_steps > 10
    assert sequential.engine.num_overlapped_steps == 0
    assert overlapped.engine.stats().num_preemptions > 0, "the pool must be tight enough to preempt"


def test_a_finished_sequence_reports_exactly_max_tokens(engines):
    overlapped, _ = engines
    for max_tokens in (1, 2, 7):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for result in overlapped.generate(PROMPTS, params):
            assert len(result.outputs[0].token_ids) == max_tokens
    assert_pool_free(overlapped.engine)
