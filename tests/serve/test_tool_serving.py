"""The API's tool fields as the request parser reads them (serve/tool_serving.py)."""

from __future__ import annotations

import pytest

from vlchat.serve import protocol as p
from vlchat.serve.tool_serving import tool_request

WEATHER = {"name": "get_current_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**fields) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest(model="vlchat-default", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize(("given", "parallel"), [(None, False), (False, False), (True, True)])
def test_one_call_per_answer_unless_parallel_calls_are_asked_for(given, parallel):
    fields = {} if given is None else {"parallel_tool_calls": given}
    tools = [{"type": "function", "function": WEATHER}]
    assert tool_request(request(tools=tools, tool_choice="required", **fields)).parallel is parallel


def test_legacy_functions_always_make_one_call():
    assert tool_request(request(functions=[WEATHER], parallel_tool_calls=True)).parallel is False
