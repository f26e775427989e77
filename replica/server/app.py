"""The replica's aiohttp application: routes, the front-door middleware, operator endpoints.

Every request passes one middleware, in this order:
  count (pagefleet_http_requests_total{route,status}) → errors (no exception leaves as a trace)
  → auth (401) → draining / engine dead (503) → body size (413) → handler.
Operator routes (/health, /ready, /metrics) skip auth and the drain gate: the fleet must be
able to watch a replica that refuses work.
"""
import logging
import time
from contextlib import nullcontext

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from replica.server import embeddings, ollama_api, ollama_store_api, openai_api
from replica.server.auth import OPEN_PATHS, check_api_key
from replica.server.config import ServerConfig
from replica.server.errors import APIError, error_response
from replica.server.openapi import build_openapi
from replica.server.protocol import DetokenizeRequest, TokenizeRequest
from replica.server.serving import REPLICA, Replica, read_body
from replica.server.streaming import DISCONNECTED

log = logging.getLogger("replica.server")

OPENAPI = web.AppKey("openapi", dict)
CLIENT_CLOSED = 499          # NGINX's status for a client that went away before the answer


def _route_label(request: web.Request) -> str:
    """The route's template (bounded label values), not the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _http_error(exc: web.HTTPException, config: ServerConfig) -> APIError:
    if exc.status == 413:
        return APIError(413, f"request body is over the limit of {config.max_body_bytes} bytes",
                        code="request_too_large")
    if exc.status == 404:
        return APIError(404, "no such route", code="not_found")
    if exc.status == 405:
        return APIError(405, "method not allowed on this route", code="method_not_allowed",
                        headers={"Allow": exc.headers.get("Allow", "")})
    return APIError(exc.status, exc.reason or "request failed")


@web.middleware
async def front_door(request: web.Request, handler) -> web.StreamResponse:
    replica = request.app[REPLICA]
    request["start_s"] = time.monotonic()
    status = CLIENT_CLOSED
    try:
        try:
            response = await _guarded(request, handler, replica)
        except APIError as err:
            response = error_response(err, request.path)
        except web.HTTPException as exc:
            response = error_response(_http_error(exc, replica.config), request.path)
        except DISCONNECTED:
            return web.Response(status=CLIENT_CLOSED)     # nobody is left to read it
        except Exception:          # a bug: logged here in full, answered without details
            log.exception("unhandled error on %s %s", request.method, _route_label(request))
            response = error_response(APIError(500, "internal server error"), request.path)
        status = response.status
        return response
    finally:
        replica.metrics.count_http(_route_label(request), status)


async def _guarded(request: web.Request, handler, replica: Replica) -> web.StreamResponse:
    config = replica.config
    if request.path in OPEN_PATHS:
        return await handler(request)
    check_api_key(request, config.api_keys)
    if replica.lifecycle.is_draining:
        raise APIError(503, "this replica is draining: send the request to another replica",
                       code="draining", headers={"Connection": "close"})
    if not replica.engine.is_alive:
        raise APIError(503, "the engine is not running", code="engine_dead")
    if request.content_length is not None and request.content_length > config.max_body_bytes:
        raise APIError(413, f"request body is over the limit of {config.max_body_bytes} bytes",
                       code="request_too_large")
    is_work = request.method == "POST"
    with replica.lifecycle.track() if is_work else nullcontext():
        return await handler(request)


# ---- operator and utility routes ---------------------------------------------------------

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
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
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


# ---- the app -----------------------------------------------------------------------------

def build_app(engine, config: ServerConfig) -> web.Application:
    """The app around a loaded (not yet started) engine; starting the app starts the engine."""
    replica = Replica(engine, config)

    app = web.Application(middlewares=[front_door], client_max_size=config.max_body_bytes)
    app[REPLICA] = replica
    app[OPENAPI] = build_openapi(config, replica.served_model_name)
    app.router.add_post("/v1/completions", openai_api.create_completion)
    app.router.add_post("/v1/chat/completions", openai_api.create_chat_completion)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_post("/api/generate", ollama_api.generate)
    app.router.add_post("/api/chat", ollama_api.chat)
    app.router.add_get("/api/tags", ollama_api.tags)
    app.router.add_post("/api/show", ollama_api.show)
    app.router.add_get("/api/ps", ollama_api.ps)
    app.router.add_get("/api/version", ollama_api.version)
    embeddings.add_routes(app)              # /api/embed, /api/embeddings, /v1/embeddings
    ollama_store_api.add_routes(app)        # /api/pull, push, create, copy, delete: 501
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)

    async def start_engine(app: web.Application) -> None:
        engine.start()
        replica.lifecycle.mark_ready()

    async def stop_engine(app: web.Application) -> None:
        await engine.shutdown()
        replica.close()

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app
