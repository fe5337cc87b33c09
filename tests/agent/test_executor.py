"""Every way a tool call can fail ends as an Observation, never as an exception."""

from __future__ import annotations

import json
import sys
import time

import pytest
from PIL import Image

from vlchat.agent.executor import ExecutorConfig, ToolExecutor
from vlchat.agent.tools import Tool, ToolContext, ToolError, ToolRegistry


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: first.
        b: second.
    """
    return a + b


def boom(message: str) -> str:
    """Fail on purpose.

    Args:
        message: what to raise.
    """
    raise RuntimeError(message)


def refuse(reason: str) -> str:
    """Fail in words, with partial output.

    Args:
        reason: the reason.
    """
    raise ToolError(f"refused: {reason}", data={"partial": [1, 2]})


def leave() -> str:
    """Exit the interpreter (a badly behaved tool)."""
    sys.exit(3)


def sleepy(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "awake"


def shout(n: int) -> str:
    """Make a long text.

    Args:
        n: its length.
    """
    return "a" * n


def paint(ctx: ToolContext) -> dict:
    """Make a new image."""
    return {"image": ctx.add_image(Image.new("RGB", (16, 16), "blue"))}


@pytest.fixture
def executor() -> ToolExecutor:
    registry = ToolRegistry([add, boom, refuse, leave, shout, paint])
    registry.register(Tool.from_function(sleepy, timeout_s=0.3))
    return ToolExecutor(registry, config=ExecutorConfig(max_output_chars=200, max_abandoned=2))


def test_success_with_json_text_or_dict_arguments(executor):
    for arguments in ('{"a": 2, "b": 40}', {"a": 2, "b": 40}):
        obs = executor.run("add", arguments)
        assert obs.ok and obs.content == "42" and obs.data == 42 and obs.error is None
    assert executor.run("add", '{"a": 1}').data == 2  # default used
    assert executor.run("paint", "").ok  # no arguments: "" and None mean {}


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("nope", "{}", "unknown tool 'nope'; available tools: add, boom, refuse, leave, shout, paint, sleepy"),
        ("add", '{"a": 1,', "arguments for add are not valid JSON: Expecting property name"),
        ("add", "[1, 2]", "arguments for add must be a JSON object, got list"),
        ("add", "{}", "invalid arguments for add: 'a' is a required property"),
        ("add", '{"a": "one"}', "invalid arguments for add: a: 'one' is not of type 'integer'"),
        ("add", '{"a": 1, "c": 2}', "invalid arguments for add: Additional properties are not allowed ('c' was"),
        ("boom", '{"message": "it broke"}', "RuntimeError: it broke"),
        ("leave", "{}", "leave stopped with SystemExit"),
    ],
)
def test_failures_become_observations(executor, name, arguments, error):
    obs = executor.run(name, arguments)
    assert not obs.ok and obs.error.startswith(error), obs.error
    assert obs.content.startswith(error) and obs.data is None
    assert json.loads(json.dumps(obs.to_dict()))["ok"] is False


def test_tool_error_keeps_its_partial_output(executor):
    obs = executor.run("refuse", {"reason": "no"})
    assert not obs.ok and obs.error == "refused: no"
    assert obs.content == 'refused: no\n{"partial": [1, 2]}'


def test_timeout_is_an_observation_and_abandoned_calls_are_bounded(executor):
    start = time.monotonic()
    obs = executor.run("sleepy", {"seconds": 3})
    assert time.monotonic() - start < 2.5
    assert not obs.ok and obs.error == "sleepy did not finish within 0.3 s and was abandoned"
    executor.run("sleepy", {"seconds": 3})
    refused = executor.run("add", {"a": 1})  # two abandoned calls still sleeping: max_abandoned=2
    assert not refused.ok and "timed-out tool calls are still running" in refused.error
    assert executor.run("sleepy", {"seconds": 0}).ok is False  # still refused, not run


def test_output_is_capped(executor):
    obs = executor.run("shout", {"n": 1000})
    assert obs.ok and obs.truncated
    assert obs.content == "a" * 200 + "\n…[800 more characters cut]"


def test_images_a_tool_adds_are_reported(executor):
    obs = executor.run("paint")
    assert obs.ok and [i.name for i in obs.images] == ["image_1"] == [obs.data["image"]]
    assert obs.images[0].image.size == (16, 16) and len(obs.images[0].key) == 64
    assert obs.to_dict()["images"] == [{"name": "image_1", "key": obs.images[0].key}]
    assert executor.run("add", {"a": 1}).images == []
