"""Readers for conversation files: LLaVA's JSON list and a simple JSONL (question/answer or
messages), both with `<image>` markers. Public entry points are `read_llava_json` / `read_jsonl`
in vlchat.train.data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.train.data import (
    LLAVA_ROLES,
    Sample,
    _build,
    _field,
    _image_paths,
    _Item,
    _json_file,
    _messages,
    _object,
    _parse_json,
    _path_images,
)

# --- LLaVA JSON ---------------------------------------------------------------------------------


def _llava_items(path: Path, image_folder: str | os.PathLike | None) -> Iterator[_Item]:
    data, error = _json_file(path)
    if error is None and not isinstance(data, list):
        error = _Item(str(path), error=f"expected a JSON list of samples, found {type(data).__name__}")
    if error is not None:
        yield error
        return
    folder = Path(image_folder) if image_folder is not None else path.parent
    for i, record in enumerate(data):
        where = f"{path}: item {i}"
        yield _build(where, _llava_sample, record, folder, where)


def _llava_sample(record: object, folder: Path, where: str) -> Sample:
    record = _object(record, "item")
    conversations = _field(record, "conversations", list)
    turns = [_llava_turn(turn, j) for j, turn in enumerate(conversations)]
    paths = _image_paths(record.get("image"), folder)
    meta = {"id": record["id"]} if "id" in record else {}
    return Sample(_messages(turns, _path_images(paths)), list(paths), where, meta)


def _llava_turn(turn: object, j: int) -> tuple[str, str]:
    what = f" in conversations[{j}]"
    turn = _object(turn, f"conversations[{j}]")
    speaker, value = _field(turn, "from", str, what), _field(turn, "value", str, what)
    if speaker not in LLAVA_ROLES:
        raise VlchatError(f"unknown speaker {speaker!r}{what}; expected 'human' or 'gpt'")
    return LLAVA_ROLES[speaker], value


# --- JSONL --------------------------------------------------------------------------------------


def _jsonl_items(path: Path, image_folder: str | os.PathLike | None) -> Iterator[_Item]:
    folder = Path(image_folder) if image_folder is not None else path.parent
    with open(path, "rb") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                where = f"{path}:line {n}"
                yield _build(where, _jsonl_line_sample, line, folder, where)


def _jsonl_line_sample(line: str, folder: Path, where: str) -> Sample:
    return _jsonl_sample(_parse_json(line), folder, where)


def _jsonl_sample(record: object, folder: Path, where: str) -> Sample:
    record = _object(record)
    paths = _image_paths(record.get("image", record.get("images")), folder)
    if "messages" in record:
        turns = [_jsonl_turn(m, j) for j, m in enumerate(_field(record, "messages", list))]
    else:
        what = " (give question and answer, or messages)"
        question, answer = _field(record, "question", str, what), _field(record, "answer", str, what)
        turns = [("user", question), ("assistant", answer)]
    messages = _messages(turns, _path_images(paths), images_first="messages" not in record)
    meta = {k: v for k, v in record.items() if k not in ("image", "images", "question", "messages")}
    return Sample(messages, list(paths), where, meta)


def _jsonl_turn(message: object, j: int) -> tuple[str, str]:
    what = f" in messages[{j}]"
    message = _object(message, f"messages[{j}]")
    role, content = _field(message, "role", str, what), _field(message, "content", str, what)
    if role not in ("user", "assistant"):
        raise VlchatError(f"unknown role {role!r}{what}; expected 'user' or 'assistant'")
    return role, content
