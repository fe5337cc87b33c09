"""Function calling and structured output for the API: request fields -> a grammar (`Structure`),
OpenAI messages with calls and results -> engine messages, and generated text -> `tool_calls`
(or the legacy `function_call`), whole or streamed.

Rules (docs/function-calling.md): `tools` or the legacy `functions`, not both; `tool_choice`
needs tools; a named function must be one of them; every parameters schema and the
`response_format` schema must compile (llguidance), or the request gets a 400 naming the field;
beam search cannot be combined with a grammar (400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlchat.chat.grammar import Structure
from vlchat.chat.messages import ToolCall
from vlchat.chat.structure import build_structure
from vlchat.chat.tools import (
    ArgumentsDelta,
    CallStart,
    CallStream,
    ContentDelta,
    ToolError,
    ToolFormat,
    ToolSpec,
    new_call_id,
    parse_answer,
)
from vlchat.serve import protocol as p

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolRequestError(ValueError):
    """A bad tools / response_format field: (message, param), turned into a 400 by serving."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolRequest:
    tools: list[ToolSpec]
    choice: str  # "none" | "auto" | "required" | a function name
    parallel: bool
    legacy: bool  # answered as message.function_call / finish_reason "function_call"
    json_schema: dict[str, Any] | None

    @property
    def calling(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def structure(self, fmt: ToolFormat, tokenizer) -> Structure | None:
        try:
            return build_structure(self.tools, self.choice, self.parallel, self.json_schema, fmt, tokenizer)
        except ToolError as error:
            param, message = error.param or "tools", str(error)
            if self.legacy:  # name the fields the request used
                param = param.replace("tool_choice", "function_call").replace("tools", "functions")
                message = message.replace("tool_choice", "function_call").replace("tools[", "functions[")
            raise ToolRequestError(message, param) from None


def spec(function: p.FunctionDefinition) -> ToolSpec:
    return ToolSpec(function.name, function.description or "", function.parameters or dict(EMPTY_PARAMETERS))


def tool_request(request: p.ChatCompletionRequest) -> ToolRequest | None:
    """The request's tool and format fields, checked; None when it uses none of them."""
    if request.tools is not None and request.functions is not None:
        raise ToolRequestError("give tools or the legacy functions, not both", "functions")
    legacy = request.functions is not None
    tools = [spec(f) for f in request.functions] if legacy else [spec(t.function) for t in request.tools or []]
    choice_field = request.function_call if legacy else request.tool_choice
    if choice_field is not None and not tools and choice_field != "none":
        name = "function_call" if legacy else "tool_choice"
        raise ToolRequestError(f"{name} is only allowed when {'functions' if legacy else 'tools'} are given", name)
    if choice_field is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice_field, str):
        choice = choice_field
    else:
        choice = choice_field.name if legacy else choice_field.function.name
    schema = json_schema(request.response_format)
    if not tools and schema is None:
        return None
    # one call per answer unless asked (as llama.cpp's server; OpenAI defaults to several): a small
    # model given the choice repeats the same call until max_tokens (docs/function-calling.md)
    parallel = not legacy and request.parallel_tool_calls is True
    return ToolRequest(tools, choice, parallel, legacy, schema)


def json_schema(response_format: p.ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    given = response_format.json_schema
    if given is None or given.schema_ is None:
        raise ToolRequestError(
            'response_format of type "json_schema" needs json_schema.schema (a JSON Schema object)',
            "response_format.json_schema",
        )
    return given.schema_


# --- OpenAI messages -> engine message fields -------------------------------------------------


def message_fields(raw: p.ChatMessage, role: str, index: int) -> dict[str, Any]:
    """tool_calls / tool_call_id / name of an OpenAI message as `Message` keyword arguments."""
    if role == "assistant":
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in raw.tool_calls or []]
        if raw.function_call is not None:
            calls.append(ToolCall(new_call_id(), raw.function_call.name, raw.function_call.arguments))
        return {"tool_calls": tuple(calls)}
    if role == "tool":
        if raw.role == "function" and not raw.name:
            raise ToolRequestError(
                f"messages[{index}]: a function message needs the function's name", f"messages[{index}].name"
            )
        return {"tool_call_id": raw.tool_call_id, "name": raw.name}
    return {}


# --- generated text -> response ---------------------------------------------------------------


def response(text: str, finish: str, fmt: ToolFormat | None, legacy: bool) -> tuple[p.ResponseMessage, str]:
    """The chat.completion message and finish_reason for a generated answer."""
    content, calls = parse_answer(text, fmt) if fmt is not None else (text, [])
    if not calls:
        return p.ResponseMessage(content=text), finish
    finish = finish if finish != "stop" else ("function_call" if legacy else "tool_calls")
    if legacy:
        first = calls[0]
        return p.ResponseMessage(
            content=content or None, function_call=p.FunctionCall(name=first.name, arguments=first.arguments)
        ), finish
    out = [p.ToolCall(id=new_call_id(), function=p.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return p.ResponseMessage(content=content or None, tool_calls=out), finish


class DeltaStream:
    """Text deltas -> OpenAI `Delta`s: content, then per call its id, type and name once and its
    arguments in fragments (legacy: `function_call` name, then arguments)."""

    def __init__(self, fmt: ToolFormat, legacy: bool) -> None:
        self.calls, self.legacy = CallStream(fmt), legacy

    def feed(self, text: str) -> list[p.Delta]:
        return self._deltas(self.calls.feed(text))

    def finish(self) -> list[p.Delta]:
        return self._deltas(self.calls.finish())

    def finish_reason(self, finish: str) -> str:
        if not self.calls.has_calls or finish != "stop":
            return finish
        return "function_call" if self.legacy else "tool_calls"

    def _deltas(self, events) -> list[p.Delta]:
        out = []
        for event in events:
            if isinstance(event, ContentDelta):
                out.append(p.Delta(content=event.text))
            elif self.legacy and event.index > 0:
                continue  # the legacy API has one call; later ones are dropped
            elif isinstance(event, CallStart) and self.legacy:
                out.append(p.Delta(function_call=p.DeltaFunctionCall(name=event.name, arguments="")))
            elif isinstance(event, CallStart):
                function = p.DeltaFunctionCall(name=event.name, arguments="")
                out.append(
                    p.Delta(
                        tool_calls=[p.DeltaToolCall(index=event.index, id=event.id, type="function", function=function)]
                    )
                )
            elif isinstance(event, ArgumentsDelta) and self.legacy:
                out.append(p.Delta(function_call=p.DeltaFunctionCall(arguments=event.text)))
            elif isinstance(event, ArgumentsDelta):
                function = p.DeltaFunctionCall(arguments=event.text)
                out.append(p.Delta(tool_calls=[p.DeltaToolCall(index=event.index, function=function)]))
        return out


def stored_parts(message: p.ResponseMessage) -> list[dict[str, Any]]:
    """An answer's calls as stored message parts (serve/store.py's "tool_call" part)."""
    calls = message.tool_calls or []
    if message.function_call is not None:
        calls = [p.ToolCall(id=new_call_id(), function=message.function_call)]
    return [
        {"type": "tool_call", "id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls
    ]


def arguments_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
