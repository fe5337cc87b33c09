"""Messages -> position keys (+ a trainable flag each): the one tokenizer path shared by the chat
engine (inference) and the trainer, so prompts and label masks can never drift apart.

A position key is a token id, or (image key, slot) for each of an image's N embedding slots.
The template's segments are tokenized one by one, so a growing conversation keeps the same
prefix; assistant messages with recorded `token_ids` use them as they are.
"""

from __future__ import annotations

import hashlib
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
    instructed: bool = False,
) -> tuple[list[PositionKey], list[bool]]:
    """(position keys, trainable flags) for the rendered conversation (offering `tools`). With
    `instructed` (a model whose image embeddings depend on text: `VisionLanguageModel.reads_instructions`)
    each image's key also names the text it is encoded with (`instructed_key`), so KV caches keyed
    by position keys never mix two encodings of one image.

    Tokenized piece by piece, the prompt must still get the tokens that tokenizing it whole would
    (what the reference implementations feed): spaces that end a piece are carried into the next
    text piece (BPE tokenizers attach a space to the word after it: "USER:" + " What"), and, for
    tokenizers that prepend "▁" to a text (LLaMA's SentencePiece), every piece after the first is
    tokenized as a continuation (`LanguageModel.tokenize_continuation`).
    """
    pieces = _Pieces(tokenize)
    keys: list[PositionKey] = []
    trainable: list[bool] = []
    for segment in template.segments(messages, add_generation_prompt, tools):
        message = messages[segment.message_index] if segment.is_content else None
        if message is not None and message.token_ids is not None:
            piece = pieces.flush() + list(message.token_ids)
        elif message is not None and message.images and template.images_first:
            piece = pieces.text(template.part_separator.join(p.text for p in message.parts if isinstance(p, Text)))
        elif message is not None and message.images:
            restart = pieces.restart if template.split_at_images else None
            piece = content_keys(message, pieces.text, tokens_per_image, template, pieces.flush, restart)
        else:
            piece = pieces.text(segment.text, bos=segment.text == template.bos and not keys)
        keys += piece
        trainable += [segment.trainable] * len(piece)
    tail = pieces.flush()
    front = leading_image_keys(messages, tokens_per_image) if template.images_first else []
    keys = front + keys + tail
    if instructed:
        texts = image_instructions(template, messages)
        keys = [(instructed_key(k[0], texts[k[0]]), k[1]) if isinstance(k, tuple) else k for k in keys]
    return keys, [False] * len(front) + trainable + [False] * len(tail)


def image_instructions(template: Template, messages: Sequence[Message]) -> dict[str, str]:
    """Image key -> the text an instruction-reading connector (InstructBLIP's Q-Former) reads with it:
    the text parts of the first message that holds the image, joined as the template joins them. A
    conversation encodes each image once, so follow-up turns keep its first encoding and KV cache
    (transformers' InstructBLIP `generate` has no turns: one prompt, read by both the Q-Former and the LM)."""
    texts: dict[str, str] = {}
    for message in messages:
        text = template.part_separator.join(p.text for p in message.parts if isinstance(p, Text))
        for image in message.images:
            texts.setdefault(image.key, text)
    return texts


def instructed_key(key: str, instruction: str) -> str:
    """An image key that also names the text its embeddings were computed with."""
    return f"{key}|{hashlib.sha256(instruction.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def image_of(key: str) -> str:
    """The image's own key inside an `instructed_key`."""
    return key.rsplit("|", 1)[0]


def leading_image_keys(messages: Sequence[Message], tokens_per_image: int) -> list[PositionKey]:
    """The slots of every image in the conversation, in order, for templates that put images first."""
    return [(image.key, slot) for m in messages for image in m.images for slot in range(tokens_per_image)]


class _Pieces:
    """Tokenizes consecutive text pieces, carrying trailing spaces forward (see `encode`)."""

    def __init__(self, tokenize: Tokenize) -> None:
        owner = getattr(tokenize, "__self__", None)  # lm.tokenize: its model knows continuations
        self.first, self.rest = tokenize, getattr(owner, "tokenize_continuation", tokenize)
        self.started, self.carry = False, ""

    def text(self, text: str, bos: bool = False) -> list[int]:
        """Ids of `text` after the carried spaces; its own trailing spaces are carried on. The BOS
        piece does not count as a start: the text after it is tokenized as a prompt's beginning."""
        text = self.carry + text
        stripped = text.rstrip(" ")
        self.carry = text[len(stripped) :]
        if not stripped:
            return []
        ids = (self.rest if self.started else self.first)(stripped)
        self.started = self.started or not bos
        return ids

    def restart(self) -> None:
        """The next text is tokenized as a prompt's beginning (MiniGPT-4 tokenizes the text after each
        image on its own: LLaMA's tokenizer then prepends its "▁" to it)."""
        self.started = False

    def flush(self) -> list[int]:
        """The carried spaces as tokens of their own (an image or recorded answer ids come next)."""
        if not self.carry:
            return []
        carry, self.carry = self.carry, ""
        ids = (self.rest if self.started else self.first)(carry)
        self.started = True
        return ids


def slot_ids(keys: Sequence[PositionKey]) -> list[int]:
    """Position keys -> token ids with IMAGE_TOKEN_ID at every image slot (what the model embeds)."""
    return [IMAGE_TOKEN_ID if isinstance(k, tuple) else k for k in keys]


def has_images(keys: Sequence[PositionKey]) -> bool:
    """Whether the prompt holds an image: its sequence runs with the LM's LoRA adapter on."""
    return any(isinstance(k, tuple) for k in keys)


def first_slots(keys: Sequence[PositionKey]) -> list[str]:
    """The image keys in order of appearance (one per image, at its first slot)."""
    return [k[0] for k in keys if isinstance(k, tuple) and k[1] == 0]


def content_keys(
    message: Message,
    tokenize: Tokenize,
    tokens_per_image: int,
    template: Template | None = None,
    flush: Callable[[], list[int]] = list,
    restart: Callable[[], None] | None = None,
) -> list[PositionKey]:
    """A message's parts, images as the template's open text + N slots + close text (MiniGPT-4's
    `<Img>` ... `</Img>` by default), parts joined by its separator (one space by default).
    `flush` returns tokens still owed before an image slot (spaces carried by `encode`); `restart`, if
    given, is called after each image (templates with `split_at_images`)."""
    open_, close, separator = ("<Img>", "</Img>", " ") if template is None else template.image_markup
    keys: list[PositionKey] = []
    text = ""
    for i, part in enumerate(message.parts):
        text += separator if i else ""
        if isinstance(part, Text):
            text += part.text
            continue
        keys += tokenize(text + open_) if text + open_ else []
        keys += flush()
        keys += [(part.key, slot) for slot in range(tokens_per_image)]
        if restart is not None:
            restart()
        text = close
    return keys + (tokenize(text) if text else [])
