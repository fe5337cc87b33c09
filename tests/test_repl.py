"""`vlchat chat` end to end: the real console script reads its commands from stdin (3 model loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES

from vlchat.images import image_key, load_image

CHELSEA = EXAMPLES / "chelsea.jpg"
COFFEE = EXAMPLES / "coffee.jpg"


def chat(*lines: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`vlchat chat --max-new-tokens 8 ARGS` with `lines` typed on stdin (then end of input)."""
    script = Path(sys.executable).with_name("vlchat")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlchat.cli"]
    stdin = "".join(f"{line}\n" for line in lines)
    result = subprocess.run(
        command + ["chat", "--max-new-tokens", "8", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A conversation about two images, saved half-way, then a bad image, a bad command, a reset."""
    session_file = tmp_path_factory.mktemp("repl") / "s.json"
    result = chat(
        "What is this?",
        f"/image {COFFEE}",
        "And now?",
        f"/save {session_file}",
        "/image /no/such.png",
        "/bogus",
        "/reset",
        "Hello",
        "/exit",
        args=("-i", str(CHELSEA)),
    )
    return result, session_file


def test_chat_session(saved):
    result, _ = saved
    assert result.returncode == 0, result.stderr
    answers = [line.partition("vlchat> ")[2] for line in result.stdout.splitlines() if "vlchat> " in line]
    assert len(answers) == 3, result.stdout
    assert all(answer.strip() for answer in answers), result.stdout
    assert "(image added: " in result.stdout and "(new conversation)" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    assert "image not found: /no/such.png" in errors[0]
    assert "unknown command /bogus" in errors[1]


def test_saved_session_file(saved):
    result, session_file = saved
    assert session_file.exists(), result.stderr
    data = json.loads(session_file.read_text())
    assert data["format"] == 1
    messages = data["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first, second = messages[0]["parts"], messages[2]["parts"]
    chelsea = {"type": "image", "key": image_key(load_image(CHELSEA)), "path": str(CHELSEA.resolve())}
    coffee = {"type": "image", "key": image_key(load_image(COFFEE)), "path": str(COFFEE.resolve())}
    assert first == [chelsea, {"type": "text", "text": "What is this?"}]
    assert second == [coffee, {"type": "text", "text": "And now?"}]
    assert all(m["parts"][0]["type"] == "text" for m in messages[1::2])


def test_load_and_go_on(saved):
    _, session_file = saved
    result = chat(f"/load {session_file}", "What colour?", "/exit")
    assert result.returncode == 0, result.stderr
    assert f"loaded 4 messages from {session_file}" in result.stdout
    answers = [line for line in result.stdout.splitlines() if "vlchat> " in line]
    assert len(answers) == 1 and answers[0].partition("vlchat> ")[2].strip(), result.stdout


def test_end_of_input_quits_cleanly():
    result = chat("Hi")  # no /exit: stdin simply ends
    assert result.returncode == 0, result.stderr
    assert "vlchat> " in result.stdout
