"""Tool-use training samples (vlchat/train/data_tools.py): the agent renders the same text at
inference, every source gives valid samples, and the arithmetic answers are right."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import jsonschema
import pytest
import torch

from vlchat.agent.builtin import default_registry
from vlchat.agent.builtin.labels import image_labels_tool
from vlchat.agent.builtin.ocr import TextLine, read_text_tool
from vlchat.agent.builtin.sandbox import python_tool
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.loop import Agent, collect
from vlchat.agent.tools import ToolRegistry
from vlchat.chat.engine import ChatSession
from vlchat.chat.generate import Chunk
from vlchat.chat.messages import Text
from vlchat.chat.prompt import encode
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import ToolSpec, answer_message, get_format
from vlchat.images import image_key
from vlchat.train import data_tools
from vlchat.train.collate import encode_sample
from vlchat.train.data import dataset_items
from vlchat.train.data_tools import ToolSamples, ToolSource
from vlchat.train.samples import Sample, sample_problems

TEMPLATE = get_template("chatml")  # the default model's


def char_tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


# --- the agent's own rendering, with a scripted model ---------------------------------------------


class _StubChat:
    """Chat's image cache without a model: ChatSession.add_image only needs (key, embeddings), and
    whether the model encodes an image with its question (InstructBLIP; not this one)."""

    model = SimpleNamespace(reads_instructions=False)

    def image_embeddings(self, image, key=None):
        return key or image_key(image), torch.zeros(1, 1)


@dataclass
class ScriptedSession(ChatSession):
    """The engine's session (its ask/upload_img/messages), answering with scripted texts."""

    script: list[str] = field(default_factory=list)

    def stream(self, generation=None):
        text = self.script.pop(0)
        yield Chunk(text=text)
        yield Chunk(finish_reason="stop")
        fmt = get_format(self.template.tool_format) if self.calling else None
        self.messages.append(answer_message(text, fmt))
        self.last_finish_reason = "stop"


def agent_render(sample: Sample, tools) -> tuple[str, list]:
    """Run the agent on the sample's question, the model scripted to write the sample's answers, the
    tools replaying the sample's observations; (rendered text, position keys) of its conversation."""
    user, *answers = sample.messages
    text = "".join(p.text for p in user.parts if isinstance(p, Text))
    question = text.split("\n(images for tools:")[0]
    call_message = answers[0]
    fmt = get_format(TEMPLATE.tool_format)
    script = [fmt.calls_text(call_message.tool_calls, False), answers[-1].content]
    session = ScriptedSession(_StubChat(), TEMPLATE, script=script)  # type: ignore[arg-type]
    executor = ToolExecutor(ToolRegistry(tools))
    agent = Agent(session, executor)
    result = collect(agent.ask(question, sample.images))
    assert result.answer == answers[-1].content
    keys, _ = encode(TEMPLATE, session.messages, char_tokens, 3, add_generation_prompt=False, tools=session.tools)
    return TEMPLATE.render(session.messages, add_generation_prompt=False, tools=session.tools), keys


def replaying_tools(sample: Sample) -> list:
    """The five built-in tools, image_labels / read_text returning the sample's observation."""
    observation = json.loads(sample.messages[2].content)

    class Classifier:
        config = data_tools.LabelsConfig()

        def top_k(self, image, k):
            return [(row["label"], row["probability"]) for row in observation["labels"]]

    class Reader:
        config = data_tools.OcrConfig()

        def read(self, image, box=None):
            return [TextLine(row["text"], row["box"], row["confidence"]) for row in observation.get("lines", [])]

    replaced = {
        "image_labels": image_labels_tool(classifier=Classifier()),
        "read_text": read_text_tool(reader=Reader()),
    }
    return [replaced.get(tool.name, tool) for tool in default_registry()]


@pytest.mark.parametrize("kind", ["labels", "read_text"])
def test_training_text_is_what_the_agent_renders(kind):
    sample = ToolSamples(ToolSource(kind, 1))[0]
    tools = replaying_tools(sample)
    offered = tuple(ToolSpec(t.name, t.description, t.parameters) for t in tools)  # as Agent.__init__
    trained = Sample(sample.messages, sample.images, sample.source, sample.meta, offered)
    text, keys = agent_render(trained, tools)
    assert TEMPLATE.render(trained.messages, add_generation_prompt=False, tools=offered) == text
    assert "(images for tools: image_1)" in text and "<tool_response>" in text
    encoded = encode_sample(trained, TEMPLATE, None, char_tokens, 3)  # the trainer's path, tools included
    assert encoded.ids == [k if isinstance(k, int) else encoded.ids[i] for i, k in enumerate(keys)]
    assert len(encoded.ids) == len(keys)


def test_offered_tools_are_the_agents_specs():
    specs = {t.name: ToolSpec(t.name, t.description, t.parameters) for t in default_registry()}
    for i in range(20):
        for spec in ToolSamples(ToolSource("labels", 20))[i].tools:
            assert spec.name not in specs or spec == specs[spec.name]


