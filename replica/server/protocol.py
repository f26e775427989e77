"""Request and response bodies of the OpenAI-compatible routes and of /tokenize, /detokenize.

Requests are validated strictly (no "1" for 1, no NaN, no unknown fields, as OpenAI does);
static bounds live here, bounds that depend on the served model (context length, n limit)
are checked by the handlers. The OpenAPI document is generated from these classes.
"""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replica.server.config import MAX_INT, MAX_LOGPROBS, MAX_PROMPTS_PER_REQUEST
from replica.server.protocol_base import RequestBody
from replica.server.protocol_formats import (JsonSchema, MessageToolCall, NamedToolChoice,
                                             ResponseFormat, StructuredOutputs, Tool)

StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=512)]],
                     Field(max_length=16)]
StopField = Annotated[str, Field(min_length=1, max_length=512)] | StopList | None
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(min_length=1)]


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(RequestBody):
    """Parameters shared by /v1/completions and /v1/chat/completions."""
    model: str | None = Field(None, description="the served model name; omitted: the served model")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_INT)] = 1
    stop: StopField = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    # vLLM's extensions, which load generators rely on for exact output lengths
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    min_tokens: Annotated[int, Field(ge=0, le=MAX_INT)] = Field(0, description="EOS and stop ids are "
                                                                 "masked until this many tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraint on the output: json (a schema), regex, choice or grammar")
    guided_json: JsonSchema | Annotated[str, Field(max_length=256 * 1024)] | None = Field(
        None, description="older vLLM name of structured_outputs.json")
    guided_regex: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]],
                             Field(min_length=1, max_length=256)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1, max_length=64 * 1024)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="accepted only when empty (token biasing is not supported)")

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: (Annotated[str, Field(max_length=4 * 1024 * 1024)]
             | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]
             | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)])
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = Field(False, description="only false is supported")
    best_of: Annotated[int, Field(ge=1, le=MAX_INT)] | None = Field(
        None, description="only equal to n is supported")
    suffix: Annotated[str, Field(max_length=0)] | None = Field(
        None, description="only empty is supported")

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (best-of sampling is not supported)")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"] = Field(description="only text parts are supported")
    text: Annotated[str, Field(max_length=4 * 1024 * 1024)]


class ChatMessage(BaseModel):
    # Extra keys are ignored: clients send back the assistant message they received, with
    # fields such as refusal or annotations that do not matter for the prompt.
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=4 * 1024 * 1024)] | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_vision(cls, data):
        """An image part gets a message that says why, not a type error (no vision model yet)."""
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list) and any(isinstance(p, dict) and p.get("type") in
                                           ("image_url", "input_image") for p in parts):
            raise ValueError("model has no vision: image parts in content are not supported "
                             "(this model reads text only)")
        return data

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def tool_choice_name(self) -> str | None:
        """"none", "auto", "required", a function's name, or None (not given)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ----------------------------------------------------------------------------

class PromptTokensDetails(ResponseBody):
    cached_tokens: int = 0


class Usage(ResponseBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(ResponseBody):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(ResponseBody):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseBody):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(ResponseBody):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(ResponseBody):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagefleet"
    root: str | None = Field(None, description="the weights this replica serves")
    max_model_len: int | None = None


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(ResponseBody):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseBody):
    error: ErrorDetail


# ---- tokenizer routes ---------------------------------------------------------------------

class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: Annotated[str, Field(max_length=4 * 1024 * 1024)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(ResponseBody):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(max_length=1_000_000)]


class DetokenizeResponse(ResponseBody):
    prompt: str
