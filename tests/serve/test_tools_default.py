"""The function-calling example of the InternLM notes (OpenAI's get_current_weather) against a real
server on the default model, through the official `openai` client: with `tools` and with the
legacy `functions`, whole and streamed. The default model was never trained to call tools, so the
call is asked for with tool_choice "required" / a named function; the grammar makes it valid."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import openai
from openai.types.chat import ChatCompletionChunk
from serve_helpers import default_server  # noqa: F401 (fixture)

MODEL = "vlchat-default"
WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
}
TOOLS = [{"type": "function", "function": WEATHER}]
ASK = [{"role": "user", "content": "What's the weather like in Boston today?"}]
RESULT = json.dumps({"temperature": 22, "unit": "celsius", "description": "Sunny"})


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def check_arguments(arguments: str) -> None:
    value = json.loads(arguments)
    jsonschema_rs.validate(WEATHER["parameters"], value)
    assert "boston" in value["location"].lower(), value


def test_weather_with_tools(default_server):
    api = client(default_server)
    reply = api.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_current_weather"
    check_arguments(call.function.arguments)
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    answer = api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=48)
    words = answer.choices[0].message
    assert words.tool_calls is None and words.content and any(c.isalpha() for c in words.content), words
    assert answer.usage.prompt_tokens_details.cached_tokens > reply.usage.prompt_tokens // 2  # prefix reuse


def test_weather_with_legacy_functions(default_server):
    api = client(default_server)
    reply = api.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER], function_call={"name": "get_current_weather"}, max_tokens=64
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_current_weather"
    check_arguments(choice.message.function_call.arguments)
    messages = ASK + [
        {"role": "assistant", "content": None, "function_call": choice.message.function_call.model_dump()},
        {"role": "function", "name": "get_current_weather", "content": RESULT},
    ]
    answer = api.chat.completions.create(model=MODEL, messages=messages, functions=[WEATHER], max_tokens=48)
    words = answer.choices[0].message
    assert words.function_call is None and words.content and any(c.isalpha() for c in words.content), words


def test_weather_streamed_equals_whole(default_server):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 64}
    whole = httpx.post(f"{default_server.url}/v1/chat/completions", json=body, timeout=300).json()
    expected = [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["choices"][0]["message"]["tool_calls"]
    ]
    with httpx.stream(
        "POST", f"{default_server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=300
    ) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(line) for line in lines[:-1]]  # openai's own type
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    calls[delta.index] = [delta.function.name, ""]
                calls[delta.index][1] += delta.function.arguments or ""
    assert [tuple(c) for c in calls.values()] == expected
    assert chunks[-1].choices[0].finish_reason == "tool_calls" or any(
        c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks
    )
