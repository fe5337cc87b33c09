"""Messages -> position keys (+ a trainable flag each): the one tokenizer path shared by the chat
engine (inference) and the trainer, so prompts and label masks can never drift apart.

A position key is a token id, or (image key, slot) for each of an image's N embedding slots.
The template's segments are tokenized one by one, so a growing conversation keeps the same
prefix; assistant messages with recorded `token_ids` use them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vlchat.chat.messages import Message, Text
from vlchat.chat.templates import Template
from vlchat.chat.tools import ToolSpec
from vlchat.model.vlm import IMAGE_TOKEN_ID

PositionKey = int | tuple[str, int]
Tokenize = Callable[[str], list[int]]


def encode(
    template: Template,
    messages: Sequence[Message],
    tokenize: Tokenize,
    tokens_per_image: int,
    add_generation_prompt: bool = True,
    tools: Sequence[ToolSpec] = (),
) -> tuple[list[PositionKey], list[bool]]:
    """(position keys, trainable flags) for the rendered conversation (offering `tools`)."""
    keys: list[PositionKey] = []
    trainable: list[bool] = []
    for segment in template.segments(messages, add_generation_prompt, tools):
        message = messages[segment.message_index] if segment.is_content else None
        if message is not None and message.token_ids is not None:
            piece = list(message.token_ids)
        elif message is not None and message.images:
            piece = content_keys(message, tokenize, tokens_per_image)
        else:
            piece = tokenize(segment.text)
        keys += piece
        trainable += [segment.trainable] * len(piece)
    return keys, trainable


def slot_ids(keys: Sequence[PositionKey]) -> list[int]:
    """Position keys -> token ids with IMAGE_TOKEN_ID at every image slot (what the model embeds)."""
    return [IMAGE_TOKEN_ID if isinstance(k, tuple) else k for k in keys]


def first_slots(keys: Sequence[PositionKey]) -> list[str]:
    """The image keys in order of appearance (one per image, at its first slot)."""
    return [k[0] for k in keys if isinstance(k, tuple) and k[1] == 0]


def content_keys(message: Message, tokenize: Tokenize, tokens_per_image: int) -> list[PositionKey]:
    """A message's parts, images as `<Img>` + N slots + `</Img>`, parts joined by one space."""
    keys: list[PositionKey] = []
    text = ""
    for i, part in enumerate(message.parts):
        text += " " if i else ""
        if isinstance(part, Text):
            text += part.text
            continue
        keys += tokenize(text + "<Img>")
        keys += [(part.key, slot) for slot in range(tokens_per_image)]
        text = "</Img>"
    return keys + tokenize(text)
