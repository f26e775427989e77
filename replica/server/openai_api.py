"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models and
/v1/models/{model}.

Shapes follow OpenAI's: ids `cmpl-…` / `chatcmpl-…`, one choice per (prompt, sample) with
`index = prompt_index * n + sample_index`, usage counting each prompt once and every sampled
token, SSE chunks ending with `data: [DONE]`. With `stream_options.include_usage` every chunk
carries `"usage": null` and one last chunk with no choices carries the totals.
"""
import json
import time
from contextlib import aclosing

from aiohttp import web

from replica.outputs import Completion, RequestOutput
from replica.server import structured
from replica.server.errors import bad_request
from replica.server.logprobs import completion_logprobs, logprob_items
from replica.server.messages import openai_messages
from replica.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from replica.server.serving import REPLICA, Replica, new_request_id, read_body, started
from replica.server.streaming import EventStream
from replica.server.tool_parsers import ToolCall
from replica.server.tools import ToolCallStream, ToolPlan, new_call_id

COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for the legacy completions API


def _stop_list(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def _sampling_params(replica: Replica, body: SamplingFields, max_tokens: int, logprobs: int | None,
                     structured_output=None, skip_special_tokens: bool | None = None):
    return replica.sampling_params(
        structured_output=structured_output, skip_special_tokens=skip_special_tokens,
        n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, min_p=body.min_p, seed=body.seed, stop=_stop_list(body.stop),
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens)


async def _gather(outputs, n: int) -> tuple["_Usage", dict[int, Completion]]:
    """A non-streaming response's samples: choice index = prompt index * n + sample index."""
    usage, samples = _Usage(), {}
    async with aclosing(outputs):
        async for i, out in outputs:
            usage.add(i, out)
            for o in out.outputs:
                index = i * n + o.index
                samples.setdefault(index, Completion(index)).add(o)
    return usage, samples


class _Usage:
    """Prompt tokens per prompt (counted once whatever n is) and sampled tokens per choice."""

    def __init__(self) -> None:
        self.prompt: dict[int, tuple[int, int]] = {}     # prompt index → (tokens, cached)
        self.num_completion_tokens = 0

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.prompt[prompt_index] = (out.num_prompt_tokens, out.num_cached_tokens)
        self.num_completion_tokens += sum(len(o.new_token_ids) for o in out.outputs)

    def as_dict(self) -> dict:
        num_prompt = sum(p for p, _ in self.prompt.values())
        num_cached = sum(c for _, c in self.prompt.values())
        return {"prompt_tokens": num_prompt, "completion_tokens": self.num_completion_tokens,
                "total_tokens": num_prompt + self.num_completion_tokens,
                "prompt_tokens_details": {"cached_tokens": num_cached}}


# ---- /v1/completions ---------------------------------------------------------------------

