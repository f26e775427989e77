"""Request and response bodies of the Ollama-compatible routes (`/api/...`).

Ollama ignores fields it does not know, and so do these bodies; fields that would change the
answer in a way this replica cannot honour (images, thinking) are refused with 400
rather than silently dropped. Durations in responses are nanoseconds, as in Ollama.
"""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replica.server.config import MAX_INT, MAX_LOGPROBS

NO_VISION = "model has no vision: this model reads text only; send the request without images"


class OllamaBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class OllamaOptions(OllamaBody):
    """Ollama's runtime options; the ones without effect here (num_ctx, num_thread...) are
    accepted and ignored, as Ollama itself ignores options a backend does not use."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    num_predict: Annotated[int, Field(ge=-2, le=MAX_INT)] | None = Field(
        None, description="-1 or -2: until the context is full")
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=512)]],
                    Field(max_length=16)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    num_ctx: Annotated[int, Field(ge=0, le=MAX_INT)] | None = None


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class OllamaFunctionCall(OllamaBody):
    name: FunctionName
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(OllamaBody):
    function: OllamaFunctionCall


class OllamaMessage(OllamaBody):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=4 * 1024 * 1024)] = ""
    images: list[str] | None = Field(None, description="only empty is supported (text-only model)")
    tool_calls: Annotated[list[OllamaToolCall], Field(max_length=128)] | None = None
    tool_name: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="on a tool message: the function whose result this is")

    @model_validator(mode="after")
    def _no_images(self):
        if self.images:
            raise ValueError(NO_VISION)
        return self


class OllamaFunction(OllamaBody):
    name: FunctionName
    description: Annotated[str, Field(max_length=64 * 1024)] | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(OllamaBody):
    type: Literal["function"] = "function"
    function: OllamaFunction


class _GenerateFields(OllamaBody):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    stream: bool | None = True
    options: OllamaOptions | None = None
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        None, description='"json" (any JSON object) or a JSON schema the answer follows')
    keep_alive: float | int | str | None = None
    think: bool | None = Field(None, description="only false is supported")
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _check_think(self):
        if self.think:
            raise ValueError("think is not supported by this model")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token for the engine; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class OllamaGenerateRequest(_GenerateFields):
    prompt: Annotated[str, Field(max_length=4 * 1024 * 1024)] | None = None
    system: Annotated[str, Field(max_length=4 * 1024 * 1024)] | None = None
    raw: bool | None = False
    context: Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]],
                       Field(max_length=1_000_000)] | None = None
    suffix: Annotated[str, Field(max_length=0)] | None = Field(None, description="only empty is supported")
    images: list[str] | None = Field(None, description="only empty is supported (text-only model)")

    @model_validator(mode="after")
    def _no_images(self):
        if self.images:
            raise ValueError(NO_VISION)
        return self


class OllamaChatRequest(_GenerateFields):
    messages: Annotated[list[OllamaMessage], Field(max_length=4096)] | None = None
    tools: Annotated[list[OllamaTool], Field(max_length=128)] | None = None


class OllamaModelRequest(OllamaBody):
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="older clients send name instead of model")
    verbose: bool | None = None

    @model_validator(mode="after")
    def _needs_a_name(self):
        if self.model is None and self.name is None:
            raise ValueError("model is required")
        return self


# ---- responses ----------------------------------------------------------------------------

class OllamaResponse(BaseModel):
    model_config = ConfigDict(extra="allow")


class Durations(OllamaResponse):
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaGenerateResponse(Durations):
    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None
    context: list[int] | None = None


class OllamaAssistantMessage(OllamaResponse):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = None


class OllamaChatResponse(Durations):
    model: str
    created_at: str
    message: OllamaAssistantMessage
    done: bool
    done_reason: str | None = None


class OllamaModelDetails(OllamaResponse):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(OllamaResponse):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class TagsResponse(OllamaResponse):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(OllamaResponse):
    models: list[RunningModel]


class ShowResponse(OllamaResponse):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(OllamaResponse):
    version: str


class OllamaError(OllamaResponse):
    error: str
