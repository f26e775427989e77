"""AsyncEngine: streaming from the engine core process, abort when the consumer leaves early, concurrent
requests, and validation errors raised to the caller. Each test runs its own event loop.
"""
import asyncio
import time

import pytest

from replica.config import EngineConfig
from replica.engine.async_engine import AsyncEngine
from replica.sampling_params import SamplingParams

from .conftest import TINY_ENGINE

PROMPTS = [[5, 17, 99], [240, 31, 7, 300, 8, 9, 10], [1] * 12, [400, 401], [33] * 20, [77]]


def run_with_engine(model_path, body, **config):
    """Starts an AsyncEngine inside a fresh event loop, runs `body(engine)`, always shuts it down."""
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(model_path), **(TINY_ENGINE | config)))
        engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def wait_until_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if (stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total
                and engine.num_unfinished == 0):
            return
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        await asyncio.sleep(0.01)


def test_leaving_the_stream_early_aborts_the_request_and_frees_its_blocks(token_model_path):
    async def body(engine: AsyncEngine):
        # up to ~1000 tokens: far more than arrive before the consumer leaves
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        received = []
        async for out in engine.generate("leaver", [5, 17, 99], params):
            received += out.outputs[0].new_token_ids
            assert not out.finished
            if len(received) >= 3:
                assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
                break
        await wait_until_idle(engine)
        assert engine.num_unfinished == 0
        assert engine.stats().num_generation_tokens < 1000 - 3, "aborted, not finished"
        assert engine.is_alive

    run_with_engine(token_model_path, body, block_size=16, num_kv_blocks=64, max_model_len=1024)


def test_concurrent_requests_all_finish_with_the_offline_answers(token_model_path, token_llm):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in token_llm.generate(PROMPTS, params)]

    async def collect(engine: AsyncEngine, request_id: str, prompt: list[int]):
        tokens, finish_reasons = [], []
        async for out in engine.generate(request_id, prompt, params):
            tokens += out.outputs[0].new_token_ids
            finish_reasons.append(out.outputs[0].finish_reason)
            last = out
        assert last.finished and finish_reasons[-1] == "length"
        assert finish_reasons[:-1] == [None] * (len(finish_reasons) - 1)
        return tokens

    async def body(engine: AsyncEngine):
        got = await asyncio.gather(*(collect(engine, f"r{i}", p) for i, p in enumerate(PROMPTS)))
        await wait_until_idle(engine)
        return got

    assert run_with_engine(token_model_path, body, max_num_batched_tokens=16) == expected


def test_a_prompt_longer_than_the_context_raises_value_error(token_model_path):
    async def body(engine: AsyncEngine):
        too_long = [5] * (engine.max_model_len + 1)
        with pytest.raises(ValueError, match="context"):
            async for _ in engine.generate("bad", too_long, SamplingParams()):
                pass
        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in engine.generate("bad", [5] * 60, SamplingParams(max_tokens=10)):
                pass
        # the engine keeps serving
        outs = [out async for out in engine.generate("good", [5, 6], SamplingParams(max_tokens=2))]
        assert outs[-1].finished
        await wait_until_idle(engine)

    run_with_engine(token_model_path, body)


def test_abort_ends_the_stream_with_finish_reason_abort(token_model_path):
    async def body(engine: AsyncEngine):
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        outs = []
        async for out in engine.generate("stopped", [5, 17, 99], params):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("stopped")
                engine.abort("stopped")         # idempotent
        assert outs[-1].finished
        assert outs[-1].outputs[0].finish_reason == "abort"
        await wait_until_idle(engine)

    run_with_engine(token_model_path, body, block_size=16, num_kv_blocks=64, max_model_len=1024)
