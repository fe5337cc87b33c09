"""The web UI end to end in real headless Chromium (Debian's /usr/bin/chromium via Playwright),
against a real `vlchat serve` with the default model. Screenshots go to test-output/webui/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLES, REPO
from serve_helpers import Server, default_server  # noqa: F401 (fixture)

CHROMIUM = os.environ.get("VLCHAT_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "test-output" / "webui"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, default_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(default_server.url)
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#max-tokens", "48")  # short answers keep the suite fast
    yield page
    context.close()


def ask(page, text: str) -> str:
    """Type a question, press Enter, wait for the streamed answer to finish; returns it."""
    answers = page.locator(".message.assistant").count()
    page.fill("#question", text)
    page.press("#question", "Enter")
    page.wait_for_selector("#stop:not([disabled])")  # streaming has started
    page.wait_for_selector("#send:not([disabled])")  # ... and ended
    assert page.locator(".message.assistant").count() == answers + 1, page.inner_text("#error")
    return page.locator(".message.assistant").last.inner_text()


def test_upload_ask_restart_text_chat_and_reload(page):
    page.set_input_files("#image-input", str(EXAMPLES / "shapes.png"))
    page.wait_for_selector("#attachments img")
    page.screenshot(path=SHOTS / "1-image-attached.png")
    first = ask(page, "What colour is the square?")
    assert first.strip()
    assert page.locator(".message.user img").count() == 1
    page.screenshot(path=SHOTS / "2-answered.png")
    page.click("#examples button >> nth=1")  # a second image, at a later turn
    page.wait_for_selector("#attachments img")
    assert ask(page, "And what is in this picture?").strip()
    assert page.locator(".message.user img").count() == 2

    page.click("#restart")
    assert page.locator(".message").count() == 0
    assert ask(page, "Hello! Who are you?").strip()
    page.screenshot(path=SHOTS / "3-text-only.png")

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    titles = page.locator("#conversations .open").all_inner_texts()
    assert any(t.startswith("What colour is the square") for t in titles), titles
    assert any(t.startswith("Hello! Who are you") for t in titles), titles
    page.locator("#conversations .open", has_text="What colour is the square").click()
    page.wait_for_selector(".message.user img")
    assert page.locator(".message.assistant").first.inner_text() == first
    assert page.locator(".message.user img").count() == 2
    page.screenshot(path=SHOTS / "4-restored.png")


def test_corrupt_upload_shows_an_error_and_the_server_keeps_serving(page, default_server, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes((EXAMPLES / "shapes.png").read_bytes()[:300])
    page.set_input_files("#image-input", str(bad))
    page.wait_for_selector("#attachments img")
    page.fill("#question", "What is this?")
    page.press("#question", "Enter")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "corrupt" in error.inner_text() or "not an image" in error.inner_text()
    assert "Traceback" not in page.content()
    assert page.locator(".message").count() == 0
    page.screenshot(path=SHOTS / "5-bad-upload.png")
    assert httpx.get(f"{default_server.url}/health").status_code == 200
    page.click("#attachments button")  # remove the broken image, ask again
    assert ask(page, "What is this?").strip()


def test_over_long_message_is_a_clear_error(page):
    page.fill("#question", "word " * 9000)
    page.press("#question", "Enter")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "context window" in error.inner_text()


def test_stop_keeps_the_partial_answer_and_regenerate_replaces_it(page, default_server):
    page.fill("#max-tokens", "512")
    page.fill("#min-tokens", "512")  # the default model answers in a few words: make this one long
    page.fill("#question", "Write a very long story about a cat who travels the world.")
    page.press("#question", "Enter")
    page.wait_for_function("document.querySelector('.message.assistant')?.textContent.length > 20")
    page.keyboard.press("Escape")  # stop, keyboard only
    page.wait_for_selector("#send:not([disabled])")
    partial = page.locator(".message.assistant").last.inner_text()
    assert partial.strip()
    page.wait_for_timeout(1500)  # the server notices the closed stream and stores what was said
    conversation = httpx.get(f"{default_server.url}/v1/conversations?limit=1").json()["data"][0]
    stored = httpx.get(f"{default_server.url}/v1/conversations/{conversation['id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert partial.strip().startswith(stored[1]["parts"][0]["text"][:20])

    page.fill("#max-tokens", "32")
    page.fill("#min-tokens", "0")
    page.click("#regenerate")
    page.wait_for_selector("#stop:not([disabled])")
    page.wait_for_selector("#send:not([disabled])")
    assert page.locator(".message.assistant").count() == 1
    stored = httpx.get(f"{default_server.url}/v1/conversations/{conversation['id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]


def test_persona_chinese_keyboard_only_and_export(page):
    page.select_option("#persona", "zhubajie")
    assert "猪八戒" in page.input_value("#system")
    page.focus("#question")
    page.keyboard.type("你好，师父在哪里？")
    page.keyboard.press("Enter")
    page.wait_for_selector("#stop:not([disabled])")
    page.wait_for_selector("#send:not([disabled])")
    assert "你好，师父在哪里？" in page.locator(".message.user").last.inner_text()
    assert page.locator(".message.assistant").last.inner_text().strip()
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert "猪八戒" in exported["system"] and exported["messages"][0]["parts"][0]["text"] == "你好，师父在哪里？"
    with page.expect_download() as download:
        page.click("#export-md")
    assert "**User:** 你好，师父在哪里？" in Path(download.value.path()).read_text(encoding="utf-8")
    page.screenshot(path=SHOTS / "6-persona-chinese.png")


def test_phone_width_and_example_images(page):
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.click("#examples button >> nth=0")
    page.wait_for_selector("#attachments img")
    assert ask(page, "What animal is this?").strip()
    page.click("#toggle-sidebar")
    page.wait_for_timeout(400)
    assert page.locator("#conversations .open").first.is_visible()
    page.screenshot(path=SHOTS / "7-phone.png", full_page=True)


def test_conversations_survive_a_server_restart(browser, tmp_path):
    """Sidebar conversations live in the server's SQLite store, not in the browser."""
    first = Server(tmp_path)
    try:
        page = browser.new_page()
        page.set_default_timeout(90_000)
        page.goto(first.url)
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#max-tokens", "32")
        answer = ask(page, "Remember the word pineapple.")
        page.close()
    finally:
        first.stop()
    second = Server(tmp_path)  # same store, new process (and a new port: no browser state carries over)
    try:
        page = browser.new_page()
        page.goto(second.url)
        page.wait_for_selector("body[data-ready=true]")
        page.locator("#conversations .open", has_text="Remember the word pineapple").click()
        page.wait_for_selector(".message.assistant")
        assert page.locator(".message.user").inner_text() == "Remember the word pineapple."
        assert page.locator(".message.assistant").inner_text() == answer
        page.close()
    finally:
        second.stop()


