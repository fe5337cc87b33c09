"""Pydantic models of the OpenAI chat-completions API (field order as in OpenAI's reference),
plus vlchat's documented extensions (`num_beams`, `repetition_penalty`, `template`, `top_k`,
the server-side tools `vlchat_tools`, `vlchat_tool_choice`, `vlchat_max_steps`)
and the `/v1/conversations` schemas.

Other fields are checked by the serving layer (serving.py `check_extra_fields`): fields that
cannot change the answer (`user`, `metadata`, ...) are accepted and ignored, as clients such as
LangChain and Open WebUI send them; any other field is refused with a 400 naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ImageURL(BaseModel):
    url: str = Field(max_length=30_000_000)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is encoded at 224 px


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


# A part's `type` picks its schema (api.py turns a missing or unknown type into a message naming the part).
ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


# --- function calling and structured output (serve/tool_serving.py) ---------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments object
    strict: bool | None = None  # accepted: vlchat always enforces the schema


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str  # checked by the server (400 for an unknown role, as OpenAI does)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    function_call: FunctionCall | None = None  # assistant, legacy


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields: accepted if harmless, else a 400 (serving.py)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = None  # -2..2
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # the older name; max_completion_tokens wins when both are set
    n: int | None = 1
    presence_penalty: float | None = None  # -2..2
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # 0..2; None: the server's default (0 = greedy)
    top_logprobs: int | None = None  # 0..20, needs logprobs: true
    top_p: float | None = None
    # vlchat extensions (min_tokens as in vLLM)
    min_tokens: int | None = None
    top_k: int | None = None
    num_beams: int | None = None
    repetition_penalty: float | None = None
    template: str | None = None
    # function calling and structured output
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy
    function_call: Literal["none", "auto"] | FunctionName | None = None  # legacy
    response_format: ResponseFormat | None = None
    # server-side tools (serve/agent_serving.py, a vlchat extension)
    vlchat_tools: list[str] | None = None
    vlchat_tool_choice: str | None = None
    vlchat_max_steps: int | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a piece of a character stays a piece)


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunctionCall | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "vlchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- /v1/conversations (a vlchat extension) --------------------------------------------------


def small_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """UI settings are a small JSON object: at most 16 levels deep and 16 KB."""

    def depth(value: Any) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    if settings is not None and (depth(settings) > 16 or len(json.dumps(settings, default=str)) > 16384):
        raise ValueError("settings must be a JSON object at most 16 levels deep and 16 KB long")
    return settings


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    system: str | None = None
    template: str | None = Field(default=None, max_length=64)
    settings: dict[str, Any] = Field(default_factory=dict)
    messages: list[ChatMessage] = Field(default_factory=list)

    _check_settings = field_validator("settings")(small_settings)


class ConversationUpdate(BaseModel):
    """Fields left out stay as they are; `"system": null` goes back to the template's default."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    system: str | None = None
    settings: dict[str, Any] | None = None

    _check_settings = field_validator("settings")(small_settings)


class ConversationReply(BaseModel):
    """Append a user message to a stored conversation and generate (and store) the answer.
    The generation fields mean what they mean in a chat completion."""

    model_config = ConfigDict(extra="allow")  # other fields: accepted if harmless, else a 400 (serving.py)

    content: str | list[ContentPart] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    num_beams: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    regenerate: bool = False  # drop the last answer and answer the last user message again
    vlchat_tools: list[str] | None = None  # server-side tools, as on /v1/chat/completions
    vlchat_tool_choice: str | None = None
    vlchat_max_steps: int | None = None
