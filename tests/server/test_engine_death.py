"""/health turns 503 once the engine loop has died, and requests get a clean 503.

In-process: a real AsyncEngine on a tiny model behind the real app. The only way to kill the engine
thread from a test is to make one of its steps fail, so the test replaces `LLMEngine.step` of this
one engine with a function that raises (what a CUDA error or a bug in a step would do).
"""
import asyncio

from aiohttp.test_utils import TestClient, TestServer

from replica.config import EngineConfig
from replica.engine.async_engine import AsyncEngine
from replica.server.app import build_app
from replica.server.config import ServerConfig
from tests.server.conftest import TINY_NAME


def test_health_is_503_after_the_engine_loop_dies(tiny_model):
    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tiny_model), max_model_len=256, num_kv_blocks=64))
        app = build_app(engine, ServerConfig(served_model_name=TINY_NAME))
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/health")).status == 200

            def broken_step():
                raise RuntimeError("simulated device failure")
            engine.engine.step = broken_step
            resp = await client.post("/v1/completions", json={"model": TINY_NAME, "prompt": [5, 6, 7],
                                                               "max_tokens": 4})
            body = await resp.json()
            assert resp.status == 503, body
            assert "simulated" not in str(body) and "Traceback" not in str(body)
            for _ in range(50):
                if (await client.get("/health")).status == 503:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/health")).status == 503
            assert (await client.get("/ready")).status == 503
            resp = await client.post("/v1/completions", json={"model": TINY_NAME, "prompt": [5], "max_tokens": 2})
            assert resp.status == 503
    asyncio.run(scenario())
