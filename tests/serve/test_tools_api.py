"""Function calling and structured output over a real server (the tiny model) and the official
`openai` client: tools, tool_choice, parallel_tool_calls, legacy functions, response_format,
streamed calls validated with the openai package's own types, tool/function messages, and 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from serve_helpers import tiny_model_file, tiny_server  # noqa: F401 (fixtures)

MODEL = "vlchat-tiny"
PARAMETERS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_current_weather", "description": "Get the weather", "parameters": PARAMETERS},
    }
]
ASK = [{"role": "user", "content": "What's the weather like in Boston?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=120)


def refused(response: httpx.Response, param: str | None = None) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def stream_chunks(server, **kwargs) -> list[ChatCompletionChunk]:
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={"model": MODEL, "stream": True, **kwargs}, timeout=120
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(line) for line in lines[:-1]]  # the package's own type


def test_required_gives_a_valid_call(tiny_server):
    reply = client(tiny_server).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_current_weather"
    jsonschema_rs.validate(PARAMETERS, json.loads(call.function.arguments))
    assert reply.usage.completion_tokens > 10 and reply.usage.total_tokens > reply.usage.prompt_tokens


def test_named_tool_choice(tiny_server):
    tools = TOOLS + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    reply = client(tiny_server).chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
    )
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]


def test_streamed_call_equals_the_non_streamed_call(tiny_server):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 60}
    whole = post(tiny_server, body).json()["choices"][0]
    chunks = stream_chunks(tiny_server, **body)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # id, type and name come once, first
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert sum(1 for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if d.id is None) > 3


def test_legacy_functions_answer_with_function_call(tiny_server):
    functions = [TOOLS[0]["function"]]
    body = {"messages": ASK, "functions": functions, "function_call": {"name": "get_current_weather"}, "max_tokens": 60}
    reply = client(tiny_server).chat.completions.create(model=MODEL, **body)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_current_weather"
    jsonschema_rs.validate(PARAMETERS, json.loads(choice.message.function_call.arguments))
    chunks = stream_chunks(tiny_server, **body)
    deltas = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert deltas[0].name == "get_current_weather"
    assert "".join(d.arguments or "" for d in deltas) == choice.message.function_call.arguments


def test_tool_and_function_messages_round_trip_with_prefix_reuse(tiny_server):
    first = post(
        tiny_server,
        {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 60},
    ).json()
    call = first["choices"][0]["message"]["tool_calls"][0]
    result = json.dumps({"temperature": 22, "unit": "celsius", "description": "Sunny"})
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
    second = post(tiny_server, {"messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8}).json()
    assert second["choices"][0]["message"]["content"] is not None
    assert second["choices"][0]["finish_reason"] in ("stop", "length")
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    legacy = ASK + [
        {"role": "assistant", "content": None, "function_call": call["function"]},
        {"role": "function", "name": "get_current_weather", "content": result},
    ]
    third = post(tiny_server, {"messages": legacy, "functions": [TOOLS[0]["function"]], "max_tokens": 8})
    assert third.status_code == 200, third.text


def test_response_format_json_schema_and_json_object(tiny_server):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    reply = client(tiny_server).chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    jsonschema_rs.validate(schema, json.loads(reply.choices[0].message.content))
    assert reply.choices[0].finish_reason == "stop"
    reply = post(tiny_server, {"messages": ASK, "max_tokens": 100, "response_format": {"type": "json_object"}}).json()
    if reply["choices"][0]["finish_reason"] == "stop":  # a random model may fill an open object to the limit
        assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)


def test_none_and_auto_answer_in_text(tiny_server):
    for choice in ("none", "auto"):
        reply = post(tiny_server, {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 8}).json()
        message = reply["choices"][0]["message"]
        assert message["tool_calls"] is None and isinstance(message["content"], str)


@pytest.mark.parametrize(
    "fields,param,words",
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
                        },
                    }
                ]
            },
            "tools",
            "strin",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}},
                    }
                ]
            },
            "tools",
            "not",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "f"}},
                ]
            },
            "tools[1]",
            "duplicate",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]", "invalid"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed"),
        ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions", "not both"),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call", "g"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
                }
            },
            "response_format",
            "strin",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "num_beams": 2}, "num_beams", "num_beams"),
    ],
)
def test_bad_tool_requests_are_400(tiny_server, fields, param, words):
    assert words in refused(post(tiny_server, {"messages": ASK, "max_tokens": 4, **fields}), param)


def test_too_many_tools_for_the_context_is_400(tiny_server):
    tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "word " * 40, "parameters": PARAMETERS}}
        for i in range(20)
    ]
    response = post(tiny_server, {"messages": ASK, "tools": tools, "max_tokens": 4})
    assert response.status_code == 400 and "tool definitions" in response.json()["error"]["message"]


def test_bad_tool_messages_are_400(tiny_server):
    orphan = ASK + [{"role": "tool", "tool_call_id": "x", "content": "22"}]
    assert "tool" in refused(post(tiny_server, {"messages": orphan, "max_tokens": 4}))
    nameless = ASK + [
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "content": "22"},
    ]
    assert "name" in refused(post(tiny_server, {"messages": nameless, "max_tokens": 4}))


def test_stored_conversations_keep_calls_and_results(tiny_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": "{}"}}
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_current_weather", "content": "22 C"},
    ]
    created = httpx.post(f"{tiny_server.url}/v1/conversations", json={"messages": messages}, timeout=30)
    assert created.status_code == 200, created.text
    url = f"{tiny_server.url}/v1/conversations/{created.json()['id']}"
    stored = httpx.get(url, timeout=30).json()["messages"]
    assert stored[1]["parts"] == [
        {"type": "tool_call", "id": "call_1", "name": "get_current_weather", "arguments": "{}"}
    ]
    assert stored[2]["parts"][0] == {
        "type": "tool_result",
        "tool_call_id": "call_1",
        "name": "get_current_weather",
        "content": "22 C",
    }
    exported = json.loads(httpx.get(f"{url}/export?format=json", timeout=30).text)
    assert exported["messages"][1]["parts"][0]["type"] == "tool_call"
    answer = httpx.post(f"{url}/messages", json={"regenerate": True, "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200, answer.text  # the stored round trip renders as a prompt
    orphan = [ASK[0], {"role": "tool", "tool_call_id": "x", "content": "22"}]
    assert httpx.post(f"{tiny_server.url}/v1/conversations", json={"messages": orphan}, timeout=30).status_code == 400
