"""Chat engine: KV reuse gives the same greedy answers, images are cached, context is fitted."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES, tiny_config

from vlchat.chat.engine import Chat, load_session, reusable_prefix
from vlchat.chat.messages import Image
from vlchat.chat.tools import ToolSpec
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError

GREEDY = GenerationConfig(max_new_tokens=12)
TURNS = ["What is in this image?", "What colour is it?", "Describe it in one word."]


def converse(chat, questions, images_at=None, reuse=True):
    """Ask each question in one session; with reuse=False, every turn replays history in a fresh session."""
    images_at = images_at or {0: [EXAMPLES / "chelsea.jpg"]}
    session, answers = chat.session(generation=GREEDY), []
    for turn, question in enumerate(questions):
        for path in images_at.get(turn, []):
            session.upload_img(path)
        session.ask(question)
        if not reuse:  # a fresh session with the same messages: nothing cached
            fresh = chat.session(generation=GREEDY)
            fresh.messages, fresh._images = list(session.messages), dict(session._images)
            session = fresh
        answers.append(session.answer())
    return session, answers


@pytest.fixture(scope="module")
def float32_chat():
    """The default model with its LM in float32. In bfloat16, prefilling a follow-up after a cache
    rounds differently from prefilling the whole history at once, which flips greedy choices
    between near-tied tokens (seen: "red" vs "black" on the third turn); float32 shows whether
    the cache itself is exact."""
    from dataclasses import replace

    from vlchat.config import ModelConfig
    from vlchat.model.vlm import load_model

    config = ModelConfig.from_name("default")
    return Chat(load_model(replace(config, lm=replace(config.lm, dtype="float32"))))


def test_greedy_identical_with_and_without_kv_reuse(float32_chat):
    reused, with_cache = converse(float32_chat, TURNS)
    fresh, without = converse(float32_chat, TURNS, reuse=False)
    assert with_cache == without
    assert reused.timings.reused_tokens > 0 and fresh.timings.reused_tokens == 0
    assert reused.timings.prompt_tokens == fresh.timings.prompt_tokens


def test_follow_up_prefills_only_new_tokens(default_chat):
    session, _ = converse(default_chat, TURNS[:2])
    new = session.timings.prompt_tokens - session.timings.reused_tokens
    assert new < 25, session.timings  # the question, its markers and the previous answer's end


def test_images_at_several_turns_and_text_only(tiny_chat):
    images = {0: [EXAMPLES / "chelsea.jpg"], 1: [EXAMPLES / "coffee.jpg", EXAMPLES / "chelsea.jpg"]}
    with_cache = converse(tiny_chat, TURNS, images)[1]
    assert with_cache == converse(tiny_chat, TURNS, images, reuse=False)[1]
    text_only = tiny_chat.session(generation=GREEDY)
    text_only.ask("Hello there")
    assert isinstance(text_only.answer(), str) and text_only.messages[-1].role == "assistant"


def test_a_first_image_in_a_later_turn_recomputes_the_prefix_with_the_adapter(tiny_model, tiny_adapted_model):
    """The LoRA adapter is on only once the conversation has an image: turn 1 (text) is the base
    LM's, turn 2 (the first image) cannot reuse turn 1's KV (computed without the adapter)."""
    chat = Chat(tiny_adapted_model)
    session = chat.session(generation=GREEDY)
    session.ask(TURNS[0])
    answers = [session.answer()]
    assert not session._state.adapter
    session.upload_img(EXAMPLES / "chelsea.jpg")
    session.ask(TURNS[1])
    answers.append(session.answer())
    assert session.timings.reused_tokens == 0 and session._state.adapter
    session.ask(TURNS[2])
    answers.append(session.answer())
    assert session.timings.reused_tokens > 0 and session._state.adapter
    assert answers == converse(chat, TURNS, {1: [EXAMPLES / "chelsea.jpg"]}, reuse=False)[1]
    base = Chat(tiny_model).session(generation=GREEDY)
    base.ask(TURNS[0])
    assert base.answer() == answers[0]  # text only: the base LM's answer
    with_image = Chat(tiny_model).session(generation=GREEDY)
    with_image.upload_img(EXAMPLES / "chelsea.jpg")
    with_image.ask(TURNS[0])
    adapted = chat.session(generation=GREEDY)
    adapted.upload_img(EXAMPLES / "chelsea.jpg")
    adapted.ask(TURNS[0])
    assert adapted.answer() != with_image.answer()  # with an image the adapter is on


def test_image_embeddings_cached_by_content(tiny_chat, tmp_path):
    copy = tmp_path / "same.png"
    from PIL import Image as PILImage

    PILImage.open(EXAMPLES / "chelsea.jpg").save(copy)  # lossless copy: same pixels, other file
    session = tiny_chat.session()
    first = session.upload_img(EXAMPLES / "chelsea.jpg")
    assert session.upload_img(copy) == first
    assert len(tiny_chat.images) == 1
    assert [type(p) for p in session.messages[0].parts] == [Image, Image]


def test_oldest_turns_dropped_to_fit_context(tiny_lm_dir):
    from vlchat.model.vlm import load_model

    chat = Chat(load_model(tiny_config(tiny_lm_dir, context_window=120)))
    session = chat.session(system="Be brief.", generation=GenerationConfig(max_new_tokens=10))
    session.upload_img(EXAMPLES / "chelsea.jpg")
    notices = []
    for question in ["first question about the picture"] + [f"question number {i}" for i in range(6)]:
        session.ask(question)
        notices += [c.notice for c in session.stream() if c.notice]
    assert notices and "dropped" in notices[0]
    assert session.conversation()[0].role == "system"  # the system prompt stays
    assert session.timings.prompt_tokens + 10 <= 120
    assert not any(m.images for m in session.messages)  # the image went with its whole turn


def test_a_dropped_turn_takes_its_tool_calls_and_results_along(tiny_lm_dir):
    from vlchat.chat.messages import Message, Text, ToolCall
    from vlchat.model.vlm import load_model

    chat = Chat(load_model(tiny_config(tiny_lm_dir, context_window=120)))
    session = chat.session(generation=GenerationConfig(max_new_tokens=10))
    call = ToolCall("call_1", "f", "{}")
    session.messages += [
        Message.text_message("user", "first question " * 8),
        Message("assistant", [Text("")], tool_calls=(call,)),
        Message("tool", [Text("result " * 8)], tool_call_id="call_1", name="f"),
        Message.text_message("assistant", "an answer " * 4),
    ]
    session.ask("second question")
    notices = [c.notice for c in session.stream() if c.notice]
    assert notices and "dropped the 1 oldest" in notices[0]
    assert [m.role for m in session.messages] == ["user", "assistant"]  # never a tool message first


def test_too_long_single_message_is_refused(tiny_lm_dir):
    from vlchat.model.vlm import load_model

    chat = Chat(load_model(tiny_config(tiny_lm_dir, context_window=64)))
    session = chat.session(generation=GenerationConfig(max_new_tokens=10))
    session.ask("word " * 100)
    with pytest.raises(VlchatError, match="too long"):
        session.answer()


def test_ask_and_answer_errors(tiny_chat):
    session = tiny_chat.session()
    with pytest.raises(VlchatError, match="empty question"):
        session.ask("   ")
    with pytest.raises(VlchatError, match="nothing to answer"):
        session.answer()


def test_stopping_midway_keeps_partial_answer(tiny_chat):
    session = tiny_chat.session(generation=GenerationConfig(max_new_tokens=50, min_new_tokens=50))
    session.ask("Tell me a long story")
    stream = session.stream()
    first = next(c for c in stream if c.text)
    stream.close()  # what a "stop" button or Ctrl-C does
    assert session.messages[-1].role == "assistant"
    assert session.messages[-1].content == first.text.strip()
    assert session.last_finish_reason == "stopped"
    session.ask("Go on")
    assert session.answer() is not None  # the session still works


def test_reset_forgets_history(tiny_chat):
    session = tiny_chat.session(generation=GREEDY)
    session.ask("Hi")
    session.answer()
    session.reset()
    assert session.messages == [] and session.timings.reused_tokens == 0


def test_save_and_load_round_trip(tiny_chat, tmp_path):
    session, answers = converse(tiny_chat, TURNS[:2])
    path = tmp_path / "session.json"
    session.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["messages"]) == 4
    assert data["messages"][0]["parts"][0]["path"].endswith("chelsea.jpg")
    restored = load_session(Chat(tiny_chat.model), path)  # a new Chat: images re-read from disk
    assert restored.messages == session.messages
    restored.ask(TURNS[2])
    session.ask(TURNS[2])
    assert restored.answer() == session.answer()


def test_load_refuses_changed_or_bad_files(tiny_chat, tmp_path):
    picture = tmp_path / "pic.png"
    from PIL import Image as PILImage

    PILImage.new("RGB", (40, 40), "red").save(picture)
    session = tiny_chat.session(generation=GREEDY)
    session.upload_img(picture)
    session.ask("What colour?")
    session.answer()
    session.save(tmp_path / "s.json")
    PILImage.new("RGB", (40, 40), "blue").save(picture)
    with pytest.raises(VlchatError, match="changed"):
        load_session(Chat(tiny_chat.model), tmp_path / "s.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VlchatError, match="cannot read session"):
        load_session(tiny_chat, tmp_path / "bad.json")


def test_reusable_prefix_never_splits_an_image():
    image = [("k", i) for i in range(4)]
    assert reusable_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert reusable_prefix([1, 2], [1, 2]) == 1  # always leave one position to compute logits
    assert reusable_prefix([1] + image[:2], [1] + image + [5]) == 1


def test_save_to_unwritable_path_is_a_clean_error(tiny_chat, tmp_path):
    session = tiny_chat.session()
    with pytest.raises(VlchatError, match="cannot save"):
        session.save(tmp_path / "no" / "such" / "s.json")


@pytest.mark.parametrize(
    "data",
    [
        {"format": 1},
        {"format": 1, "template": "chatml", "messages": [{"role": "user"}]},
        {"format": 1, "template": "chatml", "generation": {"bogus": 1}, "messages": []},
        {
            "format": 1,
            "template": "chatml",
            "messages": [{"role": "assistant", "parts": [{"type": "text", "text": "hi"}]}],
        },
    ],
)
def test_load_refuses_malformed_sessions(tiny_chat, tmp_path, data):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(VlchatError):
        load_session(tiny_chat, path)


def test_offered_tools_switch_the_adapter_on_for_a_text_only_conversation(tiny_model, tiny_adapted_model):
    """The adapter learned tool use: a text-only conversation offering tools runs with it on (and
    cannot reuse a KV cache computed without it); without tools it is the base LM."""
    tool = ToolSpec("add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "number"}}})
    session = Chat(tiny_adapted_model).session(generation=GREEDY)
    session.ask(TURNS[0])
    session.answer()
    assert not session._state.adapter
    session.tools = (tool,)
    session.ask(TURNS[1])
    session.answer()
    assert session._state.adapter and session.timings.reused_tokens == 0
    base = Chat(tiny_model).session(generation=GREEDY)
    base.tools = (tool,)
    base.ask(TURNS[0])
    adapted = Chat(tiny_adapted_model).session(generation=GREEDY)
    adapted.tools = (tool,)
    adapted.ask(TURNS[0])
    assert adapted.answer() != base.answer()
