"""`vlchat ask`: one question, or a JSONL batch answered with the model loaded once."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from vlchat.chat.engine import Chat, ChatSession
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import calls_json
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.images import load_image


def answer_one(
    question: str | None,
    images: list[Path],
    open_chat: Callable[[], Chat],
    template: str | None,
    system: str | None,
    config: GenerationConfig,
    as_json: bool,
    calling: dict | None = None,
) -> None:
    """Stream the answer to stdout (or print one JSON object with the answer and timings).
    `calling`: ChatSession fields for tools / tool_choice / json_schema; calls print as JSON."""
    if question is None or not question.strip():
        raise VlchatError(
            'empty question: give the question as an argument, e.g. vlchat ask -i cat.jpg "What is this?"'
        )
    template and get_template(template)
    loaded = [load_image(path) for path in images]  # refuse bad files before the slow load
    session = open_chat().session(template, system, config)
    for image in loaded:
        session.upload_img(image)
    session.ask(question)
    for name, value in (calling or {}).items():
        setattr(session, name, value)
    if as_json:
        answer = session.answer()
        print(json.dumps(result_record(session, answer), ensure_ascii=False))
        return
    if session.calling:  # the raw call markup is not shown: the answer, then each call as JSON
        answer = session.answer()
        if answer:
            print(answer)
        for call in calls_json(session.messages[-1].tool_calls):
            print(json.dumps(call, ensure_ascii=False))
        return
    for chunk in session.stream():
        if chunk.notice:
            print(f"[{chunk.notice}]", file=sys.stderr)
        print(chunk.text, end="", flush=True)
    print()


def result_record(session: ChatSession, answer: str) -> dict:
    t = session.timings
    calls = session.messages[-1].tool_calls if session.messages else ()
    return {
        "answer": answer,
        **({"tool_calls": calls_json(calls)} if calls else {}),
        "finish_reason": session.last_finish_reason,
        "timings": {
            "image_encode_ms": round(t.image_encode_ms, 2),
            "ttft_s": round(t.ttft_s, 4),
            "total_s": round(t.total_s, 4),
            "decode_tok_s": round(t.decode_tok_s, 2),
        },
        "usage": {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens},
    }


def answer_batch(
    path: Path, open_chat: Callable[[], Chat], template: str | None, system: str | None, config: GenerationConfig
) -> None:
    """One JSON line per input line, in order; a bad line gets {"line", "error"} and the rest go on."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise VlchatError(f"cannot read batch file {path}: {error}") from None
    template and get_template(template)
    chat = open_chat()
    print_batch(lines, lambda line: answer_line(chat, line, path.parent, template, system, config))


def print_batch(lines: list[str], answer: Callable[[str], dict]) -> None:
    """Print `answer(line)` of every non-blank line as a JSON line numbered from 1; a line whose
    answer raises VlchatError prints {"line", "id"?, "error"} and the rest go on."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = answer(line)
        except VlchatError as error:
            record = {**line_id(line), "error": str(error)}
        print(json.dumps({"line": number, **record}, ensure_ascii=False), flush=True)


def batch_item(line: str, base: Path) -> tuple[str, list[Path]]:
    """(question, image paths) of one batch line; paths relative to `base` (the batch file's folder)."""
    try:
        item = json.loads(line)
    except ValueError as error:
        raise VlchatError(f"not valid JSON: {error}") from None
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise VlchatError('each line must be an object with a "question" string (and "image": a path)')
    images = item.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise VlchatError('"image" must be a path or a list of paths')
    return item["question"], [base / image for image in images]


def answer_line(
    chat: Chat, line: str, base: Path, template: str | None, system: str | None, config: GenerationConfig
) -> dict:
    question, images = batch_item(line, base)
    session = chat.session(template, system, config)
    for image in images:
        session.upload_img(image)
    session.ask(question)
    answer = session.answer()
    return {**line_id(line), **result_record(session, answer)}


def line_id(line: str) -> dict:
    """{"id": ...} when the line is a JSON object with an id (echoed on answers and errors)."""
    try:
        item = json.loads(line)
    except ValueError:
        return {}
    return {"id": item["id"]} if isinstance(item, dict) and "id" in item else {}
