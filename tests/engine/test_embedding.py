"""Embeddings: pooled final hidden states, normalised, equal to transformers' last hidden state
pooled the same way; batching changes nothing; the KV pool is never touched."""
import asyncio

import pytest
import torch
import torch.nn.functional as F

from replica.config import EngineConfig
from replica.engine.async_engine import AsyncEngine
from replica.engine.embedding import pack
from replica.sampling_params import SamplingParams
from tests.engine.conftest import TINY_ENGINE, assert_pool_free
from tests.tiny_models import load_hf_model

INPUTS = [[5, 6, 7], [9] * 11, [3], list(range(10, 40))]


@pytest.fixture(scope="module")
def hf(token_model_path):
    return load_hf_model(token_model_path)


def _reference(hf, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]     # after the final norm
    pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_equal_transformers_pooled_hidden_state(token_llm, hf, pooling):
    vectors = token_llm.engine.embed(INPUTS, pooling)
    assert len(vectors) == len(INPUTS)
    for ids, vector in zip(INPUTS, vectors):
        got = torch.tensor(vector)
        assert abs(got.norm().item() - 1.0) < 1e-5
        torch.testing.assert_close(got, _reference(hf, ids, pooling), atol=1e-4, rtol=1e-4)
    assert_pool_free(token_llm.engine)


def test_batching_does_not_change_vectors_and_keeps_input_order(token_llm):
    together = token_llm.engine.embed(INPUTS, "mean")
    alone = [token_llm.engine.embed([ids], "mean")[0] for ids in INPUTS]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert list(pack([3, 11, 1, 30], 14)) == [[0, 1], [2], [3]]       # 30 > 14 runs alone


def test_embedding_between_steps_leaves_running_requests_alone(token_llm):
    engine = token_llm.engine
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = token_llm.generate([[7, 8, 9, 10, 11]], params)[0].outputs[0].token_ids
    engine.add_request("interleaved", [7, 8, 9, 10, 11], params)
    tokens = []
    while engine.has_unfinished:
        engine.embed(INPUTS)
        for out in engine.step():
            tokens += out.outputs[0].new_token_ids
    assert tokens == expected
    assert_pool_free(engine)


def test_bad_inputs_are_refused_by_name(token_llm):
    with pytest.raises(ValueError, match="at least one token"):
        token_llm.engine.embed([[]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        token_llm.engine.embed([[600]])
    with pytest.raises(ValueError, match="context is 64 tokens"):
        token_llm.engine.embed([[5] * 65])
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        token_llm.engine.embed([[5]], "cls")


def test_async_engine_embeds_in_the_core_process_as_the_engine_does(token_model_path, token_llm):
    async def run():
        engine = AsyncEngine(EngineConfig(model=str(token_model_path), **TINY_ENGINE))
        engine.start()
        try:
            vectors = await engine.embed(INPUTS[:2], "last")
            with pytest.raises(ValueError, match="at least one token"):
                await engine.embed([[]])
            return vectors
        finally:
            await engine.shutdown()

    vectors = asyncio.run(run())
    direct = token_llm.engine.embed(INPUTS[:2], "last")
    assert len(vectors) == len(direct)
    for got, want in zip(vectors, direct):
        assert got == pytest.approx(want, abs=1e-6)
