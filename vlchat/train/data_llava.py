"""Readers for conversation files: LLaVA's JSON list and a simple JSONL (question/answer or
messages), both with `<image>` markers. Public entry points are `read_llava_json` / `read_jsonl`
in vlchat.train.data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.train.samples import (
    Record,
    Sample,
    build_record,
    image_paths,
    json_field,
    json_object,
    parse_json,
    path_images,
    read_json_file,
    turns_to_messages,
)

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# --- LLaVA JSON ---------------------------------------------------------------------------------


def llava_records(path: Path, image_folder: str | os.PathLike | None) -> Iterator[Record]:
    data, error = read_json_file(path)
    if error is None and not isinstance(data, list):
        error = Record(str(path), error=f"expected a JSON list of samples, found {type(data).__name__}")
    if error is not None:
        yield error
        return
    folder = Path(image_folder) if image_folder is not None else path.parent
    for i, record in enumerate(data):
        where = f"{path}: item {i}"
        yield build_record(where, _llava_sample, record, folder, where)


def _llava_sample(record: object, folder: Path, where: str) -> Sample:
    record = json_object(record, "item")
    conversations = json_field(record, "conversations", list)
    turns = [_llava_turn(turn, j) for j, turn in enumerate(conversations)]
    paths = image_paths(record.get("image"), folder)
    meta = {"id": record["id"]} if "id" in record else {}
    return Sample(turns_to_messages(turns, path_images(paths)), list(paths), where, meta)


def _llava_turn(turn: object, j: int) -> tuple[str, str]:
    what = f" in conversations[{j}]"
    turn = json_object(turn, f"conversations[{j}]")
    speaker, value = json_field(turn, "from", str, what), json_field(turn, "value", str, what)
    if speaker not in LLAVA_ROLES:
        raise VlchatError(f"unknown speaker {speaker!r}{what}; expected 'human' or 'gpt'")
    return LLAVA_ROLES[speaker], value


# --- JSONL --------------------------------------------------------------------------------------


def jsonl_records(path: Path, image_folder: str | os.PathLike | None) -> Iterator[Record]:
    folder = Path(image_folder) if image_folder is not None else path.parent
    with open(path, "rb") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                where = f"{path}:line {n}"
                yield build_record(where, _jsonl_line_sample, line, folder, where)


def _jsonl_line_sample(line: str, folder: Path, where: str) -> Sample:
    return _jsonl_sample(parse_json(line), folder, where)


def _jsonl_sample(record: object, folder: Path, where: str) -> Sample:
    record = json_object(record)
    paths = image_paths(record.get("image", record.get("images")), folder)
    if "messages" in record:
        turns = [_jsonl_turn(m, j) for j, m in enumerate(json_field(record, "messages", list))]
    else:
        what = " (give question and answer, or messages)"
        question, answer = json_field(record, "question", str, what), json_field(record, "answer", str, what)
        turns = [("user", question), ("assistant", answer)]
    messages = turns_to_messages(turns, path_images(paths), images_first="messages" not in record)
    meta = {k: v for k, v in record.items() if k not in ("image", "images", "question", "messages")}
    return Sample(messages, list(paths), where, meta)


def _jsonl_turn(message: object, j: int) -> tuple[str, str]:
    what = f" in messages[{j}]"
    message = json_object(message, f"messages[{j}]")
    role, content = json_field(message, "role", str, what), json_field(message, "content", str, what)
    if role not in ("user", "assistant"):
        raise VlchatError(f"unknown role {role!r}{what}; expected 'user' or 'assistant'")
    return role, content
