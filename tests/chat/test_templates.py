"""Golden strings, label masks and the prefix invariant for every chat template."""

from __future__ import annotations

import pytest

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.personas import get_persona
from vlchat.chat.prompt import encode
from vlchat.chat.template_lookup import get_template
from vlchat.chat.templates import TEMPLATES, Segment
from vlchat.errors import VlchatError

IMG = "<Img><ImageHere></Img>"
Q = f"{IMG} What is this?"
# Default systems, written out here so that a change to a template shows up as a failing test.
MS = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
CS = "You are a helpful assistant. You can see images the user shares with you and answer questions about them."
IS = "You are an AI assistant whose name is InternLM (书生·浦语)."
QS = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's chat_template
ZBJ = get_persona("zhubajie")


def user(*parts: Text | Image) -> Message:
    return Message("user", list(parts))


def assistant(text: str) -> Message:
    return Message.text_message("assistant", text)


def system(text: str) -> Message:
    return Message.text_message("system", text)


U1 = user(Image("k"), Text("What is this?"))
A1 = assistant("A cat.")
U2 = user(Text("And its colour?"))
A2 = assistant("Orange.")

CONVERSATIONS: dict[str, list[Message]] = {
    "single": [U1],
    "multi": [U1, A1, U2],
    "two_images": [user(Image("a"), Image("b"), Text("Compare them."))],
    "images_in_two_turns": [U1, A1, user(Image("k2"), Text("And this one?"))],
    "custom_system": [system("Be brief."), U1],
    "empty_system": [system(""), U1],
    "persona": [system(ZBJ), U1],
}


def _chatml(s: str) -> dict[str, str]:
    """ChatML goldens with default system `s` (chatml and internlm2 differ only in it and a BOS)."""
    sys_block = f"<|im_start|>system\n{s}<|im_end|>\n"
    u = "<|im_start|>user\n{}<|im_end|>\n"
    a = "<|im_start|>assistant\n{}"
    return {
        "single": sys_block + u.format(Q) + a.format(""),
        "multi": sys_block + u.format(Q) + a.format("A cat.<|im_end|>\n") + u.format("And its colour?") + a.format(""),
        "two_images": sys_block + u.format(f"{IMG} {IMG} Compare them.") + a.format(""),
        "images_in_two_turns": sys_block
        + u.format(Q)
        + a.format("A cat.<|im_end|>\n")
        + u.format(f"{IMG} And this one?")
        + a.format(""),
        "custom_system": "<|im_start|>system\nBe brief.<|im_end|>\n" + u.format(Q) + a.format(""),
        "empty_system": u.format(Q) + a.format(""),
        "persona": f"<|im_start|>system\n{ZBJ}<|im_end|>\n" + u.format(Q) + a.format(""),
    }


_VICUNA = {
    "single": f"{MS}###Human: {Q}###Assistant: ",
    "multi": f"{MS}###Human: {Q}###Assistant: A cat.###Human: And its colour?###Assistant: ",
    "two_images": f"{MS}###Human: {IMG} {IMG} Compare them.###Assistant: ",
    "images_in_two_turns": f"{MS}###Human: {Q}###Assistant: A cat.###Human: {IMG} And this one?###Assistant: ",
    "custom_system": f"Be brief.###Human: {Q}###Assistant: ",
    "empty_system": f"Human: {Q}###Assistant: ",
    "persona": f"{ZBJ}###Human: {Q}###Assistant: ",
}

