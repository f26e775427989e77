"""What every route shares: the served model, tokenisation off the event loop, admission
checks, and one generation stream that records metrics and aborts on exit.

Invariant: a request is admitted (counted by the lifecycle) before it reaches the engine, and
leaving `generate` in any way (finished, client gone, handler cancelled) leaves the engine with
no trace of it: `engine.generate` aborts the request and frees its blocks when its iterator is
closed early.
"""
import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from replica.engine.async_engine import EngineDeadError, QueueFullError
from replica.models.ollama_store import same_model
from replica.outputs import RequestOutput
from replica.request_checks import (RequestError, check_context, check_num_samples,
                                    check_prompt_token_ids)
from replica.sampling_params import SamplingParams
from replica.server.config import ServerConfig
from replica.server.errors import APIError, bad_request, from_validation_error, model_not_found
from replica.server.lifecycle import Lifecycle
from replica.server.metrics import ServerMetrics
from replica.server.model_info import describe_model
from replica.server.ollama_store_api import store_defaults
from replica.server.tools import ToolCalling

M = TypeVar("M", bound=BaseModel)


@contextmanager
def request_errors_as_400():
    """The shared request checks (`replica.request_checks`) answer 400 naming their field."""
    try:
        yield
    except RequestError as err:
        raise bad_request(str(err), err.param) from None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def read_body(request: web.Request, model: type[M]) -> M:
    """The request body validated as `model`; 400 naming the field, 413 over the size limit
    (aiohttp enforces `client_max_size` while reading)."""
    raw = await request.read()
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise from_validation_error(err) from None


