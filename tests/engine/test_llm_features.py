"""Request features through the offline LLM on tiny random models: stop strings, stop token ids,
max_tokens, EOS and ignore_eos, min_tokens, logprobs against transformers, n > 1 and abort.

Greedy runs are deterministic, so each test first takes the plain greedy continuation and then
checks that a feature cuts or changes it exactly where it should.
"""
import pytest
import torch

from replica.engine.engine import LLMEngine
from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams
from tests.tiny_models import load_hf_model

from .conftest import TINY_ENGINE, assert_pool_free, copy_checkpoint

TEXT_PROMPT = "The quick brown fox jumps over the lazy dog. Then"
TOKEN_PROMPT = [5, 17, 99, 240, 31, 7, 300]


def greedy(max_tokens: int, **params) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)


@pytest.fixture(scope="module")
def text_continuation(text_llm):
    """The plain greedy continuation of TEXT_PROMPT: (token ids, text)."""
    out = text_llm.generate(TEXT_PROMPT, greedy(24, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    return out.token_ids, out.text


def test_text_is_the_decode_of_the_tokens(text_llm, text_continuation):
    token_ids, text = text_continuation
    assert text == text_llm.tokenizer.decode(token_ids)
    assert len(text) > 40


def test_a_stop_string_ends_the_text_before_it_and_is_the_stop_reason(text_llm, text_continuation):
    token_ids, text = text_continuation
    stop = text[len(text) // 2: len(text) // 2 + 4]
    cut = text.index(stop)
    out = text_llm.generate(TEXT_PROMPT, greedy(24, stop=[stop, "never appears ~~~"]))[0].outputs[0]
    assert out.text == text[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    # generation stopped at the token that completed the stop string
    num_tokens = len(out.token_ids)
    assert out.token_ids == token_ids[:num_tokens]
    assert stop in text_llm.tokenizer.decode(token_ids[:num_tokens])
    assert stop not in text_llm.tokenizer.decode(token_ids[:num_tokens - 1])


def test_streamed_text_never_shows_part_of_a_stop_string(text_llm, text_continuation):
    token_ids, text = text_continuation
    stop = text[len(text) // 2: len(text) // 2 + 6]
    engine = text_llm.engine
    engine.add_request("s", text_llm.tokenizer.encode(TEXT_PROMPT), greedy(24, stop=[stop]))
    deltas = []
    while engine.has_unfinished:
        for out in engine.step():
            deltas.append(out.outputs[0].new_text)
    streamed = "".join(deltas)
    assert streamed == text[:text.index(stop)]
    assert len([d for d in deltas if d]) > 1, "the text was streamed, not sent at the end"


def test_a_stop_token_id_ends_generation_and_is_the_stop_reason(text_llm, text_continuation):
    token_ids, text = text_continuation
    stop_id = token_ids[8]
    k = token_ids.index(stop_id)
    out = text_llm.generate(TEXT_PROMPT, greedy(24, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == token_ids[:k + 1]           # the stop token is in the ids...
    assert out.text == text_llm.tokenizer.decode(token_ids[:k])    # ...but not in the text
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_max_tokens_ends_with_finish_reason_length(token_llm):
    out = token_llm.generate([TOKEN_PROMPT], greedy(5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5
    assert (out.finish_reason, out.stop_reason) == ("length", None)


@pytest.fixture(scope="module")
def token_continuation(token_llm):
    return token_llm.generate([TOKEN_PROMPT], greedy(16, ignore_eos=True))[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def eos_llm(llm_factory, token_model_path, token_continuation, tmp_path_factory):
    """The same weights with config.json's eos_token_id set to the 4th greedy token."""
    eos = token_continuation[3]
    assert eos not in token_continuation[:3]
    path = copy_checkpoint(token_model_path, tmp_path_factory.mktemp("eos") / "model", eos_token_id=eos)
    return llm_factory(path, **TINY_ENGINE), eos


def test_eos_stops_generation_unless_ignore_eos(eos_llm, token_continuation):
    llm, eos = eos_llm
    out = llm.generate([TOKEN_PROMPT], greedy(16))[0].outputs[0]
    assert out.token_ids == token_continuation[:4]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)

    out = llm.generate([TOKEN_PROMPT], greedy(16, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == token_continuation
    assert out.finish_reason == "length"


def test_min_tokens_keeps_eos_out_until_reached(eos_llm, token_continuation):
    llm, eos = eos_llm
    out = llm.generate([TOKEN_PROMPT], greedy(16, min_tokens=6))[0].outputs[0]
    assert out.token_ids[:3] == token_continuation[:3]
    assert out.token_ids[3] != eos                      # EOS was the argmax here, but masked
    assert len(out.token_ids) >= 6


def test_logprobs_are_transformers_log_softmax_with_sorted_top_n(token_llm, token_model_path):
    out = token_llm.generate([TOKEN_PROMPT], greedy(6, ignore_eos=True, logprobs=5))[0].outputs[0]
    hf = load_hf_model(token_model_path)
    with torch.no_grad():
        logits = hf(torch.tensor([TOKEN_PROMPT + out.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(TOKEN_PROMPT) - 1:-1], dim=-1)    # row i predicts token i
    assert len(out.logprobs) == len(out.token_ids) == 6
    for i, (token_id, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token_id
        assert lp.logprob == pytest.approx(reference[i, token_id].item(), abs=1e-4)
        assert len(lp.top) == 5
        top_ids = [t for t, _ in lp.top]
        top_values = [v for _, v in lp.top]
        assert top_values == sorted(top_values, reverse=True)
        assert top_ids == reference[i].topk(5).indices.tolist()
        assert top_values == pytest.approx(reference[i].topk(5).values.tolist(), abs=1e-4)
        assert top_ids[0] == token_id, "greedy picks the best"


def test_logprobs_zero_reports_only_the_chosen_token(token_llm):
    out = token_llm.generate([TOKEN_PROMPT], SamplingParams(max_tokens=3, logprobs=0, seed=3))[0].outputs[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(lp.top == [] and lp.logprob <= 0.0 for lp in out.logprobs)
    assert token_llm.generate([TOKEN_PROMPT], greedy(3))[0].outputs[0].logprobs is None


def test_n_samples_come_back_with_distinct_indices(token_llm, token_continuation):
    result = token_llm.generate([TOKEN_PROMPT], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8,
                                                               ignore_eos=True))[0]
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in result.outputs)
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1, "the samples draw independently"

    result = token_llm.generate([TOKEN_PROMPT], greedy(8, n=2, ignore_eos=True))[0]
    assert [c.token_ids for c in result.outputs] == [token_continuation[:8]] * 2


def test_n_samples_of_a_prompt_chunked_behind_another_request_equal_the_single_answer(
        token_model_path, token_continuation):
    llm = LLM(str(token_model_path), **(TINY_ENGINE | dict(max_num_batched_tokens=32)))
    engine = llm.engine
    engine.add_request("first", list(range(100, 128)), greedy(2, ignore_eos=True))   # 28 of 32 tokens
    engine.add_request("pair", TOKEN_PROMPT, greedy(8, n=2, ignore_eos=True))      # 4 now, 3 next step
    tokens = {0: [], 1: []}
    while engine.has_unfinished:
        for out in engine.step():
            for c in out.outputs:
                if out.request_id == "pair":
                    tokens[c.index] += c.new_token_ids
    assert_pool_free(engine)
    assert tokens == {0: token_continuation[:8], 1: token_continuation[:8]}


def test_prompts_as_strings_or_token_ids_give_the_same_answer(text_llm):
    ids = text_llm.tokenizer.encode(TEXT_PROMPT)
    by_text, by_ids = text_llm.generate([TEXT_PROMPT, ids], greedy(6, ignore_eos=True))
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_a_repeated_prompt_hits_the_prefix_cache(token_llm):
    prompt = list(range(50, 80))        # 30 tokens: 7 full blocks of 4 are reusable
    token_llm.generate([prompt], greedy(2))
    again = token_llm.generate([prompt], greedy(2))[0]
    assert again.num_cached_tokens == 28


# ---- abort ----------------------------------------------------------------------------------------
def test_abort_mid_generation_frees_every_block(token_llm):
    engine: LLMEngine = token_llm.engine
    engine.add_request("long", TOKEN_PROMPT, greedy(40, ignore_eos=True))
    engine.add_request("forked", TOKEN_PROMPT[:3], SamplingParams(n=3, max_tokens=40, ignore_eos=True))
    engine.add_request("queued", list(range(100, 130)), greedy(10))
    max_num_seqs, engine.scheduler.max_num_seqs = engine.scheduler.max_num_seqs, 4
    try:                                    # "queued" cannot start while the 4 others run
        for _ in range(3):
            engine.step()
    finally:
        engine.scheduler.max_num_seqs = max_num_seqs
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert [s.request_id for s in engine.scheduler.waiting] == ["queued"]

    for request_id in ("long", "forked", "queued"):
        engine.abort_request(request_id)
    engine.abort_request("long")            # idempotent
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {"long", "forked", "queued"}
    assert all(o.finished for o in outputs)
    assert {c.finish_reason for o in outputs for c in o.outputs} == {"abort"}
    assert len(next(o for o in outputs if o.request_id == "forked").outputs) == 3
    assert_pool_free(engine)


def test_an_invalid_prompt_in_a_batch_leaves_nothing_behind(token_model_path):
    llm = LLM(str(token_model_path), **TINY_ENGINE)       # its own engine: this one is left dirty
    with pytest.raises(ValueError, match="context"):
        llm.generate([TOKEN_PROMPT, [5] * 70], greedy(4))
    assert not llm.engine.requests
    assert llm.generate([TOKEN_PROMPT], greedy(4))[0].outputs[0].finish_reason is not None