GOLDEN: dict[str, dict[str, str]] = {
    "vicuna_v0": _VICUNA,
    "llama2": {
        "single": f"<s>[INST] <<SYS>>\n{MS}\n<</SYS>>\n\n{Q} [/INST] ",
        "multi": f"<s>[INST] <<SYS>>\n{MS}\n<</SYS>>\n\n{Q} [/INST] A cat. </s><s>[INST] And its colour? [/INST] ",
        "two_images": f"<s>[INST] <<SYS>>\n{MS}\n<</SYS>>\n\n{IMG} {IMG} Compare them. [/INST] ",
        "images_in_two_turns": (
            f"<s>[INST] <<SYS>>\n{MS}\n<</SYS>>\n\n{Q} [/INST] A cat. </s><s>[INST] {IMG} And this one? [/INST] "
        ),
        "custom_system": f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{Q} [/INST] ",
        "empty_system": f"<s>[INST] {Q} [/INST] ",
        "persona": f"<s>[INST] <<SYS>>\n{ZBJ}\n<</SYS>>\n\n{Q} [/INST] ",
    },
    "chatml": _chatml(CS),
    "qwen2.5": _chatml(QS),
    "internlm2": {k: "<s>" + v for k, v in _chatml(IS).items()},
    # The rendered text keeps images where they were given; the position keys put them first (below).
    "blip2": {
        "single": f"</s>Question: {Q} Answer:",
        "multi": f"</s>Question: {Q} Answer:A cat.</s>Question: And its colour? Answer:",
        "two_images": f"</s>Question: {IMG} {IMG} Compare them. Answer:",
        "images_in_two_turns": f"</s>Question: {Q} Answer:A cat.</s>Question: {IMG} And this one? Answer:",
        "custom_system": f"</s>Be brief.\nQuestion: {Q} Answer:",
        "empty_system": f"</s>Question: {Q} Answer:",
        "persona": f"</s>{ZBJ}\nQuestion: {Q} Answer:",
    },
    "instructblip": {
        "single": f"<s>{Q}",
        "multi": f"<s>{Q}A cat.</s>And its colour?",
        "two_images": f"<s>{IMG} {IMG} Compare them.",
        "images_in_two_turns": f"<s>{Q}A cat.</s>{IMG} And this one?",
        "custom_system": f"<s>Be brief.\n{Q}",
        "empty_system": f"<s>{Q}",
        "persona": f"<s>{ZBJ}\n{Q}",
    },
    "ziya": {
        "single": f"<s><human>:{Q}\n<bot>:",
        "multi": f"<s><human>:{Q}\n<bot>:A cat.\n<human>:And its colour?\n<bot>:",
        "two_images": f"<s><human>:{IMG} {IMG} Compare them.\n<bot>:",
        "images_in_two_turns": f"<s><human>:{Q}\n<bot>:A cat.\n<human>:{IMG} And this one?\n<bot>:",
        "custom_system": f"<s>Be brief.\n<human>:{Q}\n<bot>:",
        "empty_system": f"<s><human>:{Q}\n<bot>:",
        "persona": f"<s>{ZBJ}\n<human>:{Q}\n<bot>:",
    },
    "minigpt4_vicuna0": {k: "<s>" + v for k, v in _VICUNA.items()},
    "minigpt4_llama2": {
        "single": f"<s>{MS}<s>[INST] {Q} [/INST] ",
        "multi": f"<s>{MS}<s>[INST] {Q} [/INST] A cat.<s>[INST] And its colour? [/INST] ",
        "two_images": f"<s>{MS}<s>[INST] {IMG} {IMG} Compare them. [/INST] ",
        "images_in_two_turns": f"<s>{MS}<s>[INST] {Q} [/INST] A cat.<s>[INST] {IMG} And this one? [/INST] ",
        "custom_system": f"<s>Be brief.<s>[INST] {Q} [/INST] ",
        "empty_system": f"<s><s>[INST] {Q} [/INST] ",  # as MiniGPT-4: the tokenizer's BOS, then the role's
        "persona": f"<s>{ZBJ}<s>[INST] {Q} [/INST] ",
    },
}

