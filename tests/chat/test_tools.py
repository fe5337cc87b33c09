"""Tool definitions, calls and results in the templates (prompt and label mask) and the lenient parsers."""

from __future__ import annotations

import json

import pytest

from vlchat.chat.messages import Message, ToolCall
from vlchat.chat.prompt import encode
from vlchat.chat.template_lookup import get_template
from vlchat.chat.templates import TEMPLATES
from vlchat.chat.tools import (
    FORMATS,
    HERMES,
    ArgumentsDelta,
    CallStart,
    CallStream,
    ContentDelta,
    ToolError,
    ToolSpec,
    check_tools,
    parse_answer,
)
from vlchat.errors import VlchatError

WEATHER = ToolSpec(
    "get_current_weather",
    "Get the current weather in a given location",
    {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
)
CALL = ToolCall("call_1", "get_current_weather", '{"location": "Boston, MA"}')


def round_trip() -> list[Message]:
    return [
        Message.text_message("user", "What's the weather like in Boston?"),
        Message("assistant", [], tool_calls=(CALL,)),
        Message.text_message("tool", '{"temperature": 22, "unit": "celsius", "description": "Sunny"}'),
    ]


def test_chatml_renders_hermes_tools_calls_and_results():
    text = get_template("chatml").render(round_trip(), tools=[WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER.as_openai()) + "\n</tools>" in text
    assert text.index("<tools>") < text.index("<|im_end|>")  # inside the system turn
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_current_weather", "arguments": '
        '{"location": "Boston, MA"}}\n</tool_call><|im_end|>\n' in text
    )
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 22' in text
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")  # generation prompt after a result


def test_internlm2_renders_the_lagent_protocol():
    text = get_template("internlm2").render(round_trip(), tools=[WEATHER])
    assert "<|im_start|>system name=<|plugin|>\n" in text
    assert (
        '<|action_start|><|plugin|>\n{"name": "get_current_weather", "parameters": {"location": "Boston, MA"}}' in text
    )
    assert "<|action_end|><|im_end|>" in text
    assert '<|im_start|>environment name=<|plugin|>\n{"temperature": 22' in text


@pytest.mark.parametrize("name", ["vicuna_v0", "llama2", "ziya"])
def test_other_templates_use_the_generic_format_in_their_own_markers(name):
    template = get_template(name)
    text = template.render(round_trip(), tools=[WEATHER])
    assert template.tool_format == "generic"
    assert "<tools>" in text and "<tool_call>\n" in text and "<tool_response>\n" in text
    assert text.endswith(template.assistant_prefix)


def test_consecutive_results_share_one_user_turn_in_hermes():
    calls = (CALL, ToolCall("call_2", "get_current_weather", '{"location": "Paris"}'))
    messages = [
        Message.text_message("user", "Boston and Paris?"),
        Message("assistant", [], tool_calls=calls),
        Message.text_message("tool", "22"),
        Message.text_message("tool", "18"),
    ]
    text = get_template("chatml").render(messages, tools=[WEATHER])
    assert (
        "<|im_start|>user\n<tool_response>\n22\n</tool_response>\n<tool_response>\n18\n</tool_response><|im_end|>"
        in text
    )
    assert text.count("<tool_call>") == 2 + 2  # two calls + the two in the instructions


def test_tools_without_a_system_prompt_still_get_a_system_turn():
    messages = [Message.text_message("system", ""), Message.text_message("user", "hi")]
    text = get_template("chatml").render(messages, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools")
    assert get_template("chatml").render(messages).startswith("<|im_start|>user")


def test_label_mask_trains_the_calls_and_not_the_results():
    tokenize = lambda text: list(text.encode())  # noqa: E731 (one id per byte: easy to read back)
    messages = round_trip() + [Message.text_message("assistant", "It is sunny, 22 C.")]
    keys, trainable = encode(
        get_template("chatml"), messages, tokenize, 4, add_generation_prompt=False, tools=[WEATHER]
    )
    trained = bytes(k for k, t in zip(keys, trainable) if t).decode()
    assert '<tool_call>\n{"name": "get_current_weather"' in trained and "</tool_call><|im_end|>" in trained
    assert "It is sunny, 22 C.<|im_end|>" in trained
    assert "temperature" not in trained and "<tools>" not in trained


@pytest.mark.parametrize(
    "messages",
    [
        [Message.text_message("user", "hi"), Message.text_message("tool", "x")],  # no call to answer
        [
            Message.text_message("user", "hi"),
            Message("assistant", [], tool_calls=(CALL,)),
            Message.text_message("user", "?"),
        ],
    ],
)
def test_results_must_answer_calls(messages):
    with pytest.raises(VlchatError, match="tool"):
        get_template("chatml").segments(messages)


def test_user_assistant_order_errors_keep_their_wording():
    with pytest.raises(VlchatError, match="must alternate user and assistant"):
        get_template("chatml").segments([Message.text_message("assistant", "hi")])


def test_every_template_names_a_known_format():
    assert all(t.tool_format in FORMATS for t in TEMPLATES.values())


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,content,calls",
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "", [("f", '{"a": 1}')]),
        ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', "Let me check.", [("f", "{}")]),
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}', "", [("f", '{"a": 1}')]),  # no close tag
        ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', "", [("f", '{"a": 1}')]),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", '{"a": 1}')]),  # as a string
        (
            '<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": 2}}]</tool_call>',
            "",
            [("f", "{}"), ("g", '{"b": 2}')],
        ),
        (
            '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
            "",
            [("f", "{}"), ("g", "{}")],
        ),
    ],
)
def test_parse_answer_is_lenient(text, content, calls):
    got_content, got = parse_answer(text, HERMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls


@pytest.mark.parametrize(
    "junk",
    [
        "<tool_call>",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        "plain text with a < sign",
        "\x00\ufffd<tool_call>\ud800",
    ],
)
def test_junk_is_plain_content(junk):
    assert parse_answer(junk, HERMES) == (junk, [])


def test_internlm2_calls_parse_with_parameters():
    text = 'Checking.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": "y"}}<|action_end|>'
    content, calls = parse_answer(text, FORMATS["internlm2"])
    assert content == "Checking." and calls[0].arguments == '{"x": "y"}'


def stream_all(text: str, step: int) -> list:
    stream, events = CallStream(HERMES), []
    for i in range(0, len(text), step):
        events += stream.feed(text[i : i + step])
    return events + stream.finish()


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_streamed_calls_join_to_the_parsed_calls(step):
    text = (
        'Sure.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston, MA", "n": {"k": "}"}}}'
        '\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    )
    events = stream_all(text, step)
    content, calls = parse_answer(text, HERMES)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == content
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_current_weather"), (1, "g")]
    for i, call in enumerate(calls):
        assert "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == i) == call.arguments
    if step == 1:  # arguments really stream: several fragments for the first call
        assert sum(isinstance(e, ArgumentsDelta) and e.index == 0 for e in events) > 5


def test_stream_without_calls_is_content_only():
    events = stream_all("Just text, with <b>tags</b> and a <tool", 2)
    assert all(isinstance(e, ContentDelta) for e in events)
    assert "".join(e.text for e in events) == "Just text, with <b>tags</b> and a <tool"


def test_stream_of_a_junk_call_is_content():
    events = stream_all("<tool_call>{oops}</tool_call>", 4)
    assert [type(e) for e in events] == [ContentDelta] and "oops" in events[0].text


@pytest.mark.parametrize(
    "tools,message",
    [
        ([ToolSpec("a b")], "invalid"),
        ([ToolSpec("f"), ToolSpec("f")], "duplicate"),
        ([ToolSpec("f", parameters={"type": "string"})], "object"),
        ([ToolSpec("x" * 65)], "invalid"),
    ],
)
def test_bad_tool_definitions_are_refused(tools, message):
    with pytest.raises(ToolError, match=message):
        check_tools(tools)
