"""AsyncEngine: streaming from the engine core process, abort when the consumer leaves early, concurrent
requests, and validation errors raised to the caller.

The tests share one engine (one core process: starting one takes seconds on 2 cores) on an event
loop of its own thread; each test submits its body to that loop and leaves the engine idle, its
KV pool all free. One config serves them all: a context of 1024 tokens leaves a stream without
max_tokens far more tokens than arrive before its consumer leaves or aborts it, and a step budget
of 16 tokens splits the concurrent prompts' prefills over several steps (chunked prefill).
"""
import asyncio
import threading
import time

import pytest

from replica.config import EngineConfig
from replica.engine.async_engine import AsyncEngine
from replica.sampling_params import SamplingParams

from .conftest import TINY_ENGINE

PROMPTS = [[5, 17, 99], [240, 31, 7, 300, 8, 9, 10], [1] * 12, [400, 401], [33] * 20, [77]]
SHARED_ENGINE = TINY_ENGINE | dict(block_size=16, num_kv_blocks=64, max_model_len=1024, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def run_with_engine(token_model_path):
    """`run_with_engine(body)` runs `body(engine)` on the shared engine's loop and returns its result."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="engine-loop", daemon=True)
    thread.start()

    def run(coroutine, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout_s)

    async def start() -> AsyncEngine:
        engine = AsyncEngine(EngineConfig(model=str(token_model_path), **SHARED_ENGINE))
        engine.start()
        return engine
    engine = run(start())
    try:
        yield lambda body: run(body(engine))
    finally:
        run(engine.shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def wait_until_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats()
        if (stats.num_running == stats.num_waiting == 0 and stats.num_blocks_free == stats.num_blocks_total
                and engine.num_unfinished == 0):
            return
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        await asyncio.sleep(0.01)


def test_leaving_the_stream_early_aborts_the_request_and_frees_its_blocks(run_with_engine):
    async def body(engine: AsyncEngine):
        # up to ~1000 tokens: far more than arrive before the consumer leaves
        params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        num_generated_before = engine.stats().num_generation_tokens
        received = []
        async for out in engine.generate("leaver", [5, 17, 99], params):
            received += out.outputs[0].new_token_ids
            assert not out.finished
            if len(received) >= 3:
                assert engine.stats().num_blocks_free < engine.stats().num_blocks_total
                break
        await wait_until_idle(engine)
        assert engine.num_unfinished == 0
        num_generated = engine.stats().num_generation_tokens - num_generated_before
        assert num_generated < 1000 - 3, "aborted, not finished"
        assert engine.is_alive

    run_with_engine(body)


def test_concurrent_requests_all_finish_with_the_offline_answers(run_with_engine, token_llm):
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

    assert run_with_engine(body) == expected


def test_a_prompt_longer_than_the_context_raises_value_error(run_with_engine):
    async def body(engine: AsyncEngine):
        too_long = [5] * (engine.max_model_len + 1)
        with pytest.raises(ValueError, match="context"):
            async for _ in engine.generate("bad", too_long, SamplingParams()):
                pass
        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in engine.generate("bad", [5] * (engine.max_model_len - 4), SamplingParams(max_tokens=10)):
                pass
        # the engine keeps serving
        outs = [out async for out in engine.generate("good", [5, 6], SamplingParams(max_tokens=2))]
        assert outs[-1].finished
        await wait_until_idle(engine)

    run_with_engine(body)


def test_abort_ends_the_stream_with_finish_reason_abort(run_with_engine):
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

    run_with_engine(body)
