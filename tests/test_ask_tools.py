"""`vlchat ask --tools FILE --tool-choice ...` and `--json-schema FILE` end to end (the default
model, as a subprocess), and their bad-input errors (exit 2, one line, before the model loads)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema_rs
import pytest
from conftest import REPO

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def vlchat(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vlchat.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=600, cwd=REPO)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "dup.json").write_text(json.dumps([WEATHER, WEATHER]))
    return tmp_path


def test_ask_prints_the_forced_call_as_json(files):
    question = "What's the weather like in Boston today?"
    result = vlchat("ask", "--tools", str(files / "tools.json"), "--tool-choice", "required", question)
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout.strip().splitlines()[-1])
    assert call["name"] == "get_current_weather" and call["id"].startswith("call_")
    jsonschema_rs.validate(WEATHER["function"]["parameters"], call["arguments"])


def test_ask_json_schema_answer_validates(files):
    result = vlchat("ask", "--json-schema", str(files / "schema.json"), "--max-new-tokens", "64", "Is Boston sunny?")
    assert result.returncode == 0, result.stderr
    schema = json.loads((files / "schema.json").read_text())
    jsonschema_rs.validate(schema, json.loads(result.stdout))


@pytest.mark.parametrize(
    "args,words",
    [
        (["--tools", "bad.json"], "cannot read tools file"),
        (["--tools", "dup.json"], "duplicate"),
        (["--tool-choice", "required"], "--tool-choice needs --tools"),
        (["--json-schema", "missing.json"], "cannot read JSON Schema file"),
    ],
)
def test_bad_tool_options_exit_2(files, args, words):
    args = [str(files / a) if a.endswith(".json") else a for a in args]
    result = vlchat("ask", *args, "hi")
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
