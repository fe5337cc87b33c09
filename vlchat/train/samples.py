"""The `Sample` type and what every dataset reader shares: a record's outcome (`Record`: the sample
built from it, or why none could be), the structural check of a sample, conversations with
`<image>` markers, and careful reading of JSON fields and files.

The readers (data_llava.py, data_minigpt4.py, data_easyvqa.py, synth.py) import this module and
vlchat.train.data imports them, so the dependency runs one way: samples <- readers <- data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.tools import ToolSpec
from vlchat.errors import VlchatError

IMAGE_MARKER = "<image>"  # LLaVA's placeholder for an image inside a human turn


@dataclass
class Sample:
    """One training example.

    `messages`: user/assistant turns (no system message; the recipe's template adds its system
    prompt); user messages hold `Image(key=...)` parts in the order of `images`.
    `images`: the loaded RGB images, or paths to load lazily (str), in order of appearance.
    `source`: where it came from, for error messages ("data/llava.json:item 12", "shard-0001.tar:000123").
    `meta`: free-form facts for evaluation (e.g. {"qtype": "colour", "lang": "en", "answer": "red"}).
    `tools`: the functions the prompt offers (rendered into the system prompt as at inference); an
    assistant message may then carry `tool_calls`, each answered by a `tool` message (train/data_tools.py).
    """

    messages: list[Message]
    images: list[PILImage.Image | str] = field(default_factory=list)
    source: str = ""
    meta: dict = field(default_factory=dict)
    tools: tuple[ToolSpec, ...] = ()


@dataclass
class Record:
    """One record of a dataset: the sample built from it, or why none could be built."""

    where: str
    sample: Sample | None = None
    error: str | None = None


def build_record(where: str, make: Callable[..., Sample], *args: object) -> Record:
    """Run a record's builder on `args`; a VlchatError it raises becomes the record's error."""
    try:
        return Record(where, sample=make(*args))
    except VlchatError as err:
        return Record(where, error=str(err))


def sample_problems(sample: Sample) -> list[str]:
    """Structural problems: roles, empty answers, images in answers, image parts vs images."""
    problems = _role_problems(sample.messages)
    if not sample.messages:
        problems.append("no messages")
    elif not problems and sample.messages[-1].role != "assistant":
        problems.append("the last message is not an assistant answer, so there is nothing to learn")
    for i, message in enumerate(sample.messages):
        if message.role == "assistant" and not _has_text(message) and not message.tool_calls:
            problems.append(f"empty answer in message {i} (from 0)")
        elif message.role == "assistant" and message.images:
            problems.append(f"an image in assistant message {i}; images belong in user messages")
    parts = sum(len(m.images) for m in sample.messages)
    if parts != len(sample.images):
        problems.append(f"{parts} image placeholder(s) for {len(sample.images)} image(s)")
    return problems


def _role_problems(messages: Sequence[Message]) -> list[str]:
    """Roles alternate user, assistant, ...; an assistant message with tool calls is followed by one
    `tool` message per call, then the assistant again (function calling), or ends the sample."""
    expected = "user"
    for i, message in enumerate(messages):
        if message.role != expected:
            return [
                f"roles must alternate user, assistant, ... (tool results after a call): message {i} (from 0) "
                f"is {message.role!r} where {expected!r} was expected"
            ]
        if message.role == "assistant" and message.tool_calls:
            calls = len(message.tool_calls)
            results = messages[i + 1 : i + 1 + calls]
            if i + 1 == len(messages):  # the sample ends at the call (the client runs it)
                return []
            if len(results) < calls or any(m.role != "tool" for m in results):
                return [f"message {i} (from 0) calls {calls} tool(s) but is not followed by {calls} tool message(s)"]
            expected = "tool"
        elif message.role == "tool":
            expected = "tool" if i + 1 < len(messages) and messages[i + 1].role == "tool" else "assistant"
        else:
            expected = "assistant" if message.role == "user" else "user"
    return []


def _has_text(message: Message) -> bool:
    return any(isinstance(p, Text) and p.text.strip() for p in message.parts)


# --- conversations with <image> markers ----------------------------------------------------------


def turns_to_messages(
    turns: Sequence[tuple[str, str]], images: Sequence[Image], images_first: bool = False
) -> list[Message]:
    """(role, text with <image> markers) -> Messages, the i-th marker becoming images[i].

    Text next to a marker is stripped ("<image>\\nWhat is it?" -> [Image, Text("What is it?")]).
    `images_first`: when no turn has a marker, the images go in front of the first turn.
    """
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if images_first and markers == 0 and images and turns:
        turns = [(turns[0][0], IMAGE_MARKER * len(images) + turns[0][1]), *turns[1:]]
        markers = len(images)
    if markers != len(images):
        raise VlchatError(
            f"{len(images)} image(s) but {markers} {IMAGE_MARKER} marker(s); "
            f"put one {IMAGE_MARKER} in a user turn where each image goes"
        )
    queue = iter(images)
    messages = []
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and IMAGE_MARKER in text:
            raise VlchatError(f"{IMAGE_MARKER} in turn {i} (from 0), an answer; images belong in user turns")
        pieces = text.split(IMAGE_MARKER)
        parts: list[Text | Image] = []
        for j, piece in enumerate(pieces):
            if j:
                parts.append(next(queue))
            if piece.strip() or len(pieces) == 1:
                parts.append(Text(piece.strip()))
        messages.append(Message(role, parts))  # type: ignore[arg-type]
    return messages


def path_images(paths: Sequence[str]) -> list[Image]:
    """Image parts for files: the path is the key until the trainer loads the pixels."""
    return [Image(key=p, source=p) for p in paths]


def image_paths(value: object, folder: Path) -> list[str]:
    """An "image" field (absent, a path, or a list of paths) -> paths joined to `folder`."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise VlchatError(f"'image' must be a path or a list of paths, found {json.dumps(value)[:80]}")
    return [str(folder / n) for n in names]


def json_field(record: dict, key: str, kind: type | tuple[type, ...], what: str = "") -> object:
    """record[key], checked to be a `kind`; a VlchatError naming the key otherwise."""
    if key not in record:
        raise VlchatError(f"missing key {key!r}{what}")
    if not isinstance(record[key], kind):
        names = " or ".join(_TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise VlchatError(f"{key!r}{what} must be a {names}, found {type(record[key]).__name__}")
    return record[key]


_TYPE_NAMES = {str: "string", list: "list", dict: "object", int: "number"}


def json_object(record: object, what: str = "record") -> dict:
    if not isinstance(record, dict):
        raise VlchatError(f"{what} must be a JSON object, found {type(record).__name__}")
    return record


# --- files --------------------------------------------------------------------------------------


def existing_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise VlchatError(f"dataset not found: {path}")
    return path


def read_json_file(path: Path) -> tuple[object, Record | None]:
    """(parsed JSON, None), or (None, an error record at the line where parsing failed)."""
    try:
        return json.loads(path.read_bytes()), None
    except json.JSONDecodeError as err:
        return None, Record(f"{path}:line {err.lineno}", error=f"not valid JSON: {err.msg} (column {err.colno})")
    except UnicodeDecodeError:
        return None, Record(str(path), error="not UTF-8 text")
    except OSError as err:
        return None, Record(str(path), error=f"cannot read ({err.strerror or err})")


def parse_json(text: bytes) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VlchatError(f"not valid JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError:
        raise VlchatError("not UTF-8 text") from None
