"""The replica's aiohttp application: the front-door middleware around the routes of `routes.py`.

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

from replica.server.auth import check_api_key
from replica.server.config import ServerConfig
from replica.server.errors import APIError, error_response
from replica.server.openapi import build_openapi
from replica.server.routes import OPEN_PATHS, add_routes
from replica.server.serving import REPLICA, Replica
from replica.server.streaming import DISCONNECTED
from replica.server.utility_api import OPENAPI

log = logging.getLogger("replica.server")

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


# ---- the app -----------------------------------------------------------------------------

def build_app(engine, config: ServerConfig) -> web.Application:
    """The app around a loaded (not yet started) engine; starting the app starts the engine."""
    replica = Replica(engine, config)

    app = web.Application(middlewares=[front_door], client_max_size=config.max_body_bytes)
    app[REPLICA] = replica
    app[OPENAPI] = build_openapi(config, replica.served_model_name)
    add_routes(app)

    async def start_engine(app: web.Application) -> None:
        engine.start()
        replica.lifecycle.mark_ready()

    async def stop_engine(app: web.Application) -> None:
        await engine.shutdown()
        replica.close()

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app
