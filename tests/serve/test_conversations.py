"""Stored conversations (`/v1/conversations`, a vlchat extension) over real `vlchat serve` subprocesses.

CRUD, replies (JSON and SSE), bad inputs, a restart, and a SIGKILL in the middle of streamed
answers: the SQLite file must pass `PRAGMA integrity_check`, every committed message must survive
unchanged, and an interrupted answer must leave no partial assistant message behind.
The tiny random model answers: its text is noise, so only storage and protocol are checked.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLES
from PIL import Image
from serve_helpers import Server, data_url, tiny_model_file  # noqa: F401 (fixtures)

from vlchat.images import image_key

SHAPES = EXAMPLES / "shapes.png"
QUICK = {"max_tokens": 8}
# Greedy answers of the tiny random model open with newlines (stored stripped: empty); sampled ones are words.
SAMPLED = {"temperature": 1.0, "seed": 0}
LONG = 400  # tokens: several seconds for the tiny model; the tiny LM's context window is 512

# --- helpers -----------------------------------------------------------------------------------


def start(home: Path, model_file: Path) -> Server:
    return Server(home, "--model", str(model_file))


def image_part(path: Path = SHAPES) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    return response.json()


def create(client: httpx.Client, **body) -> dict:
    return ok(client.post("/v1/conversations", json=body))


def get(client: httpx.Client, cid: str) -> dict:
    return ok(client.get(f"/v1/conversations/{cid}"))


def reply(client: httpx.Client, cid: str, **body) -> dict:
    return ok(client.post(f"/v1/conversations/{cid}/messages", json=body))


def listed(client: httpx.Client, **params) -> list[dict]:
    body = ok(client.get("/v1/conversations", params=params))
    assert body["object"] == "list"
    return body["data"]


def roles(conversation: dict) -> list[str]:
    return [m["role"] for m in conversation["messages"]]


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == "text")


def answer(completion: dict) -> str:
    return completion["choices"][0]["message"]["content"]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An OpenAI-style error object with `status`."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_data(lines) -> Iterator[str]:
    """The `data:` payloads of SSE lines, lazily (a client may stop reading midway)."""
    return (line[len("data: ") :] for line in lines if line.startswith("data: "))


def stream_reply(client: httpx.Client, cid: str, **body) -> list[str]:
    with client.stream("POST", f"/v1/conversations/{cid}/messages", json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_data(response.iter_lines()))


def deltas(payloads: list[str]) -> str:
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finished(payloads: list[str]) -> bool:
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    return "[DONE]" in payloads or any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


def read_words(payloads: Iterator[str], words: int = 3) -> list[str]:
    """SSE payloads until their text holds `words` words; the caller holds `payloads` while the
    stream should stay open (a dropped iterator closes the connection: the client is gone)."""
    received = []
    for payload in payloads:
        received.append(payload)
        if len(deltas(received).split()) >= words:
            break
    return received


def require(condition: bool, what: str) -> None:
    """A precondition of an xfail test: RuntimeError, so it fails loudly instead of passing as the xfail."""
    if not condition:
        raise RuntimeError(f"test setup went wrong: {what}")


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def server(tiny_model_file, tmp_path_factory):
    # One request decodes at a time, so a test can queue replies behind a long answer.
    s = Server(tmp_path_factory.mktemp("conversations-home"), "--model", str(tiny_model_file), "--max-batch", "1")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- CRUD ----------------------------------------------------------------------------------------


def test_create_list_get_patch_image_delete(client):
    first = create(
        client,
        system="Answer in one word.",
        messages=[
            {"role": "user", "content": [image_part(), {"type": "text", "text": "Which shapes are in this picture?"}]}
        ],
    )
    second = create(client, title="Empty one")
    assert first["id"].startswith("conv_") and first["id"] != second["id"]
    assert first["title"] == "Which shapes are in this picture?"  # auto-titled from the first user text
    assert (first["system"], first["template"], first["settings"]) == ("Answer in one word.", None, {})
    [message] = first["messages"]
    assert message["role"] == "user"
    image, text = message["parts"]
    assert text == {"type": "text", "text": "Which shapes are in this picture?"}
    assert image["type"] == "image" and len(image["key"]) == 64 and int(image["key"], 16) >= 0

    assert get(client, first["id"]) == first
    ids = [c["id"] for c in listed(client)]
    assert ids.index(second["id"]) < ids.index(first["id"])  # newest first
    counts = {c["id"]: c["message_count"] for c in listed(client)}
    assert (counts[first["id"]], counts[second["id"]]) == (1, 0)
    assert "messages" not in listed(client)[0]
    assert [c["id"] for c in listed(client, limit=1, offset=ids.index(first["id"]))] == [first["id"]]

    patched = ok(client.patch(f"/v1/conversations/{first['id']}", json={"title": "Shapes"}))
    assert patched["title"] == "Shapes" and patched["messages"] == first["messages"]
    assert get(client, first["id"])["title"] == "Shapes"
    assert listed(client)[0]["id"] == first["id"]  # updated most recently

    png = client.get(f"/v1/images/{image['key']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    served = Image.open(io.BytesIO(png.content))
    assert image_key(served) == image["key"]  # content-addressed by its pixels
    assert served.convert("RGB").tobytes() == Image.open(SHAPES).convert("RGB").tobytes()
    assert_error(client.get(f"/v1/images/{'0' * 64}"), 404, "image_not_found")

    deleted = ok(client.delete(f"/v1/conversations/{first['id']}"))
    assert deleted == {"id": first["id"], "object": "conversation.deleted", "deleted": True}
    error = assert_error(client.get(f"/v1/conversations/{first['id']}"), 404, "conversation_not_found")
    assert error["type"] == "not_found_error" and error["param"] == "conversation_id"
    assert_error(client.delete(f"/v1/conversations/{first['id']}"), 404, "conversation_not_found")
    assert first["id"] not in [c["id"] for c in listed(client)]
    assert get(client, second["id"])["title"] == "Empty one"


def test_unknown_conversation_is_404(client):
    missing = "/v1/conversations/conv_00000000000000000000000000000000"
    assert_error(client.get(missing), 404, "conversation_not_found")
    assert_error(client.patch(missing, json={"title": "x"}), 404, "conversation_not_found")
    assert_error(client.delete(missing), 404, "conversation_not_found")
    assert_error(client.post(f"{missing}/messages", json={"content": "hi"}), 404, "conversation_not_found")


# --- replies -------------------------------------------------------------------------------------


def test_reply_is_stored_sees_history_and_regenerates(client):
    cid = create(client, system="Answer in one word.")["id"]
    question = [image_part(), {"type": "text", "text": "What is this?"}]
    first = reply(client, cid, content=question, **QUICK, **SAMPLED)
    assert first["object"] == "chat.completion" and first["model"] == "vlchat-tiny"
    assert first["choices"][0]["finish_reason"] in ("stop", "length")
    assert first["usage"]["completion_tokens"] > 0
    stored = get(client, cid)
    assert roles(stored) == ["user", "assistant"]
    assert [p["type"] for p in stored["messages"][0]["parts"]] == ["image", "text"]
    assert text_of(stored["messages"][1]) == answer(first).strip() != ""

    second = reply(client, cid, content="And which colours?", **QUICK, **SAMPLED)
    stored = get(client, cid)
    assert roles(stored) == ["user", "assistant", "user", "assistant"]
    assert text_of(stored["messages"][3]) == answer(second).strip()
    # The reply's prompt is the whole stored history: chat completions over it count the same tokens.
    history = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": text_of(stored["messages"][1])},
        {"role": "user", "content": "And which colours?"},
    ]
    same = ok(client.post("/v1/chat/completions", json={"model": "vlchat-tiny", "messages": history, "max_tokens": 1}))
    assert second["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]

    again = reply(client, cid, regenerate=True, max_tokens=8, temperature=1.0, seed=1)
    regenerated = get(client, cid)
    assert roles(regenerated) == ["user", "assistant", "user", "assistant"]  # replaced, not appended
    assert regenerated["messages"][:3] == stored["messages"][:3]
    assert text_of(regenerated["messages"][3]) == answer(again).strip()
    assert again["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]  # the same question again


def test_streamed_reply_is_stored(client):
    cid = create(client)["id"]
    payloads = stream_reply(
        client, cid, content="Tell me a story.", max_tokens=24, stream_options={"include_usage": True}, **SAMPLED
    )
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")
    ] == ["length"]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24
    streamed = deltas(payloads)
    stored = get(client, cid)
    assert roles(stored) == ["user", "assistant"]
    assert text_of(stored["messages"][0]) == "Tell me a story."
    assert text_of(stored["messages"][1]) == streamed.strip() != ""


def test_client_that_stops_streaming_keeps_the_partial_answer(client, server):
    cid = create(client)["id"]
    with client.stream(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": "Go on and on.", "stream": True, "max_tokens": LONG, **SAMPLED},
    ) as response:
        assert response.status_code == 200
        payloads = sse_data(response.iter_lines())  # held: a dropped iterator closes the connection
        received = read_words(payloads)
    assert not finished(received)
    stored = wait_for(lambda: (c := get(client, cid)) and roles(c) == ["user", "assistant"] and c)
    assert stored, f"no partial answer stored: {get(client, cid)}"
    partial = text_of(stored["messages"][1])
    assert partial.startswith(deltas(received).strip())
    assert wait_for(lambda: server.health()["batch"]["active"] == 0), "the stopped answer kept generating"
    reply(client, cid, content="Shorter, please.", **QUICK)
    assert roles(get(client, cid)) == ["user", "assistant"] * 2


def test_conversation_continues_after_a_client_stops_before_any_text(client, server):
    cid = create(client)["id"]
    with client.stream(
        "POST", f"/v1/conversations/{cid}/messages", json={"content": "Hello?", "stream": True, "max_tokens": LONG}
    ) as response:
        require(response.status_code == 200, f"stream: {response.status_code}")
        payloads = sse_data(response.iter_lines())
        received = [next(payloads), next(payloads)]
    # Greedy answers open with newlines: the client stopped before any visible text.
    require(deltas(received).strip() == "" and not finished(received), f"received {received}")
    require(wait_for(lambda: server.health()["batch"]["active"] == 0), "the stopped answer kept generating")
    require(roles(get(client, cid)) == ["user"], f"stored {get(client, cid)}")  # a blank partial is not kept
    reply(client, cid, content="Are you there?", **QUICK)
    stored = get(client, cid)
    assert roles(stored)[-1] == "assistant" and "Are you there?" in [text_of(m) for m in stored["messages"]]


def test_a_reply_during_a_streamed_answer_keeps_the_conversation_well_formed(client, server):
    """A second reply (a second tab, a double submit) while the first answer still streams is
    refused with 409 (one answer per conversation at a time); nothing breaks."""
    cid = create(client)["id"]
    with client.stream(
        "POST",
        f"/v1/conversations/{cid}/messages",
        json={"content": "First question.", "stream": True, "max_tokens": LONG, **SAMPLED},
    ) as response:
        assert response.status_code == 200
        payloads = sse_data(response.iter_lines())  # held: a dropped iterator closes the connection
        received = read_words(payloads)
        assert not finished(received) and server.health()["batch"]["active"] == 1
        second = client.post(f"/v1/conversations/{cid}/messages", json={"content": "Second question.", **QUICK})
        assert_error(second, 409)
    stored = wait_for(lambda: (c := get(client, cid)) and roles(c) == ["user", "assistant"] and c)  # stopped: kept
    assert stored and text_of(stored["messages"][0]) == "First question.", get(client, cid)
    assert wait_for(lambda: server.health()["batch"]["active"] == 0)
    reply(client, cid, content="Third question.", **QUICK)
    assert [text_of(m) for m in get(client, cid)["messages"] if m["role"] == "user"] == [
        "First question.",
        "Third question.",
    ]


def test_a_second_reply_queued_for_the_same_conversation_is_409(client, server):
    """Two replies to one conversation while the server is busy with another: the first waits in
    the queue, the second is refused at once (409), and the first is stored in full."""
    busy, cid = create(client)["id"], create(client)["id"]
    results: dict[str, httpx.Response] = {}

    def ask(question: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results[question] = c.post(f"/v1/conversations/{cid}/messages", json={"content": question, **QUICK})

    first = threading.Thread(target=ask, args=("First?",))
    with client.stream(
        "POST",
        f"/v1/conversations/{busy}/messages",
        json={"content": "Keep busy.", "stream": True, "max_tokens": LONG, **SAMPLED},
    ) as response:
        require(response.status_code == 200, f"stream: {response.status_code}")
        payloads = sse_data(response.iter_lines())  # held: a dropped iterator closes the connection
        read_words(payloads)
        first.start()
        require(wait_for(lambda: server.health()["batch"]["waiting"] == 1), f"not queued: {server.health()}")
        assert_error(client.post(f"/v1/conversations/{cid}/messages", json={"content": "Second?", **QUICK}), 409)
    first.join(timeout=60)  # the busy answer was stopped with its stream: the queued reply runs
    require(results["First?"].status_code == 200, f"first: {results['First?'].text}")
    stored = get(client, cid)
    assert [text_of(m) for m in stored["messages"] if m["role"] == "user"] == ["First?"]
    assert roles(stored) == ["user", "assistant"]


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_are_refused_and_store_nothing(client, server):
    cid = create(client, messages=[{"role": "user", "content": "Hi"}])["id"]
    before = get(client, cid)
    images = server.home / "images"
    image_files = sorted(images.iterdir()) if images.exists() else []

    for content in ("", []):
        assert_error(client.post(f"/v1/conversations/{cid}/messages", json={"content": content}), 400)
    assert_error(client.post(f"/v1/conversations/{cid}/messages", json={}), 400)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for field, value in (("tools", tools), ("response_format", {"type": "json_object"})):
        body = {"content": "Hi", field: value}  # a reply cannot honour them: refused, not ignored
        error = assert_error(client.post(f"/v1/conversations/{cid}/messages", json=body), 400, "unsupported_field")
        assert error["param"] == field and "/v1/chat/completions" in error["message"], error
    for url in (
        "data:image/png;base64,AAAA",
        "data:image/png;base64,@@not base64@@",
        "data:text/plain;base64,aGk=",
        "data:image/png;base64,",
    ):
        bad = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        error = assert_error(client.post(f"/v1/conversations/{cid}/messages", json={"content": bad}), 400)
        assert error["param"] == "content[1].image_url", error
        assert_error(client.post("/v1/conversations", json={"messages": [{"role": "user", "content": bad}]}), 400)
    assert get(client, cid) == before
    assert (sorted(images.iterdir()) if images.exists() else []) == image_files

    count = len(listed(client, limit=1000))
    error = assert_error(client.post("/v1/conversations", json={"titel": "typo"}), 422, "invalid_schema")
    assert error["param"] == "titel"
    assert_error(client.post("/v1/conversations", json={"title": "x" * 201}), 422, "invalid_schema")
    assert_error(client.patch(f"/v1/conversations/{cid}", json={"titel": "typo"}), 422, "invalid_schema")
    assert_error(client.get("/v1/conversations", params={"limit": -1}), 422)
    assert len(listed(client, limit=1000)) == count
    assert get(client, cid) == before


# --- restart and SIGKILL -------------------------------------------------------------------------


def test_conversations_survive_a_restart(tiny_model_file, tmp_path):
    server = start(tmp_path, tiny_model_file)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            question = [image_part(), {"type": "text", "text": "Hi"}]
            a = create(c, system="Be brief.", messages=[{"role": "user", "content": question}])
            reply(c, a["id"], regenerate=True, **QUICK, **SAMPLED)
            reply(c, a["id"], content="More?", **QUICK, **SAMPLED)
            b = create(c, title="Second", settings={"temperature": 0.5})
            before = (listed(c), {x["id"]: get(c, x["id"]) for x in (a, b)})
    finally:
        server.stop()  # SIGTERM: a clean shutdown
    server = start(tmp_path, tiny_model_file)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert (listed(c), {x["id"]: get(c, x["id"]) for x in (a, b)}) == before
            key = before[1][a["id"]]["messages"][0]["parts"][0]["key"]
            assert c.get(f"/v1/images/{key}").status_code == 200
            reply(c, a["id"], content="Still there?", **QUICK)
            assert roles(get(c, a["id"])) == ["user", "assistant"] * 3
    finally:
        server.stop()


@pytest.fixture(scope="module")
def killed(tiny_model_file, tmp_path_factory):
    """A server SIGKILLed while it streams two answers, and a new server on the same home.

    Three conversations with two stored replies each (one opens with an image); two of them get a
    long streamed answer that is still generating when the kill comes.
    """
    home = tmp_path_factory.mktemp("killed-home")
    server = start(home, tiny_model_file)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            question = [image_part(), {"type": "text", "text": "Shapes?"}]
            kept = create(c, system="Be brief.", messages=[{"role": "user", "content": question}])
            ids = [kept["id"], create(c, system="Be brief.")["id"], create(c)["id"]]
            reply(c, ids[0], regenerate=True, **QUICK, **SAMPLED)
            reply(c, ids[0], content="Colours?", **QUICK, **SAMPLED)
            for i, cid in enumerate(ids[1:]):
                for turn in ("Hello.", "How are you?"):
                    reply(c, cid, content=f"{turn} ({i})", **QUICK, **SAMPLED)
            before = {cid: get(c, cid) for cid in ids}
            listed_before = listed(c)
            assert all(roles(conv) == ["user", "assistant"] * 2 for conv in before.values())

            asked = {ids[1]: "Tell me everything.", ids[2]: "Tell me more."}
            long = {"stream": True, "max_tokens": LONG, **SAMPLED}
            received: dict[str, list[str]] = {}
            url = "/v1/conversations/{}/messages".format
            with (
                c.stream("POST", url(ids[1]), json={"content": asked[ids[1]], **long}) as one,
                c.stream("POST", url(ids[2]), json={"content": asked[ids[2]], **long}) as two,
            ):
                assert one.status_code == two.status_code == 200
                streams = {ids[1]: one.iter_lines(), ids[2]: two.iter_lines()}
                for cid, lines in streams.items():  # both answers are generating (one decode batch)
                    received[cid] = []
                    while len(deltas(received[cid]).split()) < 3:
                        received[cid] += list(sse_data([next(lines)]))
                assert server.health()["batch"]["active"] == 2
                server.kill()
                for cid, lines in streams.items():  # whatever the server sent before dying
                    try:
                        for payload in sse_data(lines):
                            received[cid].append(payload)
                    except httpx.HTTPError:
                        pass
    finally:
        server.stop()

    with sqlite3.connect(home / "vlchat.db") as db:  # the file as the kill left it (WAL recovery only)
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        foreign = db.execute("PRAGMA foreign_key_check").fetchall()
        rows = db.execute(
            "SELECT conversation_id, position, role, parts FROM messages ORDER BY conversation_id, position"
        ).fetchall()
    db.close()
    server = start(home, tiny_model_file)
    yield {
        "server": server,
        "ids": ids,
        "before": before,
        "listed_before": listed_before,
        "received": received,
        "integrity": integrity,
        "foreign": foreign,
        "rows": rows,
        "asked": asked,
    }
    server.stop()


def test_kill_mid_stream_leaves_a_sound_store(killed):
    ids, before, asked = killed["ids"], killed["before"], killed["asked"]
    for cid in ids[1:]:  # the kill came mid-answer, else this test proves nothing
        assert not finished(killed["received"][cid]), (
            f"the answer ended before the kill ({len(killed['received'][cid])} chunks): make it longer"
        )
    assert killed["integrity"] == ["ok"] and killed["foreign"] == []
    by_conversation: dict[str, list] = {}
    for cid, position, role, parts in killed["rows"]:
        by_conversation.setdefault(cid, []).append((position, role, json.loads(parts)))
    for rows in by_conversation.values():
        assert [r[0] for r in rows] == list(range(len(rows)))  # no gaps, no duplicates

    with httpx.Client(base_url=killed["server"].url, timeout=60) as c:
        after = {cid: get(c, cid) for cid in ids}
        assert after[ids[0]] == before[ids[0]]  # untouched: byte for byte, timestamps included
        for cid in ids[1:]:
            # Committed history intact; the user message stored when generation started; no partial answer.
            assert after[cid]["messages"][:4] == before[cid]["messages"]
            assert roles(after[cid]) == ["user", "assistant"] * 2 + ["user"]
            assert after[cid]["messages"][4]["parts"] == [{"type": "text", "text": asked[cid]}]
            assert {k: v for k, v in after[cid].items() if k not in ("messages", "updated")} == {
                k: v for k, v in before[cid].items() if k not in ("messages", "updated")
            }
        counts = {x["id"]: x["message_count"] for x in listed(c)}
        assert counts == {x["id"]: x["message_count"] + (x["id"] in asked) for x in killed["listed_before"]}
        key = after[ids[0]]["messages"][0]["parts"][0]["key"]
        assert c.get(f"/v1/images/{key}").status_code == 200


def test_kill_then_regenerate_answers_the_interrupted_message(killed):
    cid, before = killed["ids"][2], killed["before"][killed["ids"][2]]
    with httpx.Client(base_url=killed["server"].url, timeout=60) as c:
        payloads = stream_reply(c, cid, regenerate=True, **QUICK, **SAMPLED)
        assert payloads[-1] == "[DONE]"
        stored = get(c, cid)
        assert stored["messages"][:4] == before["messages"]
        assert roles(stored) == ["user", "assistant"] * 3
        assert text_of(stored["messages"][4]) == killed["asked"][cid]
        assert text_of(stored["messages"][5]) == deltas(payloads).strip()
        reply(c, cid, content="Thanks.", **QUICK)
        assert roles(get(c, cid)) == ["user", "assistant"] * 4


def test_kill_then_a_new_message_continues_the_conversation(killed):
    cid, before = killed["ids"][1], killed["before"][killed["ids"][1]]
    with httpx.Client(base_url=killed["server"].url, timeout=60) as c:
        reply(c, cid, content="Are you still there?", **QUICK)
        stored = get(c, cid)
        assert stored["messages"][:4] == before["messages"]
        assert roles(stored)[-1] == "assistant"
        assert text_of(stored["messages"][-2]) == "Are you still there?"


def test_no_conversation_route_shows_a_server_path(client, server):
    """Images are exposed by key and URL only; the store's folder never appears in any answer."""
    made = create(client, title="paths", messages=[{"role": "user", "content": [image_part()]}])
    cid = made["id"]
    reply(client, cid, content=[image_part(EXAMPLES / "coffee.jpg"), {"type": "text", "text": "and this?"}], **QUICK)
    answers = {
        "create": made,
        "get": get(client, cid),
        "list": ok(client.get("/v1/conversations")),
        "patch": ok(client.patch(f"/v1/conversations/{cid}", json={"title": "renamed"})),
        "export json": client.get(f"/v1/conversations/{cid}/export?format=json").text,
        "export markdown": client.get(f"/v1/conversations/{cid}/export?format=markdown").text,
    }
    home = str(server.home.resolve())
    for route, answer in answers.items():
        text = answer if isinstance(answer, str) else json.dumps(answer)
        assert home not in text and '"path"' not in text and "images/" not in text.replace("/v1/images/", ""), route
    images = [part for m in get(client, cid)["messages"] for part in m["parts"] if part["type"] == "image"]
    assert len(images) == 2
    for part in images:
        assert set(part) == {"type", "key", "url"} and part["url"] == f"/v1/images/{part['key']}"
        served = client.get(part["url"])
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
