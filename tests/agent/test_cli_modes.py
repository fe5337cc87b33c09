"""`vlchat agent`'s three modes (agent/cli.py) with a scripted model and the real built-in tools:
what one question, --json, a --batch file and the REPL print."""

from __future__ import annotations

import builtins
import json

import pytest
from agent_helpers import ScriptedChat, call
from conftest import EXAMPLES

from vlchat.agent import cli
from vlchat.agent.loop import AgentConfig
from vlchat.errors import VlchatError


def setup(script: list[str], tools: str = "python,zoom", **config) -> tuple[cli.AgentSetup, ScriptedChat]:
    chat = ScriptedChat(script)
    return cli.AgentSetup(lambda: chat, cli.tool_names(tools), AgentConfig(**config), None, None, None), chat


def test_one_question_shows_the_call_its_result_and_the_answer(capsys):
    agent_setup, chat = setup([call("python", '{"code": "6 * 7"}'), "It is 42."], tool_choice="required")
    cli.answer_one(agent_setup, "What is six times seven?", [], as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '[call 1] python {"code": "6 * 7"}'
    assert lines[1].startswith("[ok ") and '"result": "42"' in lines[1]
    assert lines[2] == "It is 42."
    assert chat.sessions[0].choices == ["required", "auto"]


def test_json_holds_the_answer_and_the_steps(capsys):
    script = [call("zoom", '{"image": "image_1", "box": [0, 0, 0.5, 0.5]}'), "A cat's ear."]
    agent_setup, _ = setup(script)
    cli.answer_one(agent_setup, "Look closer.", [EXAMPLES / "chelsea.jpg"], as_json=True)
    record = json.loads(capsys.readouterr().out)
    assert record["answer"] == "A cat's ear." and record["finish_reason"] == "stop"
    assert [s["type"] for s in record["steps"]] == ["tool_call", "observation"]
    assert record["steps"][1]["images"][0]["name"] == "image_2"
    assert set(record) == {"answer", "steps", "finish_reason", "forced_answer", "usage"}


def test_batch_answers_each_line_and_reports_bad_ones(tmp_path, capsys):
    (tmp_path / "cat.jpg").write_bytes((EXAMPLES / "chelsea.jpg").read_bytes())
    lines = [
        json.dumps({"id": "a", "image": "cat.jpg", "question": "What is it?"}),
        "{not json",
        json.dumps({"id": "c", "image": "missing.png", "question": "And this?"}),
        "",
        json.dumps({"question": "Compute."}),
    ]
    batch = tmp_path / "questions.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    script = ["A cat.", call("python", '{"code": "1 + 1"}'), "2."]
    agent_setup, chat = setup(script)
    cli.answer_batch(agent_setup, batch)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5]
    assert records[0]["id"] == "a" and records[0]["answer"] == "A cat." and records[0]["steps"] == []
    assert "not valid JSON" in records[1]["error"]
    assert records[2]["id"] == "c" and "missing.png" in records[2]["error"]
    assert records[3]["answer"] == "2." and records[3]["steps"][1]["content"] == '{"stdout": "", "result": "2"}'
    assert len(chat.sessions) == 2  # a fresh conversation per good line


def test_repl_carries_the_conversation_and_its_commands(monkeypatch, capsys):
    typed = iter(
        [
            f"/image {EXAMPLES / 'chelsea.jpg'}",
            "What is it?",
            "/image",
            "/bogus",
            "Compute.",
            "/reset",
            "Hi",
            "/exit",
        ]
    )
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    script = ["A cat.", call("python", '{"code": "2 ** 5"}'), "32.", "Hello."]
    agent_setup, chat = setup(script)
    cli.repl(agent_setup, [])
    captured = capsys.readouterr()
    assert "vlchat> A cat." in captured.out and "[call 1] python" in captured.out and "32." in captured.out
    assert "/image needs a file path" in captured.err and "unknown command /bogus" in captured.err
    assert len(chat.sessions) == 2  # /reset starts a new one
    first = chat.sessions[0]
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert first.messages[0].images  # /image went with the next question


@pytest.mark.parametrize(
    "spec, message",
    [("zoom,fly", "unknown tool 'fly'; choose from: read_text"), (",", "unknown tool (none given)")],
)
def test_bad_tool_names(spec, message):
    with pytest.raises(VlchatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.tool_names(spec)


def test_tool_names_all_and_order():
    assert cli.tool_names("all") == ["read_text", "image_labels", "zoom", "python", "arxiv_search"]
    assert cli.tool_names("zoom, read_text,zoom") == ["zoom", "read_text"]
    assert cli.registry_of(["zoom", "read_text"]).names == ["zoom", "read_text"]
