"""Ollama-compatible routes: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version.

As in Ollama: responses stream as NDJSON unless `"stream": false`; the last object has
`done: true`, `done_reason` and the counts and durations (nanoseconds); an empty prompt (or no
messages) only "loads" the model and answers `done_reason: "load"`; sampling defaults are
Ollama's (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1).
"""
import time
from contextlib import aclosing
from datetime import datetime, timedelta, timezone

from aiohttp import web

from replica.outputs import Completion, RequestOutput
from replica.server import structured
from replica.server.logprobs import logprob_items
from replica.server.messages import ollama_messages
from replica.server.ollama_protocol import (OllamaChatRequest, OllamaGenerateRequest,
                                            OllamaModelRequest, OllamaOptions)
from replica.server.serving import REPLICA, Replica, new_request_id, read_body, started
from replica.server.streaming import EventStream
from replica.server.tools import ToolCallStream

OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


def _sampling_params(replica: Replica, options: OllamaOptions | None, num_prompt_tokens: int,
                     logprobs: int | None, structured_output=None, skip_special_tokens=None):
    o = options or OllamaOptions()
    room = replica.resolve_max_tokens(num_prompt_tokens, None)
    # Ollama never refuses a long num_predict: it stops at the context's end ("length").
    max_tokens = room if o.num_predict is None or o.num_predict < 0 else min(o.num_predict, room)
    if o.num_predict == 0:
        max_tokens = 1          # Ollama's 0 answers at once; one token is the least we sample
    return replica.sampling_params(
        max_tokens=max_tokens,
        temperature=o.temperature if o.temperature is not None else OLLAMA_DEFAULTS["temperature"],
        top_k=o.top_k if o.top_k is not None else OLLAMA_DEFAULTS["top_k"],
        top_p=o.top_p if o.top_p is not None else OLLAMA_DEFAULTS["top_p"],
        min_p=o.min_p, seed=o.seed, stop=o.stop,
        repetition_penalty=(o.repeat_penalty if o.repeat_penalty is not None
                            else OLLAMA_DEFAULTS["repetition_penalty"]),
        presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
        logprobs=logprobs, structured_output=structured_output,
        skip_special_tokens=skip_special_tokens)


def _final_stats(out: RequestOutput, start_s: float, num_output_tokens: int) -> dict:
    m = out.metrics
    first_token_s = m.first_token_s or m.finished_s or time.monotonic()
    last_token_s = m.last_token_s or first_token_s
    return {
        "total_duration": _ns(time.monotonic() - start_s),
        "load_duration": _ns(m.arrival_s - start_s),     # weights are loaded at start-up
        "prompt_eval_count": out.num_prompt_tokens,
        "prompt_eval_duration": _ns(first_token_s - (m.first_scheduled_s or m.arrival_s)),
        "eval_count": num_output_tokens,
        "eval_duration": _ns(last_token_s - first_token_s),
    }


async def _respond(request: web.Request, replica: Replica, *, stream: bool, prompt_ids: list[int],
                   params, shape, final_extra=None, is_parsing: bool = False) -> web.StreamResponse:
    """Runs one request; `shape(text, done, tool_calls=None)` builds the chat or the generate
    object; `is_parsing`: tool calls are looked for in the text (chat with tools)."""
    outputs = await started(replica.generate(new_request_id("ollama"), prompt_ids, params))
    want_logprobs = params.logprobs is not None
    token_ids: list[int] = []

    def final(last: RequestOutput, text: str, calls=None) -> dict:
        o = last.outputs[-1] if last.outputs else None
        body = {**shape(text, True, calls), "done_reason": (o.finish_reason if o else None) or "stop",
                **_final_stats(last, request["start_s"], len(token_ids))}
        if final_extra:
            body.update(final_extra(prompt_ids + token_ids))
        return body

    if not stream:
        sample, last = Completion(0), None
        async with aclosing(outputs):
            async for last in outputs:
                for o in last.outputs:
                    sample.add(o)
        token_ids.extend(sample.token_ids)
        content, calls = replica.tools.extract(sample.text) if is_parsing else (sample.text, [])
        body = final(last, content or "", _ollama_calls(calls))
        if want_logprobs:
            body["logprobs"] = logprob_items(replica.token_text, sample.logprobs or [])
        return web.json_response(body)

    calls_stream = ToolCallStream(replica.tools) if is_parsing else None
    async with EventStream(request, ndjson=True) as events, aclosing(outputs):
        async for last in outputs:
            for o in last.outputs:
                token_ids.extend(o.new_token_ids)
                items = logprob_items(replica.token_text, o.new_logprobs or []) if want_logprobs else None
                text = calls_stream.feed(o.new_text) if calls_stream else o.new_text
                if text or items:
                    await events.send({**shape(text, False),
                                       **({"logprobs": items} if want_logprobs else {})})
        if calls_stream is not None:
            rest, calls = calls_stream.finish()
            if rest or calls:       # Ollama sends the calls in a message of their own
                await events.send(shape(rest, False, _ollama_calls(calls)))
        await events.send(final(last, ""))
    return events.response