def test_every_control_is_reachable_with_the_tab_key(page):
    reached = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id || document.activeElement.className"))
    wanted = {
        "new-chat",
        "question",
        "add-image",
        "send",
        "regenerate",
        "restart",
        "export-md",
        "export-json",
        "persona",
        "system",
        "num-beams",
        "temperature",
        "top-p",
        "max-tokens",
        "min-tokens",
    }
    assert wanted <= reached, wanted - reached
    page.focus("#temperature")
    page.keyboard.press("ArrowRight")  # sliders move with the arrow keys
    assert page.input_value("#temperature") == "0.1"


def test_a_server_with_an_api_key_asks_for_it_once(browser, tmp_path):
    server = Server(tmp_path, "--api-key", "open sesame")
    try:
        page = browser.new_page()
        page.set_default_timeout(90_000)
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("open sesame")))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#max-tokens", "16")
        assert ask(page, "Hello?").strip()
        assert len(asked) == 1 and "API key" in asked[0]
        assert page.locator("#error").is_hidden()
        page.close()
    finally:
        server.stop()


def test_stored_tool_calls_and_results_are_rendered_and_exported(page, default_server):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": '{"location": "Boston"}'},
    }
    body = {
        "title": "Weather tools",
        "messages": [
            {"role": "user", "content": "Weather in Boston?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_current_weather", "content": '{"temperature": 22}'},
            {"role": "assistant", "content": "It is 22 degrees and sunny."},
        ],
    }
    created = httpx.post(f"{default_server.url}/v1/conversations", json=body, timeout=30)
    assert created.status_code == 200, created.text
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#conversations .open >> text=Weather tools")
    page.wait_for_selector(".tool-call")
    assert "calls get_current_weather" in page.inner_text(".tool-call")
    assert '{"location": "Boston"}' in page.inner_text(".tool-call code")
    assert '{"temperature": 22}' in page.inner_text(".message.tool .tool-result")
    page.screenshot(path=SHOTS / "9-tool-calls.png")
    exported = httpx.get(f"{default_server.url}/v1/conversations/{created.json()['id']}/export?format=markdown").text
    assert "*calls* `get_current_weather" in exported and "*result of* `get_current_weather`" in exported


def test_tools_switch_shows_a_forced_call_and_its_result(page):
    assert page.is_checked("#tools")  # on by default for the default model
    page.select_option("#tool-choice", "image_labels")  # it does not call tools by itself yet
    page.fill("#max-tokens", "96")
    page.set_input_files("#image-input", str(EXAMPLES / "chelsea.jpg"))
    page.wait_for_selector("#attachments img")
    page.fill("#question", "What animal is this?")
    page.press("#question", "Enter")
    page.wait_for_selector(".message.assistant .tool-call")  # streamed in while the answer is generated
    page.wait_for_selector("#send:not([disabled])")
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    call = page.locator(".message.assistant .tool-call").first
    assert "calls image_labels" in call.locator("summary").inner_text()
    assert '"image": "image_1"' in call.locator("code").text_content()
    result = page.locator(".message.tool .tool-result").first  # as stored: the result in a turn of its own
    assert "result of image_labels" in result.locator("summary").inner_text()
    page.screenshot(path=SHOTS / "10-agent-tools.png")
    result.locator("summary").click()  # collapsible
    assert result.evaluate("el => !el.open")