def test_both_assistant_turns_are_trained():
    sample = ToolSamples(ToolSource("python", 1))[0]
    encoded = encode_sample(sample, TEMPLATE, None, char_tokens, 3)
    trained = "".join(chr(t) for t, label in zip(encoded.ids, encoded.labels) if label != -100)
    assert '"name": "python"' in trained and sample.messages[-1].content in trained
    assert "<tool_response>" not in trained and "What" not in trained


# --- every source ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["labels", "read_text", "python", "functions", "qa"])
def test_each_source_gives_valid_samples_with_tools(kind):
    samples = ToolSamples(ToolSource(kind, 30, lang="both"))
    for i in range(len(samples)):
        sample = samples[i]
        assert sample_problems(sample) == [], sample.source
        assert sample.tools, "every sample offers tools (the adapter is on when tools are offered)"
        assert len({t.name for t in sample.tools}) == len(sample.tools)
        TEMPLATE.render(sample.messages, add_generation_prompt=False, tools=sample.tools)  # valid roles
        assert sample.images or kind in ("python", "functions")
    assert samples[3].messages == ToolSamples(ToolSource(kind, 30, lang="both"))[3].messages  # deterministic


def test_calls_name_an_offered_tool_with_valid_arguments():
    for kind in ("labels", "read_text", "python", "functions"):
        samples = ToolSamples(ToolSource(kind, 40))
        for i in range(len(samples)):
            sample = samples[i]
            offered = {t.name: t for t in sample.tools}
            for message in sample.messages:
                for call in message.tool_calls:
                    jsonschema.validate(json.loads(call.arguments), offered[call.name].parameters)


def test_functions_call_or_answer_directly():
    samples = ToolSamples(ToolSource("functions", 60))
    calls = [samples[i] for i in range(60) if samples[i].messages[-1].tool_calls]
    direct = [samples[i] for i in range(60) if not samples[i].messages[-1].tool_calls]
    assert calls and direct
    for sample in calls:
        call = sample.messages[-1].tool_calls[0]
        assert call.name == sample.meta["function"]
        assert json.loads(call.arguments) == sample.meta["arguments"]
    for sample in direct:
        assert sample.meta["function"] is None and sample.messages[-1].content


def test_python_answers_are_right():
    samples = ToolSamples(ToolSource("python", 200))
    for i in range(len(samples)):
        sample = samples[i]
        code = json.loads(sample.messages[1].tool_calls[0].arguments)["code"]
        expression = code.removeprefix("print(").removesuffix(")")
        value = str(eval(expression))  # noqa: S307 -- our own generated arithmetic
        assert json.loads(sample.messages[2].content)["stdout"] == value + "\n"
        assert sample.messages[-1].content.rstrip(".。").endswith(f"= {value}")


def test_python_observation_is_the_sandboxs():
    sample = ToolSamples(ToolSource("python", 1))[0]
    call = sample.messages[1].tool_calls[0]
    observation = ToolExecutor(ToolRegistry([python_tool()])).run("python", call.arguments)
    assert observation.ok and observation.content == sample.messages[2].content


def test_labels_answer_names_the_top_label():
    samples = ToolSamples(ToolSource("labels", 30))
    for i in range(len(samples)):
        sample = samples[i]
        labels = json.loads(sample.messages[2].content)["labels"]
        assert labels == sorted(labels, key=lambda row: -row["probability"])
        assert labels[0]["label"] in sample.messages[-1].content


def test_read_text_answer_quotes_the_lines():
    samples = ToolSamples(ToolSource("read_text", 30))
    for i in range(len(samples)):
        sample = samples[i]
        observation = json.loads(sample.messages[2].content)
        for line in observation["lines"]:
            assert line["text"] in sample.messages[-1].content


def test_qa_replays_the_synthetic_answers():
    from vlchat.train import synth

    sample = ToolSamples(ToolSource("qa", 1, seed_offset=5))[0]
    plain = synth.qa_sample(5, "en", 1, explain_yes_no=True)
    assert sample.messages[1:] == plain.messages[1:]
    assert sample.messages[0].content == plain.messages[0].content + "\n(images for tools: image_1)"


def test_general_uses_the_committed_base_replies():
    samples = ToolSamples(ToolSource("general", 10))
    sample = samples[0]
    assert sample.tools and not sample.images
    assert sample.messages[-1].content == samples.replies[0]["reply"]


def test_usable_replies_cut_at_a_sentence():
    rows = [
        {"prompt": "a", "reply": "One two three. Four five", "finish_reason": "length"},
        {"prompt": "b", "reply": "Fine.", "finish_reason": "stop"},
        {"prompt": "c", "reply": "no sentence end at all here", "finish_reason": "length"},
    ]
    assert [r["reply"] for r in data_tools.usable_replies(rows)] == ["One two three.", "Fine."]


def test_tool_message_roles_are_checked():
    sample = ToolSamples(ToolSource("labels", 1))[0]
    broken = Sample([sample.messages[0], sample.messages[1], sample.messages[3]], sample.images)
    assert sample_problems(broken)


def test_dataset_spec_and_unknown_kind():
    first = next(iter(dataset_items("tools:python")))
    assert first.sample is not None and first.sample.tools
    with pytest.raises(Exception, match="tools:labels"):
        dataset_items("tools:nope")
