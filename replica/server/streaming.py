"""Streamed responses: Server-Sent Events for OpenAI routes, NDJSON for Ollama routes.

Headers turn off proxy buffering (NGINX honours `X-Accel-Buffering: no`) so that every token
reaches the client as soon as it is written. A client that goes away shows up as
`ConnectionResetError` on write; callers let it end their loop, which closes the engine
stream and so aborts the request.
"""
import json

from aiohttp import web

DISCONNECTED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class EventStream:
    """`data: {...}\\n\\n` events ending with `data: [DONE]` (SSE), or one JSON object a line."""

    def __init__(self, request: web.Request, ndjson: bool = False) -> None:
        self._request = request
        self._ndjson = ndjson
        content_type = "application/x-ndjson" if ndjson else "text/event-stream"
        self.response = web.StreamResponse(headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })

    async def open(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, obj) -> None:
        if self._ndjson:
            await self.response.write(dumps(obj) + b"\n")
        else:
            await self.response.write(b"data: " + dumps(obj) + b"\n\n")

    async def close(self) -> None:
        if not self._ndjson:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
