"""The OpenAPI 3.1 document of the replica, generated from the pydantic bodies.

Built from `replica.server.routes.ROUTES`, the table the router is built from too.
"""
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from replica.server import ollama_protocol as ollama
from replica.server import protocol as openai
from replica.server.config import ServerConfig
from replica.server.routes import ROUTES, Route


_ERRORS = {"400": "invalid JSON or parameters", "401": "missing or wrong API key",
           "404": "unknown model", "413": "body over the size limit",
           "503": "waiting queue full (Retry-After) or draining"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(route: Route, has_keys: bool) -> dict:
    error_schema = ollama.OllamaError if route.path.startswith("/api/") else openai.ErrorResponse
    op: dict = {"summary": route.summary, "operationId": route.method + route.path.replace("/", "_")}
    if route.request is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(route.request)}}}
    ok: dict = {"description": "OK"}
    if route.response is not None:
        ok["content"] = {"application/json": {"schema": _ref(route.response)}}
        if route.stream_type == "text/event-stream":
            # OpenAPI 3.1: the schema of an event stream describes one event.
            ok["content"][route.stream_type] = {"schema": {
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": (
                    f"one {route.response.__name__} chunk as JSON (chat: `delta` in place of "
                    "`message`), then [DONE]")}}}}
        elif route.stream_type:
            ok["content"][route.stream_type] = {"schema": {
                **_ref(route.response), "description": "one such object a line (stream: true)"}}
    elif route.path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif route.path in ("/health", "/ready"):
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    responses = {"200": ok}
    for status, why in _ERRORS.items():
        if route.is_open and status != "503":
            continue
        if status == "401" and not has_keys:
            continue
        if route.request is None and status in ("400", "413"):
            continue
        responses[status] = {"description": why,
                             "content": {"application/json": {"schema": _ref(error_schema)}}}
    op["responses"] = responses
    if has_keys:
        op["security"] = [] if route.is_open else [{"bearer": []}]
    return op


def _pin_model_names(schemas: dict, served_name: str) -> None:
    """A replica accepts one model name (or Ollama's `name:latest`): say so in request bodies,
    so that clients and fuzzers see the only value that does not answer 404."""
    names = [served_name, f"{served_name}:latest"]
    for name, schema in schemas.items():
        props = schema.get("properties", {})
        for field in ("model", "name"):
            if field in props and name.endswith("Request"):
                nullable = any(alt.get("type") == "null" for alt in props[field].get("anyOf", []))
                pinned = {"type": "string", "enum": names}
                props[field] = ({"anyOf": [pinned, {"type": "null"}], "default": None}
                                if nullable else pinned)


def build_openapi(config: ServerConfig, served_name: str) -> dict:
    documented = [r for r in ROUTES if r.in_openapi]
    models = {m for r in documented for m in (r.request, r.response) if m is not None}
    models |= {openai.ErrorResponse, ollama.OllamaError}
    pairs = [(m, "validation" if m in {r.request for r in documented} else "serialization")
             for m in sorted(models, key=lambda m: m.__name__)]
    _, schema = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    schemas = schema.get("$defs", {})
    _pin_model_names(schemas, served_name)
    paths: dict = {}
    for route in documented:
        op = _operation(route, bool(config.api_keys))
        if "{model}" in route.path:
            op["parameters"] = [{"name": "model", "in": "path", "required": True,
                                 "schema": {"type": "string", "enum": [served_name, f"{served_name}:latest"]}}]
        paths.setdefault(route.path, {})[route.method] = op
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "pagefleet replica", "version": config.version,
                 "description": "OpenAI- and Ollama-compatible inference server of one replica."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if config.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
