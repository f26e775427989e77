"""Errors as clients expect them, and the one place that turns exceptions into responses.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`. Ollama routes
(`/api/...`) answer Ollama's own `{"error": "message"}`, because apps written for Ollama read
`error` as a string. Messages name the field and the limit; they never carry stack traces,
file paths or the client's input back (a prompt may be large or private).
"""
from pydantic import ValidationError
from aiohttp import web

# Type names of OpenAI's error objects.
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error that becomes a response; `message` must be safe to show to the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or (INVALID_REQUEST if status < 500 else SERVER_ERROR)
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(served_name: str) -> APIError:
    return APIError(404, f"model not found: this replica serves '{served_name}'",
                    param="model", code="model_not_found")


def _loc_to_param(loc: tuple) -> str | None:
    """('messages', 0, 'content') → 'messages[0].content'; union branch tags are dropped."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and not any(c in part for c in "[]-(),") and part.isidentifier():
            param += f".{part}" if param else part
    return param or None


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, without the offending input value."""
    first = err.errors(include_url=False, include_input=False, include_context=False)[0]
    if first["type"] == "json_invalid":
        return bad_request("request body is not valid JSON (UTF-8 encoded)")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("request body must be a JSON object")
    param = _loc_to_param(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field (this server does not support it)"
    if first["type"] == "missing":
        message = "field required"
    return bad_request(f"{param}: {message}" if param else message, param)


def openai_error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param,
                      "code": err.code}}


def error_response(err: APIError, path: str) -> web.Response:
    body = {"error": err.message} if is_ollama_path(path) else openai_error_body(err)
    return web.json_response(body, status=err.status, headers=err.headers)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")
