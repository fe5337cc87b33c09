"""vlchat.load and the chat object's verbs (MiniGPT-4, InternLM, Ziya); docs/python.md's examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlchat
from tests.hf_tiny import photo, save_tiny_llava
from vlchat.api import resolve_device
from vlchat.errors import VlchatError

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python.md"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "llava-1.5-7b-hf"
    save_tiny_llava(out)
    return out


@pytest.fixture(scope="module")
def chat(llava_dir):
    return vlchat.load(str(llava_dir), device="cpu", dtype="float32")


def test_minigpt4_verbs_keep_one_conversation(chat):
    chat.reset()
    chat.upload_img(photo())
    chat.ask("What is in the picture?")
    first = chat.answer(max_new_tokens=4)
    chat.ask("And then?")
    deltas = list(chat.stream(max_new_tokens=4))
    # (a random tiny model may end on half a UTF-8 character, which the stream withholds)
    assert isinstance(first, str) and chat.session.messages[-1].content.startswith("".join(deltas).strip())
    assert [m.role for m in chat.session.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.session.timings.reused_tokens > 16  # the image and first turn were not prefilled again


def test_stream_chat_yields_growing_responses_and_history(chat):
    items = list(chat.stream_chat("Hello!", [("Hi", "Hello.")], max_new_tokens=5))
    response, history = items[-1]
    assert history[:1] == [("Hi", "Hello.")] and history[-1] == ("Hello!", response)
    assert all(h[-1][0] == "Hello!" for _, h in items)


def test_ziya_chat_equals_the_same_turns_asked_directly(chat):
    answer = chat.chat("What colour is the sky?", ["Hello!"], ["I am fine."], max_new_tokens=5)
    chat.new_session()
    from vlchat.chat.messages import Message

    chat.session.messages += [Message.text_message("user", "Hello!"), Message.text_message("assistant", "I am fine.")]
    chat.ask("What colour is the sky?")
    assert chat.answer(max_new_tokens=5) == answer


def test_bad_arguments_are_one_line_errors(chat, llava_dir):
    with pytest.raises(VlchatError, match="previous_querys has 1 turns but previous_outputs 0"):
        chat.chat("x", ["a"], [])
    with pytest.raises(VlchatError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(VlchatError, match="dtype must be one of"):
        vlchat.load(str(llava_dir), dtype="int3")
    with pytest.raises(VlchatError, match="unknown generation option"):
        chat.answer(max_new_token=3)
    assert resolve_device("auto") in ("cpu", "cuda")


def test_the_documented_examples_run(llava_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    for block in blocks:
        code = block.replace('"llava-hf/llava-1.5-7b-hf"', f'"{llava_dir}", dtype="float32"')
        exec(compile(code, str(DOC), "exec"), {})


def test_ziya_chat_prompt_is_the_model_cards(tmp_path):
    """Ziya's `chat(query, previous_querys, previous_outputs)` with the `ziya` template feeds exactly what
    Ziya's model cards tokenize: `tokenizer("<human>:Q1\\n<bot>:A1\\n<human>:Q\\n<bot>:")`, BOS included."""
    from tests.hf_tiny import save_tiny_causal_lm
    from vlchat.chat.prompt import slot_ids

    _, tokenizer = save_tiny_causal_lm(tmp_path / "lm")
    ziya = vlchat.load(str(tmp_path / "lm"), dtype="float32")
    ziya.new_session("ziya")
    ziya.chat("What colour is the sky?", ["Hello!"], ["I am fine."], max_new_tokens=3)
    session = ziya.session
    keys = session.position_keys(session.conversation()[:-1])
    expected = tokenizer("<human>:Hello!\n<bot>:I am fine.\n<human>:What colour is the sky?\n<bot>:").input_ids
    assert expected[0] == tokenizer.bos_token_id and slot_ids(keys) == expected