async def _completion_prompts(replica: Replica, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [await replica.encode(prompt, "prompt")]
    elif prompt and isinstance(prompt[0], str):
        prompts = [await replica.encode(p, "prompt") for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = prompt
    for ids in prompts:
        replica.check_token_ids(ids, "prompt")
    return prompts


async def create_completion(request: web.Request) -> web.StreamResponse:
    replica: Replica = request.app[REPLICA]
    body = replica.store.with_openai_defaults(await read_body(request, CompletionRequest))
    replica.check_model(body.model)
    replica.check_n(body.n)
    prompts = await _completion_prompts(replica, body.prompt)
    if body.max_tokens is None:
        rooms = [replica.resolve_max_tokens(len(ids), None) for ids in prompts]
        max_tokens = min([COMPLETIONS_DEFAULT_MAX_TOKENS, *rooms])
    else:
        max_tokens = body.max_tokens
        for ids in prompts:
            replica.resolve_max_tokens(len(ids), max_tokens)
    params = _sampling_params(replica, body, max_tokens, body.logprobs, structured.from_openai(body))
    request_id = new_request_id("cmpl")
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": replica.served_model_name}
    outputs = await started(replica.generate_many(prompts, params, request_id))
    if body.stream:
        return await _stream_completion(request, replica, body, head, outputs)

    usage, samples = await _gather(outputs, body.n)
    choices = []
    for index in sorted(samples):
        s = samples[index]
        logprobs = (completion_logprobs(replica.token_text, s.logprobs, 0)
                    if body.logprobs is not None else None)
        choices.append({"index": index, "text": s.text, "logprobs": logprobs,
                        "finish_reason": s.finish_reason, "stop_reason": s.stop_reason})
    return web.json_response({**head, "choices": choices, "usage": usage.as_dict()})


async def _stream_completion(request, replica, body, head, outputs) -> web.StreamResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    each_usage = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    usage = _Usage()
    text_offsets: dict[int, int] = {}
    async with EventStream(request) as stream, aclosing(outputs):
        async for i, out in outputs:
            usage.add(i, out)
            for o in out.outputs:
                index = i * body.n + o.index
                if not (o.new_text or o.new_token_ids or o.finish_reason):
                    continue
                logprobs = None
                if body.logprobs is not None and o.new_logprobs:
                    offset = text_offsets.get(index, 0)
                    logprobs = completion_logprobs(replica.token_text, o.new_logprobs, offset)
                    text_offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
                chunk = {**head, "choices": [{
                    "index": index, "text": o.new_text, "logprobs": logprobs,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}]}
                if include_usage:
                    chunk["usage"] = usage.as_dict() if each_usage else None
                await stream.send(chunk)
        if include_usage:
            await stream.send({**head, "choices": [], "usage": usage.as_dict()})
    return stream.response


# ---- /v1/chat/completions ----------------------------------------------------------------

def _tool_plan(replica: Replica, body: ChatCompletionRequest) -> ToolPlan | None:
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    return replica.tools.plan(functions, body.tool_choice_name, body.parallel_tool_calls is not False)


def _constraint(body: ChatCompletionRequest, plan: ToolPlan | None):
    spec = structured.from_openai(body)
    if plan is not None and plan.spec is not None:
        if spec is not None:
            raise bad_request("response_format: cannot be combined with tool_choice required or "
                              "a named function", "response_format")
        return plan.spec
    return spec


def _openai_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    replica: Replica = request.app[REPLICA]
    body = replica.store.with_openai_defaults(await read_body(request, ChatCompletionRequest))
    replica.check_model(body.model)
    replica.check_n(body.n)
    plan = _tool_plan(replica, body)
    spec = _constraint(body, plan)
    messages = replica.tools.template_messages(replica.store.with_system(openai_messages(body.messages)), plan)
    prompt_ids = await replica.encode_chat(messages, tools=plan.template_tools if plan else None)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = replica.resolve_max_tokens(len(prompt_ids), body.max_new_tokens, param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    is_parsing = plan is not None and plan.is_parsing
    # tool markers may be special tokens (Mistral's [TOOL_CALLS], Llama's <|python_tag|>)
    params = _sampling_params(replica, body, max_tokens, logprobs, spec,
                              skip_special_tokens=False if is_parsing else None)
    request_id = new_request_id("chatcmpl")
    created = int(time.time())
    outputs = await started(replica.generate_many([prompt_ids], params, request_id))
    if body.stream:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": replica.served_model_name}
        return await _stream_chat(request, replica, body, head, outputs, is_parsing)

    usage, samples = await _gather(outputs, body.n)     # one prompt: choice index = sample index
    choices = []
    for index in sorted(samples):
        s = samples[index]
        logprobs = ({"content": logprob_items(replica.token_text, s.logprobs or [])}
                    if body.logprobs else None)
        message, finish_reason = {"role": "assistant", "content": s.text}, s.finish_reason
        if is_parsing:
            content, calls = replica.tools.extract(s.text)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": _openai_calls(calls)}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choices.append({"index": index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason, "stop_reason": s.stop_reason})
    return web.json_response({"id": request_id, "object": "chat.completion", "created": created,
                              "model": replica.served_model_name, "choices": choices,
                              "usage": usage.as_dict()})


async def _stream_chat(request, replica, body, head, outputs, is_parsing: bool) -> web.StreamResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    each_usage = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    usage = _Usage()
    # tool calls: content goes out as it comes, calls when their sample finishes
    calls_streams = {i: ToolCallStream(replica.tools) for i in range(body.n)} if is_parsing else {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None):
        c = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason, "stop_reason": stop_reason}]}
        if include_usage:
            c["usage"] = usage.as_dict() if each_usage else None
        return c

    async with EventStream(request) as stream, aclosing(outputs):
        # OpenAI opens every choice with the role before any content.
        for index in range(body.n):
            await stream.send(chunk(index, {"role": "assistant", "content": ""}))
        async for i, out in outputs:
            usage.add(i, out)
            for o in out.outputs:
                logprobs = None
                if body.logprobs and o.new_logprobs:
                    logprobs = {"content": logprob_items(replica.token_text, o.new_logprobs)}
                text = calls_streams[o.index].feed(o.new_text) if is_parsing else o.new_text
                if text or logprobs:
                    await stream.send(chunk(o.index, {"content": text}, logprobs))
                if o.finish_reason is None:
                    continue
                finish_reason = o.finish_reason
                if is_parsing:
                    rest, calls = calls_streams[o.index].finish()
                    if rest:
                        await stream.send(chunk(o.index, {"content": rest}))
                    for k, call in enumerate(_openai_calls(calls)):
                        fn = call["function"]
                        await stream.send(chunk(o.index, {"tool_calls": [{
                            "index": k, "id": call["id"], "type": "function",
                            "function": {"name": fn["name"], "arguments": ""}}]}))
                        await stream.send(chunk(o.index, {"tool_calls": [{
                            "index": k, "function": {"arguments": fn["arguments"]}}]}))
                    if calls and finish_reason == "stop":
                        finish_reason = "tool_calls"
                await stream.send(chunk(o.index, {}, None, finish_reason, o.stop_reason))
        if include_usage:
            await stream.send({**head, "choices": [], "usage": usage.as_dict()})
    return stream.response


# ---- /v1/models --------------------------------------------------------------------------

async def list_models(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    return web.json_response({"object": "list", "data": [model_card(replica)]})


async def retrieve_model(request: web.Request) -> web.Response:
    """The served model by its name (the openai client's `models.retrieve`); any other name is
    the 404 that a request naming it gets. Names may hold slashes (`org/model`)."""
    replica: Replica = request.app[REPLICA]
    replica.check_model(request.match_info["model"])
    return web.json_response(model_card(replica))


def model_card(replica: Replica) -> dict:
    return {"id": replica.served_model_name, "object": "model", "created": replica.created_s,
            "owned_by": "pagefleet", "root": replica.weights_name,
            "max_model_len": replica.max_model_len}

