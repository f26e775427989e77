"""The one table of what the server exposes: the aiohttp router and the OpenAPI document are
both built from `ROUTES`, so neither can fall behind the other.

To add a route, add a row: method, path, summary, handler, and the pydantic bodies that the
document describes (request None: no body; `is_open`: no API key, no drain gate).
"""
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from replica.server import embeddings, ollama_api, ollama_store_api, openai_api, utility_api
from replica.server import embeddings as emb
from replica.server import ollama_protocol as ollama
from replica.server import protocol as openai

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str                             # lower case, as OpenAPI writes it
    path: str
    summary: str
    handler: Handler
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    stream_type: str | None = None          # content type of the streamed variant
    is_open: bool = False                   # no API key needed
    in_openapi: bool = True                 # False: answered, but not part of the API's contract


ROUTES = (
    Route("post", "/v1/completions", "Text completion (OpenAI)", openai_api.create_completion,
          openai.CompletionRequest, openai.CompletionResponse, "text/event-stream"),
    Route("post", "/v1/chat/completions", "Chat completion (OpenAI)",
          openai_api.create_chat_completion, openai.ChatCompletionRequest,
          openai.ChatCompletionResponse, "text/event-stream"),
    Route("get", "/v1/models", "The served model (OpenAI)", openai_api.list_models, None,
          openai.ModelList),
    Route("get", "/v1/models/{model}", "The served model by its name (OpenAI)", openai_api.retrieve_model,
          None, openai.ModelCard),
    Route("post", "/api/generate", "Generate (Ollama)", ollama_api.generate,
          ollama.OllamaGenerateRequest, ollama.OllamaGenerateResponse, "application/x-ndjson"),
    Route("post", "/api/chat", "Chat (Ollama)", ollama_api.chat, ollama.OllamaChatRequest,
          ollama.OllamaChatResponse, "application/x-ndjson"),
    Route("get", "/api/tags", "Local models (Ollama)", ollama_api.tags, None, ollama.TagsResponse),
    Route("post", "/api/show", "Model details (Ollama)", ollama_api.show, ollama.OllamaModelRequest,
          ollama.ShowResponse),
    Route("get", "/api/ps", "Loaded models (Ollama)", ollama_api.ps, None, ollama.PsResponse),
    Route("get", "/api/version", "Server version (Ollama)", ollama_api.version, None,
          ollama.VersionResponse),
    Route("post", "/tokenize", "Prompt or messages to token ids", utility_api.tokenize,
          openai.TokenizeRequest, openai.TokenizeResponse),
    Route("post", "/detokenize", "Token ids to text", utility_api.detokenize,
          openai.DetokenizeRequest, openai.DetokenizeResponse),
    Route("get", "/health", "200 while the engine loop lives", utility_api.health, is_open=True),
    Route("get", "/ready", "200 when loaded and not draining", utility_api.ready, is_open=True),
    Route("get", "/metrics", "Prometheus metrics", utility_api.metrics, is_open=True),
    Route("get", "/openapi.json", "This document", utility_api.openapi_json),
    Route("post", "/api/embed", "Embeddings (Ollama)", embeddings.ollama_embed, emb.OllamaEmbedRequest,
          emb.OllamaEmbedResponse),
    Route("post", "/api/embeddings", "Embedding of one prompt (Ollama, older form)",
          embeddings.ollama_embeddings, emb.OllamaEmbeddingsRequest, emb.OllamaEmbeddingsResponse),
    Route("post", "/v1/embeddings", "Embeddings (OpenAI)", embeddings.openai_embeddings,
          emb.EmbeddingRequest, emb.EmbeddingResponse),
    # Ollama's store-changing routes: a clear 501 saying what to do instead (pagefleet reads the
    # store Ollama writes), never a 404 that looks like a broken server
    *(Route("delete" if path == "/api/delete" else "post", path, "Not available: use Ollama",
            ollama_store_api.store_change_refused, in_openapi=False)
      for path in ollama_store_api.STORE_CHANGES),
)

OPEN_PATHS = frozenset(r.path for r in ROUTES if r.is_open)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        path = re.sub(r"\{(\w+)\}", r"{\1:.+}", route.path)   # a path parameter may hold slashes
        if route.method == "get":
            app.router.add_get(path, route.handler)      # HEAD too, as aiohttp does
        else:
            app.router.add_route(route.method.upper(), path, route.handler)
