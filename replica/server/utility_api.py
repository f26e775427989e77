"""Operator and utility routes: /health, /ready, /metrics, /tokenize, /detokenize, /openapi.json."""
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from replica.server.messages import openai_messages
from replica.server.protocol import DetokenizeRequest, TokenizeRequest
from replica.server.serving import REPLICA, read_body

OPENAPI = web.AppKey("openapi", dict)


async def health(request: web.Request) -> web.Response:
    if request.app[REPLICA].engine.is_alive:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "engine dead"}, status=503)


async def ready(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    if not replica.engine.is_alive:
        return web.json_response({"status": "engine dead"}, status=503)
    if replica.lifecycle.is_draining:
        return web.json_response({"status": "draining"}, status=503)
    if not replica.lifecycle.is_ready:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[REPLICA].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokenize(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    body = await read_body(request, TokenizeRequest)
    replica.check_model(body.model)
    if body.messages is not None:
        messages = replica.tools.template_messages(openai_messages(body.messages), None)
        ids = await replica.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
    else:
        ids = await replica.encode(body.prompt, "prompt", body.add_special_tokens)
    return web.json_response({"count": len(ids), "max_model_len": replica.max_model_len,
                              "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    body = await read_body(request, DetokenizeRequest)
    replica.check_model(body.model)
    return web.json_response({"prompt": replica.decode(body.tokens)})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