class Replica:
    """The served model and the server's view of the engine; one per app."""

    def __init__(self, engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.served_model_name = config.served_model_name or engine.model_name
        self.metrics = ServerMetrics(engine, self.served_model_name)
        self.lifecycle = Lifecycle()
        self.created_s = int(time.time())
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        vocab_sizes = [engine.model_config.vocab_size]
        if self.tokenizer is not None:
            vocab_sizes.append(self.tokenizer.vocab_size)
        self.vocab_size = min(vocab_sizes)
        self.device = engine.device
        self.store = store_defaults(engine.config.model, self.served_model_name)     # Ollama's store: digest, defaults
        self.model_info = describe_model(
            engine.config.model, engine.model_path, engine.model_config, self.max_model_len,
            engine.dtype.removeprefix("torch."), self.store.model)
        self.weights_name = self.model_info.weights_name
        # the weights as held on the device (quantised or not), from the engine core's handshake
        self.model_info.model_info["pagefleet.weights_device_bytes"] = engine.weights_device_bytes
        self.model_info.model_info["pagefleet.quantization"] = engine.quantization or "none"
        self.model_info.model_info["pagefleet.kv_cache_dtype"] = engine.kv_cache_dtype
        self.chat_template = (self.tokenizer.hf.chat_template
                              if self.tokenizer is not None and self.tokenizer.has_chat_template else None)
        self.tools = ToolCalling(self.chat_template, config.tool_call_parser)
        # One worker: the HF tokenizer is not safe for concurrent encodes, and long prompts
        # must not hold the event loop.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # ---- model names --------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """None means the served model; Ollama's spellings of it (`name:latest`,
        `library/name`) match too."""
        if name is None or name == self.served_model_name:
            return
        if not same_model(name, self.served_model_name):
            raise model_not_found(self.served_model_name)

    # ---- tokenisation -------------------------------------------------------------------
    def _require_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise bad_request(f"{param}: this model has no tokenizer; send the prompt as token ids",
                              param)
        return self.tokenizer

    async def _run_tokenizer(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._require_tokenizer(param)
        try:
            return await self._run_tokenizer(tokenizer.encode, text, add_special_tokens)
        except Exception:
            raise bad_request(f"{param}: the text could not be tokenized", param) from None

    async def encode_chat(self, messages: list[dict], param: str = "messages",
                          add_generation_prompt: bool = True, tools: list[dict] | None = None
                          ) -> list[int]:
        """tools: OpenAI-shaped tool dicts for a template that renders them (see tools.py)."""
        tokenizer = self._require_tokenizer(param)
        if not tokenizer.has_chat_template:
            why = getattr(tokenizer, "chat_template_problem", None)   # e.g. an unknown Ollama template
            raise bad_request(f"{param}: {why}" if why else
                              f"{param}: this model has no chat template; use the completions API", param)
        try:
            extra = {"tools": tools} if tools else {}
            return await self._run_tokenizer(tokenizer.apply_chat_template, messages,
                                             add_generation_prompt=add_generation_prompt, **extra)
        except Exception:      # templates raise their own errors (e.g. role order rules)
            raise bad_request(f"{param}: the model's chat template rejected these messages "
                              "(check the roles and their order)", param) from None

    def decode(self, token_ids: list[int], param: str = "tokens") -> str:
        self.check_token_ids(token_ids, param)
        return self._require_tokenizer(param).decode(token_ids)

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id: int) -> str:
        """How one token reads on its own, for logprobs (special tokens included)."""
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        with request_errors_as_400():
            check_prompt_token_ids(token_ids, self.vocab_size, param)

    # ---- admission ----------------------------------------------------------------------
    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None,
                           param: str = "max_tokens") -> int:
        """None → the rest of the context. Prompt + max_tokens must fit in the context."""
        with request_errors_as_400():
            check_context(num_prompt_tokens, max_tokens, self.max_model_len, param)
        return self.max_model_len - num_prompt_tokens if max_tokens is None else max_tokens

    def check_n(self, n: int) -> None:
        with request_errors_as_400():
            check_num_samples(n, self.config.max_n, "this server's --max-n")

    @staticmethod
    def sampling_params(**kwargs) -> SamplingParams:
        """Unset (None) fields keep SamplingParams' defaults; its errors name the field."""
        with request_errors_as_400():
            return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})

    # ---- generation ---------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's stream of outputs for one request, observed by the metrics; the
        engine's refusals become API errors (503 queue full or engine dead, 400 invalid)."""
        try:
            async for out in self._observed(request_id, prompt_ids, params):
                yield out
        except QueueFullError:
            raise APIError(503, f"the waiting queue is full ({self.engine.config.max_num_waiting} "
                           "requests): retry later", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except EngineDeadError:
            raise APIError(503, "the engine is not running", code="engine_dead") from None
        except RequestError as err:    # the engine's validation, worded as the server's
            raise bad_request(str(err), err.param) from None
        except ValueError as err:
            raise bad_request(str(err)) from None

    async def _observed(self, request_id: str, prompt_ids: list[int],
                        params: SamplingParams) -> AsyncIterator[RequestOutput]:
        metrics = self.metrics
        prev_token_s: float | None = None
        # aclosing: leaving this loop early must close the engine's iterator now (which aborts
        # the request and frees its blocks), not whenever the garbage collector gets to it.
        async with aclosing(self.engine.generate(request_id, prompt_ids, params)) as outputs:
            async for out in outputs:
                num_new = max((len(o.new_token_ids) for o in out.outputs), default=0)
                metrics.observe_tokens(prev_token_s, out.metrics, num_new)
                if num_new:
                    prev_token_s = out.metrics.last_token_s
                if out.finished:
                    reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
                    metrics.observe_finished(out.metrics, reasons)
                yield out

    async def generate_many(self, prompts: list[list[int]], params: SamplingParams,
                            request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several prompts as concurrent engine requests; yields (prompt index, output)."""
        if len(prompts) == 1:
            async with aclosing(self.generate(request_id, prompts[0], params)) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async for out in self.generate(f"{request_id}-{i}", ids, params):
                    queue.put_nowait((i, out))
            except Exception as err:        # handed to the consumer, which re-raises it
                queue.put_nowait((i, err))
            else:
                queue.put_nowait((i, done))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        try:
            num_open = len(tasks)
            while num_open:
                i, out = await queue.get()
                if out is done:
                    num_open -= 1
                    continue
                if isinstance(out, Exception):
                    raise out
                yield i, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


REPLICA = web.AppKey("replica", Replica)


async def started(outputs: AsyncIterator) -> AsyncIterator:
    """`outputs` with its first item already fetched.

    Streaming handlers call this before sending headers, so that a refusal at admission (queue
    full, invalid request, engine dead) still becomes a status code rather than an error event
    inside a 200 stream.
    """
    try:
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise

    async def chained():
        async with aclosing(outputs):
            yield first
            async for item in outputs:
                yield item

    return chained()
