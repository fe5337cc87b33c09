"""The OpenAI-compatible API over real uvicorn servers, through the official `openai` client.

Error paths and limits run against the tiny model (fast); chat, images, multi-turn, streaming
and prefix reuse against the real default model.
"""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import EXAMPLES
from PIL import Image
from serve_helpers import Server, data_url, default_server, tiny_model_file, tiny_server  # noqa: F401 (fixtures)


def client(server, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def image_message(text: str, *paths) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(path)}} for path in paths]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def post(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# --- the real model -------------------------------------------------------------------------


def test_plain_chat(default_server):
    reply = client(default_server).chat.completions.create(
        model="vlchat-default", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.id.startswith("chatcmpl-") and reply.model == "vlchat-default" and reply.created > 0
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_image_as_data_url(default_server):
    api = client(default_server)
    text_only = api.chat.completions.create(
        model="vlchat-default", max_tokens=8, messages=[{"role": "user", "content": "What colour is the circle?"}]
    )
    with_image = api.chat.completions.create(
        model="vlchat-default",
        max_tokens=8,
        messages=[image_message("What colour is the circle?", EXAMPLES / "shapes.png")],
    )
    assert with_image.choices[0].message.content.strip()
    # 49 image embeddings plus the <Img></Img> tags sit in the prompt
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens >= 49


def test_multi_turn_with_two_images_reuses_the_prefix(default_server):
    api = client(default_server)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        image_message("What shapes do you see?", EXAMPLES / "shapes.png"),
    ]
    first = api.chat.completions.create(model="vlchat-default", messages=messages, max_tokens=24)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        image_message("And what is in this second picture?", EXAMPLES / "coffee.jpg"),
    ]
    second = api.chat.completions.create(model="vlchat-default", messages=messages, max_tokens=24)
    assert second.choices[0].message.content.strip()
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 49
    # the follow-up prefilled only its new tokens: at least the whole first prompt came from the cache
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_repeated_request_gives_the_same_greedy_answer_from_the_cache(default_server):
    # A question the model is trained for: on a photo (which it knows nothing about) its first
    # tokens are near ties, and a bfloat16 prefill of one token after the cache rounds differently
    # from a full one (tests/chat/test_engine.py checks exactness in float32).
    body = dict(
        model="vlchat-default",
        max_tokens=16,
        messages=[image_message("What colour is the circle?", EXAMPLES / "shapes.png")],
    )
    api = client(default_server)
    first, again = api.chat.completions.create(**body), api.chat.completions.create(**body)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_streaming_with_usage(default_server):
    stream = client(default_server).chat.completions.create(
        model="vlchat-default",
        messages=[image_message("What is in the picture?", EXAMPLES / "chelsea.jpg")],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip() and finishes in (["stop"], ["length"])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_client_disconnect_stops_generation(default_server):
    body = {
        "model": "vlchat-default",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 600,
        "min_tokens": 600,
        "stream": True,
    }
    with httpx.stream("POST", f"{default_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                break  # leave mid-answer: closing the connection cancels the job
    deadline = time.monotonic() + 10  # 600 tokens would take ~15 s; the row must go well before
    while default_server.health()["batch"]["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert default_server.health()["batch"]["active"] == 0


# --- errors and limits (tiny model) -----------------------------------------------------------


def test_bad_requests_are_400(tiny_server):
    ok = {"model": "vlchat-tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(tiny_server, {**ok, "messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role")
    corrupt = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
    }
    assert_error(post(tiny_server, {**ok, "messages": [corrupt]}), 400, "messages[0].content[0].image_url")
    assert_error(post(tiny_server, {**ok, "temperature": -1}), 400)
    assert_error(post(tiny_server, {**ok, "n": 2}), 400, "n")
    assert_error(post(tiny_server, {**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(post(tiny_server, {**ok, "messages": [{"role": "assistant", "content": "hi"}]}), 400)
    assert_error(post(tiny_server, {**ok, "template": "nope"}), 400)
    remote = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
    assert "allow-remote-images" in assert_error(post(tiny_server, {**ok, "messages": [remote]}), 400)["message"]
    assert assert_error(post(tiny_server, {**ok, "max_tokens": 100000}), 400)["code"] == "context_length_exceeded"


def test_images_from_the_allowed_directory_only(tiny_server):
    def ask(url):
        return post(
            tiny_server,
            {
                "model": "vlchat-tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
                    }
                ],
            },
        )

    assert ask("shapes.png").status_code == 200
    assert_error(ask("../server.log"), 400)
    assert_error(ask("/etc/passwd"), 400)


def test_unknown_model_and_route_are_404(tiny_server):
    with pytest.raises(openai.NotFoundError) as caught:
        client(tiny_server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    assert_error(httpx.get(f"{tiny_server.url}/v1/nothing-here"), 404)


def test_too_large_is_413(tiny_server):
    big = {"model": "vlchat-tiny", "messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}
    assert_error(post(tiny_server, big), 413)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8))
    png = io.BytesIO()
    noise.save(png, "PNG")  # ~1.9 MB: over the server's 1 MB image limit, under its 2 MB body limit
    path = tiny_server.home / "noise.png"
    path.write_bytes(png.getvalue())
    assert_error(post(tiny_server, {"model": "vlchat-tiny", "messages": [image_message("?", path)]}), 413)


def test_schema_violations_are_422(tiny_server):
    assert_error(post(tiny_server, {"model": "vlchat-tiny"}), 422, "messages")
    assert_error(post(tiny_server, {"model": "vlchat-tiny", "messages": "hi"}), 422)
    bad_part = {"role": "user", "content": [{"type": "video", "video": "x"}]}
    assert_error(post(tiny_server, {"model": "vlchat-tiny", "messages": [bad_part]}), 422)
    assert_error(
        post(
            tiny_server, {"model": "vlchat-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}
        ),
        422,
        "max_tokens",
    )


def test_concurrent_requests_are_batched(default_server):
    body = {
        "model": "vlchat-default",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 60,
        "min_tokens": 60,
    }
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(post(default_server, body).status_code)) for _ in range(4)
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [200] * 4
    assert default_server.health()["batch"]["peak"] >= 2


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """The default model (slow enough to keep a request running) behind an API key, one request
    at a time, one waiting, a 3 s timeout."""
    server = Server(
        tmp_path_factory.mktemp("strict"),
        "--api-key",
        "s3cret",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--timeout",
        "3",
    )
    yield server
    server.stop()


KEY = {"Authorization": "Bearer s3cret"}
LONG = {
    "model": "vlchat-default",
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 450,
    "min_tokens": 450,
}  # ~10 s of decoding on 2 cores
SHORT = {"model": "vlchat-default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_api_key(strict_server):
    with pytest.raises(openai.AuthenticationError):
        client(strict_server).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(strict_server, api_key="wrong").models.list()
    assert [m.id for m in client(strict_server, api_key="s3cret").models.list()] == ["vlchat-default"]
    assert_error(httpx.get(f"{strict_server.url}/v1/models"), 401)
    assert_error(post(strict_server, SHORT, headers={"Authorization": "Bearer s3cre"}), 401)
    assert httpx.get(f"{strict_server.url}/health").status_code == 200  # readiness stays open


def test_full_queue_is_429(strict_server):
    statuses = []
    waiting = threading.Thread(target=lambda: statuses.append(post(strict_server, SHORT, headers=KEY).status_code))
    with httpx.stream(
        "POST", f"{strict_server.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=KEY, timeout=60
    ) as running:
        assert running.status_code == 200  # headers come once the request is running
        waiting.start()
        deadline = time.monotonic() + 10
        while strict_server.health()["batch"]["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assert_error(post(strict_server, SHORT, headers=KEY), 429)["code"] == "queue_full"
    waiting.join()  # leaving the stream cancelled the running answer: the waiting one was served
    assert statuses == [200]


def test_a_request_past_the_timeout_is_504(strict_server):
    started = time.monotonic()
    assert assert_error(post(strict_server, LONG, headers=KEY), 504)["code"] == "timeout"
    assert time.monotonic() - started < 8


def test_503_while_the_model_loads(tmp_path):
    from fastapi.testclient import TestClient

    from vlchat.serve.server import build_app
    from vlchat.serve.serving import ServeConfig

    release = threading.Event()
    app = build_app(ServeConfig(home=tmp_path), lambda: release.wait(30) and None, "default")
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503
        error = assert_error(
            http.post(
                "/v1/chat/completions",
                json={"model": "vlchat-default", "messages": [{"role": "user", "content": "hi"}]},
            ),
            503,
        )
        assert error["code"] == "model_loading"
        release.set()


def test_503_from_a_real_server_while_it_prepares_the_model(tmp_path):
    """An empty $VLCHAT_HOME makes the server convert the packaged GGUF first (~15-35 s), so it
    is certainly still loading when asked."""
    server = Server(tmp_path, wait=False, env={"VLCHAT_HOME": str(tmp_path / "fresh-home")})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{server.url}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as caught:
            client(server).chat.completions.create(model="vlchat-default", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.body["code"] == "model_loading"
    finally:
        server.stop()


def test_serve_command_refuses_bad_options(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, words in [
            (["--port", port], "cannot listen"),
            (["--image-dir", str(tmp_path / "nope")], "not a folder"),
            (["--max-batch", "0"], "max-batch"),
            (["--model", "nope"], "unknown model"),
        ]:
            done = subprocess.run(
                [sys.executable, "-m", "vlchat.cli", "serve", "--home", str(tmp_path), *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