# A finished two-turn conversation as training renders it (ends with the assistant's end marker).
TRAINING = [U1, A1, U2, A2]
GOLDEN_TRAINING = {
    "vicuna_v0": f"{MS}###Human: {Q}###Assistant: A cat.###Human: And its colour?###Assistant: Orange.###",
    "llama2": (
        f"<s>[INST] <<SYS>>\n{MS}\n<</SYS>>\n\n{Q} [/INST] A cat. </s><s>[INST] And its colour? [/INST] Orange. </s>"
    ),
    "chatml": (
        f"<|im_start|>system\n{CS}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd its colour?<|im_end|>\n"
        "<|im_start|>assistant\nOrange.<|im_end|>\n"
    ),
    "internlm2": (
        f"<s><|im_start|>system\n{IS}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd its colour?<|im_end|>\n"
        "<|im_start|>assistant\nOrange.<|im_end|>\n"
    ),
    "blip2": f"</s>Question: {Q} Answer:A cat.</s>Question: And its colour? Answer:Orange.</s>",
    "instructblip": f"<s>{Q}A cat.</s>And its colour?Orange.</s>",
    "ziya": f"<s><human>:{Q}\n<bot>:A cat.\n<human>:And its colour?\n<bot>:Orange.\n",
    "minigpt4_vicuna0": (f"<s>{MS}###Human: {Q}###Assistant: A cat.###Human: And its colour?###Assistant: Orange.###"),
    "minigpt4_llama2": f"<s>{MS}<s>[INST] {Q} [/INST] A cat.<s>[INST] And its colour? [/INST] Orange.",
}
GOLDEN_TRAINABLE = {
    "vicuna_v0": "A cat.###Orange.###",
    "llama2": "A cat. </s>Orange. </s>",
    "chatml": "A cat.<|im_end|>Orange.<|im_end|>",
    "qwen2.5": "A cat.<|im_end|>Orange.<|im_end|>",
    "internlm2": "A cat.<|im_end|>Orange.<|im_end|>",
    "blip2": "A cat.</s>Orange.</s>",
    "instructblip": "A cat.</s>Orange.</s>",
    "ziya": "A cat.\nOrange.\n",
    "minigpt4_vicuna0": "A cat.###Orange.###",
    "minigpt4_llama2": "A cat.Orange.",
}


def test_registry_names_and_stops() -> None:
    assert list(TEMPLATES) == [
        "vicuna_v0",
        "llama2",
        "chatml",
        "qwen2.5",
        "internlm2",
        "blip2",
        "instructblip",
        "ziya",
        "minigpt4_vicuna0",
        "minigpt4_llama2",
    ]
    assert {n: t.stop for n, t in TEMPLATES.items()} == {
        "vicuna_v0": ("###",),
        "llama2": ("</s>",),
        "minigpt4_vicuna0": ("###",),
        "minigpt4_llama2": ("</s>",),
        "chatml": ("<|im_end|>",),
        "qwen2.5": ("<|im_end|>", "<|endoftext|>"),
        "internlm2": ("<|im_end|>",),
        "blip2": ("</s>",),
        "instructblip": ("</s>",),
        "ziya": ("<human>:", "</s>"),
    }
    for name, template in TEMPLATES.items():
        assert template.name == name
        assert get_template(name) is template


def test_message_content_of_the_single_turn() -> None:
    assert U1.content == "<Img><ImageHere></Img> What is this?"


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_golden_inference_prompt(name: str, case: str) -> None:
    template = get_template(name)
    messages = CONVERSATIONS[case]
    assert template.render(messages) == GOLDEN[name][case]
    assert template.render(messages) == "".join(s.text for s in template.segments(messages))


@pytest.mark.parametrize("name", list(GOLDEN_TRAINING))
def test_golden_training_prompt(name: str) -> None:
    template = get_template(name)
    # Ending on an assistant message there is no generation prompt either way.
    assert template.render(TRAINING, add_generation_prompt=False) == GOLDEN_TRAINING[name]
    assert template.render(TRAINING, add_generation_prompt=True) == GOLDEN_TRAINING[name]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_trainable_segments_are_answers_and_end_markers(name: str) -> None:
    segments = get_template(name).segments(TRAINING, add_generation_prompt=False)
    trainable = [s for s in segments if s.trainable]
    assert "".join(s.text for s in trainable) == GOLDEN_TRAINABLE[name]
    assert {s.message_index for s in trainable} == {1, 3}
    assert all(TRAINING[s.message_index].role == "assistant" for s in trainable)


def test_newline_after_im_end_is_not_trainable() -> None:
    segments = get_template("chatml").segments([U1, A1], add_generation_prompt=False)
    assert segments[-2:] == [Segment("<|im_end|>", True, 1, False), Segment("\n", False, 1, False)]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("messages", [TRAINING, [system("Be brief."), *TRAINING], [system(""), *TRAINING]])
