"""The agent loop's logic with a scripted model (the default model was never trained to call tools),
and its integration with the real chat engine on the tiny model: a forced first call through the
grammar, zoom's crop prefilled as an image, the KV cache reused across steps."""

from __future__ import annotations

import pytest
from agent_helpers import ScriptedSession, call
from PIL import Image as PILImage

from vlchat.agent.builtin.zoom import zoom_tool
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.loop import (
    FINAL_INSTRUCTION,
    Agent,
    AgentConfig,
    CallStarted,
    FinalAnswer,
    Observed,
    StepStarted,
    TextDelta,
    collect,
)
from vlchat.agent.tools import ToolContext, ToolError, ToolRegistry
from vlchat.chat.engine import ChatSession
from vlchat.chat.generate import Chunk
from vlchat.chat.messages import Image
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import answer_message, get_format
from vlchat.errors import VlchatError
from vlchat.images import image_key


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


def broken(text: str) -> str:
    """A tool that always fails.

    Args:
        text: anything.
    """
    raise ToolError("the service is down", data="partial output")


def agent(script: list[str], tools=(add, broken), **config) -> tuple[Agent, ScriptedSession]:
    session = ScriptedSession(list(script))
    registry = ToolRegistry(tools)
    return Agent(session, ToolExecutor(registry, ToolContext()), AgentConfig(**config)), session


