"""Server-side tools (`vlchat_tools`, serve/agent_serving.py) over a real `vlchat serve` with the tiny
model: a forced first call (`vlchat_tool_choice`), its result and the answer, whole and streamed (the
openai package's chunk type still reads the chunks), stored with a conversation's reply, and 400s."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import httpx
import openai
import pytest
from conftest import EXAMPLES, tiny_config
from openai.types.chat import ChatCompletionChunk
from serve_helpers import Server, data_url

MODEL = "vlchat-tiny"


@pytest.fixture(scope="module")
def tiny_server(tiny_lm_dir, tmp_path_factory):
    """The tiny model with a 2048-token window (the tools' schemas alone take ~350 tokens of 512)."""
    lm = tmp_path_factory.mktemp("tiny-lm-2048")
    shutil.copytree(tiny_lm_dir, lm, dirs_exist_ok=True)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    model = lm / "tiny.json"
    model.write_text(json.dumps(asdict(tiny_config(lm))))
    server = Server(tmp_path_factory.mktemp("agent-home"), "--model", str(model), "--max-tokens", "16")
    yield server
    server.stop()


def ask(image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": "What does it say?"}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(EXAMPLES / "shapes.png")}})
    return [{"role": "user", "content": content}]


FORCED = {"vlchat_tools": ["read_text"], "vlchat_tool_choice": "read_text", "vlchat_max_steps": 1, "max_tokens": 40}


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=300)


def check_steps(steps: list[dict]) -> None:
    call, observation = steps
    assert call["type"] == "tool_call" and call["name"] == "read_text" and call["step"] == 1
    assert json.loads(call["arguments"])["image"] == "image_1"  # the grammar allows only real names
    assert observation["type"] == "observation" and observation["tool_call_id"] == call["id"]
    assert observation["tool"] == "read_text" and "content" in observation


def test_a_forced_call_its_result_and_the_answer(tiny_server):
    response = post(tiny_server, {"messages": ask(), **FORCED})
    assert response.status_code == 200, response.text
    body = response.json()
    check_steps(body["vlchat_steps"])
    choice = body["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 300 and usage["prompt_tokens_details"]["cached_tokens"] > 300  # step 2 reused
    assert openai.types.chat.ChatCompletion.model_validate(body).choices[0].message.role == "assistant"


def test_streamed_steps_arrive_between_the_words(tiny_server):
    with httpx.stream(
        "POST",
        f"{tiny_server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ask(), "stream": True, "stream_options": {"include_usage": True}, **FORCED},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    steps = [c["vlchat_step"] for c in chunks if "vlchat_step" in c]
    check_steps(steps)
    assert all(c["choices"] == [] for c in chunks if "vlchat_step" in c)
    finish = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finish) == 1 and finish[0] > max(i for i, c in enumerate(chunks) if "vlchat_step" in c)
    assert chunks[-1]["usage"]["prompt_tokens"] > 300
    for line in lines[:-1]:
        ChatCompletionChunk.model_validate_json(line)  # the package's own type accepts them


def test_a_reply_in_a_stored_conversation_keeps_its_steps(tiny_server):
    created = httpx.post(f"{tiny_server.url}/v1/conversations", json={}, timeout=30).json()
    url = f"{tiny_server.url}/v1/conversations/{created['id']}"
    body = {"content": ask()[0]["content"], **FORCED}
    response = httpx.post(f"{url}/messages", json=body, timeout=300)
    assert response.status_code == 200, response.text
    check_steps(response.json()["vlchat_steps"])
    stored = httpx.get(url, timeout=30).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["parts"][-1]["type"] == "tool_call" and stored[1]["parts"][-1]["name"] == "read_text"
    assert stored[2]["parts"][0]["type"] == "tool_result" and stored[2]["parts"][0]["name"] == "read_text"
    follow = httpx.post(f"{url}/messages", json={"content": "Thanks!", "max_tokens": 4}, timeout=300)
    assert follow.status_code == 200, follow.text  # the stored steps render as a valid prompt again


BAD = {
    "with client tools": (
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "vlchat_tools",
        "not both",
    ),
    "unknown tool": ({"vlchat_tools": ["python"]}, "vlchat_tools", "this server offers: read_text, image_labels, zoom"),
    "empty list": ({"vlchat_tools": []}, "vlchat_tools", "(none given)"),
    "choice not among them": ({"vlchat_tool_choice": "zoom"}, "vlchat_tool_choice", "one of vlchat_tools"),
    "max steps": ({"vlchat_max_steps": 0}, "vlchat_max_steps", "between 1 and 50"),
    "beams": ({"num_beams": 2}, "num_beams", "num_beams > 1"),
    "response format": ({"response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
}


@pytest.mark.parametrize("extra, param, message", BAD.values(), ids=BAD.keys())
def test_bad_requests_are_400s(tiny_server, extra, param, message):
    body = {"messages": ask(image=False), "vlchat_tools": ["read_text"], **extra}
    response = post(tiny_server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_choice_without_tools_is_a_400(tiny_server):
    response = post(tiny_server, {"messages": ask(image=False), "vlchat_tool_choice": "required"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "vlchat_tool_choice"
