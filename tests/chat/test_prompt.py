"""Position keys for a model whose image embeddings depend on text (InstructBLIP): each image is keyed
with the text of the first message that holds it, so KV caches never mix two encodings of one image."""

from __future__ import annotations

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.prompt import encode, image_instructions, image_of, instructed_key
from vlchat.chat.template_lookup import get_template

TEMPLATE = get_template("instructblip")


def tokenize(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def conversation(question: str) -> list[Message]:
    return [
        Message("user", [Image("k"), Text(question), Text("Briefly.")]),
        Message.text_message("assistant", "A cat."),
        Message("user", [Text("And this one?"), Image("k2")]),
    ]


def test_each_image_reads_the_text_of_its_first_message() -> None:
    messages = conversation("What is this?") + [Message.text_message("assistant", "A dog.")]
    messages += [Message("user", [Image("k"), Text("Again?")])]  # a second showing keeps the first text
    assert image_instructions(TEMPLATE, messages) == {"k": "What is this? Briefly.", "k2": "And this one?"}


def test_instructed_keys_name_the_text_and_keep_the_image() -> None:
    plain, _ = encode(TEMPLATE, conversation("What is this?"), tokenize, tokens_per_image=2)
    keys, trainable = encode(TEMPLATE, conversation("What is this?"), tokenize, tokens_per_image=2, instructed=True)
    other, _ = encode(TEMPLATE, conversation("What is that?"), tokenize, tokens_per_image=2, instructed=True)
    first = instructed_key("k", "What is this? Briefly.")
    assert keys[:4] == [(first, 0), (first, 1), (instructed_key("k2", "And this one?"), 0), keys[3]]
    assert [image_of(k[0]) if isinstance(k, tuple) else k for k in keys] == [
        k[0] if isinstance(k, tuple) else k for k in plain
    ]
    assert len(trainable) == len(keys)
    assert other[0] != keys[0] and other[2] == keys[2]  # another question: another key for its image only
