"""Streamed responses: Server-Sent Events for OpenAI routes, NDJSON for Ollama routes.

    async with EventStream(request) as stream:      # headers go out here
        await stream.send({...})                      # one event / one line
    # normal exit: `data: [DONE]` (SSE) and the end of the body

Once headers are out, a failure can no longer change the status: it becomes a last error event
(`{"error": {...}}` for SSE, Ollama's `{"error": "..."}` line for NDJSON), as vLLM and Ollama
do. A client that went away shows up as `ConnectionResetError` on write; the stream ends
quietly, and leaving the caller's loop closes the engine stream, which aborts the request.
Headers turn off proxy buffering (NGINX honours `X-Accel-Buffering: no`).
"""
import json
import logging

from aiohttp import web

from replica.server.errors import APIError, openai_error_body

log = logging.getLogger("replica.server")

DISCONNECTED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class EventStream:
    def __init__(self, request: web.Request, ndjson: bool = False) -> None:
        self._request = request
        self._ndjson = ndjson
        content_type = "application/x-ndjson" if ndjson else "text/event-stream"
        self.response = web.StreamResponse(headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })

    async def __aenter__(self) -> "EventStream":
        await self.response.prepare(self._request)
        return self

    async def send(self, obj) -> None:
        if self._ndjson:
            await self.response.write(dumps(obj) + b"\n")
        else:
            await self.response.write(b"data: " + dumps(obj) + b"\n\n")

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False                  # cancellation and exits propagate
        try:
            if exc is not None and not isinstance(exc, DISCONNECTED):
                if not isinstance(exc, APIError):
                    log.error("stream failed on %s", self._request.path, exc_info=exc)
                    exc = APIError(500, "internal server error")
                await self.send({"error": exc.message} if self._ndjson else openai_error_body(exc))
            if exc is None or not isinstance(exc, DISCONNECTED):
                if not self._ndjson:
                    await self.response.write(b"data: [DONE]\n\n")
                await self.response.write_eof()
        except DISCONNECTED:
            pass
        return True