def test_each_message_content_is_its_own_segment(name: str, messages: list[Message]) -> None:
    segments = get_template(name).segments(messages, add_generation_prompt=False)
    content = [s for s in segments if s.is_content]
    # An empty system message renders nothing at all (no system prompt).
    rendered = [i for i, m in enumerate(messages) if m.role != "system" or m.content]
    assert [s.message_index for s in content] == rendered
    assert all(s.text == messages[s.message_index].content for s in content)
    # Markers belong to a message; only a default system prompt (not in messages) has no index.
    assert all(s.message_index is not None for s in segments if messages[0].role == "system")
    indices = [s.message_index for s in segments if s.message_index is not None]
    assert indices == sorted(indices)


@pytest.mark.parametrize("name", ["vicuna_v0", "llama2", "chatml", "internlm2"])
def test_default_system_has_no_message_index(name: str) -> None:
    template = get_template(name)
    segments = template.segments([U1])
    system_text = [s for s in segments if s.text == template.default_system]
    assert system_text == [Segment(template.default_system, False, None, False)]
    assert segments[0].message_index is None


def test_generation_prompt_segment_takes_the_coming_answer_index() -> None:
    segments = get_template("chatml").segments([U1, A1, U2])
    assert segments[-1] == Segment("<|im_start|>assistant\n", False, 3, False)
    assert get_template("chatml").segments([U1, A1, U2], add_generation_prompt=False)[-1].text == "<|im_end|>\n"


def _prefix_cases() -> list[list[Message]]:
    turns = [U1, A1, U2, A2, user(Image("k2"), Text("And this one?")), assistant("A dog.")]
    return [turns, [system("Be brief."), *turns], [system(""), *turns]]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("messages", _prefix_cases())
def test_shorter_conversation_segments_are_a_prefix(name: str, messages: list[Message]) -> None:
    """The invariant KV-cache reuse relies on: a conversation's segments only ever grow at the end."""
    template = get_template(name)
    full = template.segments(messages, add_generation_prompt=False)
    start = 1 if messages[0].role == "system" else 0
    for k in range(start, len(messages) + 1):
        shorter = template.segments(messages[:k], add_generation_prompt=False)
        assert full[: len(shorter)] == shorter, k
        # With the generation prompt too: it is exactly the next answer's role-prefix segment.
        prompted = template.segments(messages[:k], add_generation_prompt=True)
        assert full[: len(prompted)] == prompted, k


def test_images_first_puts_every_image_slot_before_the_bos() -> None:
    """BLIP-2: the image embeddings lead the prompt, then BOS and the text without image markup."""
    words = {"</s>": 2, "Question:": 10, "What": 11, "is": 12, "this?": 13, "Answer:": 14, "A": 15, "cat.": 16}
    words |= {"And": 17, "this": 18, "one?": 19}

    def tokenize(text: str) -> list[int]:  # one id per word, "</s>" a word of its own
        return [words[w] for w in text.replace("</s>", " </s> ").split()]

    messages = [U1, A1, user(Image("k2"), Text("And this one?"))]
    keys, trainable = encode(get_template("blip2"), messages, tokenize, tokens_per_image=2)
    assert keys == [("k", 0), ("k", 1), ("k2", 0), ("k2", 1), 2, 10, 11, 12, 13, 14, 15, 16, 2, 10, 17, 18, 19, 14]
    assert trainable == [False] * 10 + [True] * 3 + [False] * 5
    chatml_keys, _ = encode(get_template("chatml"), [U1], lambda text: [0] * len(text.split()), tokens_per_image=2)
    assert chatml_keys.index(("k", 0)) > 0  # other templates keep images in place


def test_unknown_template() -> None:
    with pytest.raises(VlchatError, match=r"unknown template 'x'; choose one of: vicuna_v0, llama2, chatml"):
        get_template("x")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([U1, system("Be brief.")], "system message may only come first"),
        ([U1, U2], "message 1 is 'user' where 'assistant' was expected"),
        ([A1, U1], "message 0 is 'assistant' where 'user' was expected"),
        ([system("Be brief."), A1], "message 1 is 'assistant' where 'user' was expected"),
        ([U1, A1, A2], "message 2 is 'assistant' where 'user' was expected"),
    ],
)
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_bad_role_order(name: str, messages: list[Message], match: str) -> None:
    with pytest.raises(VlchatError, match=match):
        get_template(name).segments(messages)
