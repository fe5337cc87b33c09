"""A scripted chat session for the agent's tests: a model that calls tools when told to (the default
model was never trained to), in ChatSession's shape (what agent/loop.py's AgentSession needs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlchat.chat.generate import Chunk
from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import answer_message, get_format
from vlchat.images import image_key


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@dataclass
class ScriptedSession:
    """A chat session whose answers are given texts, streamed in small deltas (ChatSession's shape)."""

    script: list[str]
    template: object = field(default_factory=lambda: get_template("chatml"))
    messages: list[Message] = field(default_factory=list)
    tools: tuple = ()
    tool_choice: str = "auto"
    grammar_tools: tuple | None = None
    last_finish_reason: str | None = None
    choices: list[str] = field(default_factory=list)  # tool_choice seen at each step
    prompts: list[list[Message]] = field(default_factory=list)
    images: dict = field(default_factory=dict)

    def upload_img(self, source) -> str:
        part = self.add_image(source)
        self._pending().parts.append(part)
        return part.key

    def add_image(self, source) -> Image:
        key = image_key(source)
        self.images[key] = source
        return Image(key)

    def ask(self, text: str) -> None:
        self._pending().parts.append(Text(text))

    def _pending(self) -> Message:
        if not self.messages or self.messages[-1].role != "user":
            self.messages.append(Message("user"))
        return self.messages[-1]

    def stream(self):
        self.choices.append(self.tool_choice)
        self.prompts.append(list(self.messages))
        text = self.script.pop(0)
        for i in range(0, len(text), 3):
            yield Chunk(text[i : i + 3])
        calling = self.tools and self.tool_choice != "none"
        self.messages.append(answer_message(text, get_format("hermes") if calling else None))
        self.last_finish_reason = "stop"
        yield Chunk(finish_reason="stop")


class ScriptedChat:
    """Stands in for `Chat`: every session it makes answers from one shared script."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.sessions: list[ScriptedSession] = []

    def session(self, template=None, system=None, generation=None) -> ScriptedSession:
        self.sessions.append(ScriptedSession(self.script))
        return self.sessions[-1]