def test_a_call_its_observation_then_the_answer():
    bot, session = agent([call("add", '{"a": 2, "b": 40}'), "The sum is 42."])
    result = collect(bot.ask("What is 2 + 40?"))
    assert result.answer == "The sum is 42." and result.finish_reason == "stop" and not result.forced
    assert [s["type"] for s in result.steps] == ["tool_call", "observation"]
    assert result.steps[0]["name"] == "add" and result.steps[0]["arguments"] == '{"a": 2, "b": 40}'
    assert result.steps[1]["ok"] and result.steps[1]["content"] == "42"
    assert result.steps[1]["tool_call_id"] == result.steps[0]["id"]
    roles = [m.role for m in session.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert session.messages[2].content == "42" and session.messages[2].name == "add"
    assert session.messages[2].tool_call_id == session.messages[1].tool_calls[0].id
    assert session.choices == ["auto", "auto"]
    assert [t.name for t in session.tools] == ["add", "broken"]


def test_a_failing_tool_reports_its_error_to_the_model():
    bot, session = agent([call("broken", '{"text": "x"}'), "Sorry, the tool failed."])
    result = collect(bot.ask("Try it."))
    observation = result.steps[1]
    assert not observation["ok"] and observation["error"] == "the service is down"
    assert session.messages[2].content == "the service is down\npartial output"  # what the model reads
    assert result.answer == "Sorry, the tool failed."


def test_an_unknown_tool_name_is_an_observation_not_a_crash():
    bot, session = agent([call("fly", "{}"), "I cannot fly."])
    result = collect(bot.ask("Fly."))
    assert result.steps[0]["name"] == "fly"
    assert not result.steps[1]["ok"] and result.steps[1]["error"].startswith("unknown tool 'fly'; available tools: add")
    assert result.answer == "I cannot fly."


def test_the_step_cap_forces_an_answer_without_tools():
    script = [call("add", '{"a": 1, "b": 1}')] * 2 + ["Two."]
    bot, session = agent(script, max_steps=2)
    events = list(bot.ask("1+1?"))
    final = events[-1]
    assert isinstance(final, FinalAnswer) and final.forced and final.text == "Two." and final.steps == 3
    assert session.choices == ["auto", "auto", "none"]
    assert session.prompts[-1][-1].role == "user" and session.prompts[-1][-1].content == FINAL_INSTRUCTION
    assert sum(isinstance(e, Observed) for e in events) == 2
    assert session.tool_choice == "auto"  # the next question may call tools again


def test_a_forced_answer_that_still_writes_a_call_is_only_text():
    bot, session = agent([call("add", '{"a": 1, "b": 1}'), call("add", '{"a": 1, "b": 1}')], max_steps=1)
    result = collect(bot.ask("1+1?"))
    assert result.forced and len(result.steps) == 2  # the forced step's markup is not run
    assert "<tool_call>" in result.answer and not session.messages[-1].tool_calls


def test_events_stream_in_order_and_the_words_spell_the_answer():
    script = ["Let me add. " + call("add", '{"a": 1, "b": 2}'), "It is 3."]
    bot, _ = agent(script, tool_choice="required")
    events = list(bot.ask("1+2?"))
    kinds = [type(e).__name__ for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert squeezed == [
        "StepStarted",
        "TextDelta",
        "CallStarted",
        "Observed",
        "StepStarted",
        "TextDelta",
        "FinalAnswer",
    ]
    assert [e.tool_choice for e in events if isinstance(e, StepStarted)] == ["required", "auto"]
    words = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "tool_call" not in words and words == events[-1].text == "Let me add.\n\nIt is 3."
    started = next(e for e in events if isinstance(e, CallStarted))
    assert (started.name, started.arguments, started.step) == ("add", '{"a": 1, "b": 2}', 1)


def test_two_calls_in_one_step_run_in_order():
    script = [call("add", '{"a": 1, "b": 2}') + "\n" + call("add", '{"a": 3, "b": 4}'), "3 and 7."]
    bot, session = agent(script)
    result = collect(bot.ask("Two sums."))
    assert [s["content"] for s in result.steps if s["type"] == "observation"] == ["3", "7"]
    assert [m.role for m in session.messages] == ["user", "assistant", "tool", "tool", "assistant"]


def test_zoom_adds_its_crop_to_the_conversation_as_an_image():
    picture = PILImage.new("RGB", (200, 100), "red")
    picture.paste((0, 0, 255), (100, 0, 200, 100))  # right half blue
    script = [call("zoom", '{"image": "image_1", "box": [0.5, 0, 1, 1]}'), "The right half is blue."]
    bot, session = agent(script, tools=[zoom_tool()])
    result = collect(bot.ask("What colour is the right half?", [picture]))
    assert "(images for tools: image_1)" in session.messages[0].content
    tool_message = session.messages[2]
    crop = bot.executor.context.images["image_2"]
    assert tool_message.images == [Image(image_key(crop))] and session.images[image_key(crop)] is crop
    assert crop.getpixel((10, 10)) == (0, 0, 255)
    assert result.steps[1]["images"] == [{"name": "image_2", "key": image_key(crop)}]
    assert session.prompts[1][-1] is tool_message  # the model sees the crop in the next step


def test_bad_config_and_tool_choice_are_one_line_errors():
    with pytest.raises(VlchatError, match="max steps must be between 1 and 50"):
        AgentConfig(max_steps=0)
    with pytest.raises(VlchatError, match=r"auto, required or one of the tools \(add, broken\)"):
        agent([], tool_choice="sing")


# --- the real engine (tiny model) --------------------------------------------------------------


class ScriptedChatSession(ChatSession):
    """The real ChatSession whose first answers are given (a model that calls), later ones generated."""

    script: list[str] = []

    def stream(self, generation=None):
        if not self.script:
            yield from super().stream(generation)
            return
        text = self.script.pop(0)
        self.messages.append(answer_message(text, get_format(self.template.tool_format)))
        self.last_finish_reason = "stop"
        yield Chunk(text, finish_reason="stop")


def half(image: str, ctx: ToolContext) -> str:
    """Crop the left half.

    Args:
        image: image name.
    """
    picture = ctx.image(image)
    return ctx.add_image(picture.crop((0, 0, picture.width // 2, picture.height)))


def test_on_the_engine_a_tool_image_is_prefilled_and_the_cache_is_reused(tiny_chat):
    """(zoom's schema is too long for the tiny model's 512-token window; `half` makes an image the same way)"""
    from vlchat.config import GenerationConfig

    session = ScriptedChatSession(tiny_chat, get_template("chatml"), generation=GenerationConfig(max_new_tokens=4))
    session.script = [call("half", '{"image": "image_1"}')]
    picture = PILImage.new("RGB", (64, 64), "green")
    bot = Agent(session, ToolExecutor(ToolRegistry([half]), ToolContext()), AgentConfig(max_steps=1))
    first = collect(bot.ask("Look closer.", [picture]))
    assert first.steps[1]["ok"] and len(first.steps[1]["images"]) == 1
    crop_key = first.steps[1]["images"][0]["key"]
    keys = session.position_keys(session.conversation())
    assert (crop_key, 0) in keys  # the crop's embedding slots are in the prompt
    assert (crop_key, 0) in session._cached  # ... and were prefilled
    assert session.timings.reused_tokens == 0  # the scripted step prefilled nothing before
    collect(bot.ask("And now?"))  # generated: the whole earlier conversation comes from the cache
    assert session.timings.reused_tokens > len(keys) - 8


def test_on_the_engine_required_forces_a_first_call(tiny_chat):
    from vlchat.config import GenerationConfig

    session = tiny_chat.session("chatml", generation=GenerationConfig(max_new_tokens=40))
    bot = Agent(session, ToolExecutor(ToolRegistry([add]), ToolContext()), AgentConfig(tool_choice="add", max_steps=1))
    events = list(bot.ask("Add two numbers."))
    calls = [e for e in events if isinstance(e, CallStarted)]
    assert calls and calls[0].name == "add" and calls[0].step == 1
    observed = [e for e in events if isinstance(e, Observed)]
    assert observed[0].observation.tool == "add"  # ran (ok, or a clear error for odd integers)
    final = events[-1]
    assert isinstance(final, FinalAnswer) and final.forced and final.steps == 2
    assert final.usage["reused_tokens"] > 0  # the forced step reused the first step's cache
