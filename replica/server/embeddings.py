"""Embeddings routes: Ollama's `/api/embed` (and the older `/api/embeddings`), OpenAI's
`/v1/embeddings`.

One vector per input: the served model's final hidden state, pooled (the pooling `/api/show`
names in `model_info`) and L2-normalised, computed by the engine between steps with all of a
request's inputs batched (`replica/engine/embedding.py`). An input over the context is cut to
it when `truncate` is true (Ollama's default) and refused with 400 otherwise; `dimensions` keeps
the first N components and normalises again, as Ollama and OpenAI do.
"""
import base64
import math
import struct
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, model_validator

from replica.engine.async_engine import EngineDeadError
from replica.server.errors import APIError, bad_request
from replica.server.ollama_protocol import MAX_INT, OllamaBody, OllamaOptions, OllamaResponse
from replica.server.protocol import RequestBody, ResponseBody
from replica.server.serving import REPLICA, Replica, read_body

MAX_INPUTS = 2048                # OpenAI's limit on inputs per request
_Text = Annotated[str, Field(max_length=4 * 1024 * 1024)]
_Dimensions = Annotated[int, Field(ge=1, le=MAX_INT)] | None


class OllamaEmbedRequest(OllamaBody):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: _Text | Annotated[list[_Text], Field(max_length=MAX_INPUTS)] = Field(
        description="one text or a list of texts")
    truncate: bool | None = Field(True, description="cut inputs over the context (default) "
                                  "instead of refusing them")
    dimensions: _Dimensions = None
    options: OllamaOptions | None = None
    keep_alive: float | int | str | None = None


class OllamaEmbeddingsRequest(OllamaBody):
    """The older, one-prompt form."""
    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: _Text
    options: OllamaOptions | None = None
    keep_alive: float | int | str | None = None


class EmbeddingRequest(RequestBody):
    model: Annotated[str, Field(max_length=256)] | None = None
    input: (_Text | Annotated[list[_Text], Field(min_length=1, max_length=MAX_INPUTS)]
            | Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(min_length=1)]
            | Annotated[list[Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]],
                                       Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _Dimensions = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _check_input(self):
        if self.input == "":
            raise ValueError("input must not be empty")
        return self


class OllamaEmbedResponse(OllamaResponse):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(OllamaResponse):
    embedding: list[float]


class EmbeddingData(ResponseBody):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseBody):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseBody):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


async def _embed(replica: Replica, inputs: list[Any], param: str, truncate: bool,
                 dimensions: int | None) -> tuple[list[list[float]], int]:
    """Texts or token-id lists → (vectors, number of tokens embedded)."""
    token_lists = []
    for i, item in enumerate(inputs):
        where = f"{param}[{i}]" if len(inputs) > 1 or param == "input" else param
        if isinstance(item, str):
            ids = await replica.encode(item, where) if item else []
        else:
            replica.check_token_ids(item, where)
            ids = list(item)
        if not ids:
            raise bad_request(f"{where}: must not be empty", param)
        if len(ids) > replica.max_model_len:
            if not truncate:
                raise bad_request(f"{where}: {len(ids)} tokens are over this model's context of "
                                  f"{replica.max_model_len} tokens (truncate: true cuts them)", param)
            ids = ids[:replica.max_model_len]
        token_lists.append(ids)
    if not token_lists:
        return [], 0
    try:
        vectors = await replica.engine.embed(token_lists)
    except EngineDeadError:
        raise APIError(503, "the engine is not running", code="engine_dead") from None
    except ValueError as err:
        raise bad_request(str(err), param) from None
    return [_shorten(v, dimensions) for v in vectors], sum(len(ids) for ids in token_lists)


async def ollama_embed(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, OllamaEmbedRequest)
    replica.check_model(body.model)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    vectors, num_tokens = await _embed(replica, inputs, "input", body.truncate is not False,
                                       body.dimensions)
    return web.json_response({
        "model": replica.served_model_name, "embeddings": vectors,
        "total_duration": int((time.monotonic() - request["start_s"]) * 1e9),
        "load_duration": 0, "prompt_eval_count": num_tokens})


async def ollama_embeddings(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, OllamaEmbeddingsRequest)
    replica.check_model(body.model)
    if not body.prompt:                     # Ollama answers an empty prompt with no vector
        return web.json_response({"embedding": []})
    vectors, _ = await _embed(replica, [body.prompt], "prompt", True, None)
    return web.json_response({"embedding": vectors[0]})


async def openai_embeddings(request: web.Request) -> web.Response:
    replica: Replica = request.app[REPLICA]
    body = await read_body(request, EmbeddingRequest)
    replica.check_model(body.model)
    raw = body.input
    inputs = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else raw
    vectors, num_tokens = await _embed(replica, inputs, "input", False, body.dimensions)

    def encode(vector: list[float]) -> list[float] | str:
        if body.encoding_format == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return web.json_response({
        "object": "list", "model": replica.served_model_name,
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