def _ollama_calls(calls) -> list[dict] | None:
    """Ollama's shape: arguments as an object, no ids."""
    return [{"function": {"index": k, "name": c.name, "arguments": c.arguments}}
            for k, c in enumerate(calls)] or None


async def generate(request: web.Request) -> web.StreamResponse:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, OllamaGenerateRequest)
    replica.check_model(body.model)
    name = replica.served_model_name

    def shape(text: str, done: bool, calls=None) -> dict:
        return {"model": name, "created_at": _now_rfc3339(), "response": text, "done": done}

    if not body.prompt and not body.context:     # Ollama's "load" (or, keep_alive 0, "unload")
        reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
        return web.json_response({**shape("", True), "done_reason": reason})
    if body.raw or not body.prompt:
        prompt_ids = await replica.encode(body.prompt or "", "prompt") if body.prompt else []
    elif replica.tokenizer is not None and replica.tokenizer.has_chat_template:
        system = body.system if body.system is not None else replica.store.system
        messages = ([{"role": "system", "content": system}] if system else [])
        prompt_ids = await replica.encode_chat(messages + [{"role": "user", "content": body.prompt}],
                                               "prompt")
    else:
        prompt_ids = await replica.encode(body.prompt, "prompt")
    if body.context:
        replica.check_token_ids(body.context, "context")
        prompt_ids = list(body.context) + prompt_ids
    params = _sampling_params(replica, replica.store.options_for(body.options), len(prompt_ids),
                              body.num_logprobs, structured.from_ollama(body.format))
    return await _respond(request, replica, stream=body.stream is not False, prompt_ids=prompt_ids,
                          params=params, shape=shape, final_extra=lambda ids: {"context": ids})


async def chat(request: web.Request) -> web.StreamResponse:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, OllamaChatRequest)
    replica.check_model(body.model)
    name = replica.served_model_name

    def shape(text: str, done: bool, calls=None) -> dict:
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"model": name, "created_at": _now_rfc3339(), "message": message, "done": done}

    if not body.messages:
        return web.json_response({**shape("", True), "done_reason": "load"})
    spec = structured.from_ollama(body.format)
    plan = replica.tools.plan([t.function.model_dump(exclude_none=True) for t in body.tools or []],
                              None, True)
    messages = replica.tools.template_messages(replica.store.with_system(ollama_messages(body.messages)),
                                               plan)
    prompt_ids = await replica.encode_chat(messages, tools=plan.template_tools if plan else None)
    is_parsing = plan is not None and spec is None
    params = _sampling_params(replica, replica.store.options_for(body.options), len(prompt_ids),
                              body.num_logprobs, spec, skip_special_tokens=False if is_parsing else None)
    return await _respond(request, replica, stream=body.stream is not False, prompt_ids=prompt_ids,
                          params=params, shape=shape, is_parsing=is_parsing)


# ---- model listing -----------------------------------------------------------------------

def _details(replica: Replica) -> dict:
    info = replica.model_info
    return {"parent_model": "", "format": info.format, "family": info.family,
            "families": [info.family], "parameter_size": info.parameter_size,
            "quantization_level": info.quantization_level}


def _entry(replica: Replica) -> dict:
    info = replica.model_info
    return {"name": replica.served_model_name, "model": replica.served_model_name,
            "modified_at": info.modified_at, "size": info.size_bytes, "digest": info.digest,
            "details": _details(replica)}


async def tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [_entry(request.app[REPLICA])]})


async def ps(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    # The model stays loaded for the life of the process: it never expires.
    expires_at = (datetime.now(timezone.utc) + timedelta(days=365 * 100)).isoformat()
    on_gpu = replica.device.startswith("cuda")
    return web.json_response({"models": [{
        **_entry(replica), "expires_at": expires_at.replace("+00:00", "Z"),
        "size_vram": replica.model_info.size_bytes if on_gpu else 0,
        "context_length": replica.max_model_len}]})


async def show(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, OllamaModelRequest)
    replica.check_model(body.model or body.name)
    info = replica.model_info
    store = replica.store
    template = store.model.template if store.model and store.model.template else ""
    if not template and replica.tokenizer is not None and replica.tokenizer.has_chat_template:
        template = replica.tokenizer.hf.chat_template
    parameters = store.parameters_text() or "\n".join(f"{k} {v}" for k, v in (
        ("temperature", OLLAMA_DEFAULTS["temperature"]), ("top_k", OLLAMA_DEFAULTS["top_k"]),
        ("top_p", OLLAMA_DEFAULTS["top_p"]), ("repeat_penalty", OLLAMA_DEFAULTS["repetition_penalty"]),
        ("num_ctx", replica.max_model_len)))
    return web.json_response({
        "modelfile": store.modelfile() or f"# served by pagefleet\nFROM {info.weights_name}\n",
        "parameters": parameters,
        "template": template,
        **({"system": store.system} if store.system else {}),
        **({"license": store.model.license} if store.model and store.model.license else {}),
        "details": _details(replica),
        "model_info": info.model_info,
        "capabilities": ["completion", *(["tools"] if replica.tools.knows_tools else [])],
        "modified_at": info.modified_at,
    })


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[REPLICA].config.version})
