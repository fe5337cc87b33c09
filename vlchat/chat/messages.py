"""Chat messages with multimodal content (after torchtune's `Message`).

A message is a role plus an ordered list of parts; an image part renders as MiniGPT-4's
`<Img><ImageHere></Img>` tag, and parts are joined by one space as MiniGPT-4's Chat does
("<Img><ImageHere></Img> What is in the picture?").

Function calling (chat/tools.py renders and parses it): an assistant message may carry
`tool_calls`, and a `tool` message carries one call's result (`tool_call_id`, the function's
`name`) as its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TAG = f"<Img>{IMAGE_PLACEHOLDER}</Img>"

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    """An image by content hash (`sha256` hex of the decoded RGB pixels) and, if known, its path."""

    key: str
    source: str | None = None


Part = Text | Image


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message; `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str = "{}"


@dataclass
class Message:
    role: Role
    parts: list[Part] = field(default_factory=list)
    # Token ids the model generated for this (assistant) message, so that a later turn can
    # reuse the KV cache exactly; None when the text was not generated here.
    token_ids: tuple[int, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls after its text
    tool_call_id: str | None = None  # tool: the call this message answers
    name: str | None = None  # tool: the function that produced the result

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")

    @classmethod
    def text_message(cls, role: Role, text: str) -> Message:
        return cls(role, [Text(text)])

    @property
    def images(self) -> list[Image]:
        return [p for p in self.parts if isinstance(p, Image)]

    @property
    def content(self) -> str:
        """The message text with each image as `<Img><ImageHere></Img>`, parts joined by a space."""
        return " ".join(IMAGE_TAG if isinstance(p, Image) else p.text for p in self.parts)
