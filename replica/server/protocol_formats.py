"""Request bodies that constrain the output or offer tools (OpenAI and vLLM shapes): formats,
schemas, tools, tool choices and the tool calls an assistant message carries."""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replica.server.protocol_base import RequestBody

JsonSchema = dict[str, Any] | bool
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs`: exactly one of these constrains the output."""
    json_: JsonSchema | Annotated[str, Field(max_length=256 * 1024)] | None = Field(None, alias="json")
    regex: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]],
                      Field(min_length=1, max_length=256)] | None = None
    grammar: Annotated[str, Field(min_length=1, max_length=64 * 1024)] | None = None
    json_object: bool | None = Field(None, description="true: any JSON object")

    def given(self) -> dict:
        """The constraints set, by their request names."""
        named = {"json": self.json_, "regex": self.regex, "choice": self.choice,
                 "grammar": self.grammar, "json_object": self.json_object or None}
        return {k: v for k, v in named.items() if v is not None}

    @model_validator(mode="after")
    def _exactly_one(self):
        if len(self.given()) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: FunctionName
    arguments: Annotated[str, Field(max_length=1024 * 1024)] = Field(
        description="the arguments as a JSON object in a string")


class MessageToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class JsonSchemaFormat(RequestBody):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Annotated[str, Field(max_length=4096)] | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(RequestBody):
    name: FunctionName
    description: Annotated[str, Field(max_length=64 * 1024)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: FunctionName


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction
