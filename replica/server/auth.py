"""API keys: `Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>`.

Keys are compared in constant time against every configured key, so neither the position of
the first wrong byte nor which key matched shows in the response time. The operator routes
(`is_open` in `routes.py`) stay open so that the fleet and Prometheus need no secret: the app
does not call `check_api_key` for them.
"""
import hmac

from aiohttp import web

from replica.server.errors import APIError


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def is_authorized(presented: str | None, api_keys: tuple[str, ...]) -> bool:
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in api_keys:                       # no early exit: constant work per key
        matched |= hmac.compare_digest(given, key.encode("utf-8"))
    return matched


def check_api_key(request: web.Request, api_keys: tuple[str, ...]) -> None:
    """Raises a 401 unless keys are off or the request carries a key."""
    if not api_keys:
        return
    presented = _presented_key(request)
    if not is_authorized(presented, api_keys):
        message = "missing API key" if presented is None else "invalid API key"
        raise APIError(401, f"{message}: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
