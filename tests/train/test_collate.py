"""Samples -> training tensors: the label mask covers exactly the answers, images sit in their slots."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image as PILImage

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.template_lookup import get_template
from vlchat.config import ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.vlm import IMAGE_TOKEN_ID
from vlchat.train.collate import IGNORE, collate, encode_sample
from vlchat.train.data import Sample
from vlchat.train.synth import caption_sample, qa_sample

TOKENS_PER_IMAGE = 4  # a 64-px image through the tiny model's encoder
CHATML = get_template("chatml")


@pytest.fixture(scope="module")
def tokenizer():
    """The default LM's tokenizer (SmolLM2, ChatML special tokens), without its weights."""
    from transformers import AutoTokenizer

    from vlchat.assets import lm_directory

    lm = ModelConfig().lm
    return AutoTokenizer.from_pretrained(lm_directory(lm.source, lm.sha256))


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_text(encoded, tokenizer) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE], skip_special_tokens=False)


def test_labels_are_exactly_the_answers(tokenize, tokenizer):
    sample = qa_sample(3, "en", turns=2)
    first, second = sample.meta["answers"]
    encoded = encode_sample(sample, CHATML, None, tokenize, TOKENS_PER_IMAGE)
    assert len(encoded.ids) == len(encoded.labels)
    assert trained_text(encoded, tokenizer) == f"{first}<|im_end|>{second}<|im_end|>"
    # Where a label is kept it is the input token itself (the LM shifts internally).
    assert all(label in (IGNORE, token) for token, label in zip(encoded.ids, encoded.labels))
    # The (default) system prompt and both questions are in the input, but not in the loss.
    text = tokenizer.decode([t for t in encoded.ids if t != IMAGE_TOKEN_ID], skip_special_tokens=False)
    assert text.startswith(f"<|im_start|>system\n{CHATML.default_system}<|im_end|>")
    for message in sample.messages[::2]:
        question = message.parts[-1].text
        assert question in text and question not in trained_text(encoded, tokenizer)
    assert encoded.images == sample.images


def test_image_slots(tokenize):
    sample = qa_sample(3, "en", turns=2)
    encoded = encode_sample(sample, CHATML, "Be brief.", tokenize, TOKENS_PER_IMAGE)
    slots = [i for i, t in enumerate(encoded.ids) if t == IMAGE_TOKEN_ID]
    assert len(slots) == TOKENS_PER_IMAGE
    assert slots == list(range(slots[0], slots[0] + TOKENS_PER_IMAGE))  # one contiguous run
    assert all(encoded.labels[i] == IGNORE for i in slots)


def test_given_system_prompt_replaces_the_default(tokenize, tokenizer):
    sample = caption_sample(5)
    encoded = encode_sample(sample, CHATML, "Be brief.", tokenize, TOKENS_PER_IMAGE)
    text = tokenizer.decode([t for t in encoded.ids if t != IMAGE_TOKEN_ID], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert CHATML.default_system not in text
    assert trained_text(encoded, tokenizer) == sample.messages[1].parts[0].text + "<|im_end|>"


def test_image_count_mismatch_is_an_error(tokenize):
    sample = qa_sample(3, "en", turns=2)
    with pytest.raises(VlchatError, match=r"synth:3: 1 image placeholder\(s\) but 0 image\(s\)"):
        encode_sample(replace(sample, images=[]), CHATML, None, tokenize, TOKENS_PER_IMAGE)
    with pytest.raises(VlchatError, match=r"1 image placeholder\(s\) but 2 image\(s\)"):
        encode_sample(replace(sample, images=sample.images * 2), CHATML, None, tokenize, TOKENS_PER_IMAGE)


def test_collate_pads_right(tokenize, tmp_path):
    path = tmp_path / "red.png"
    PILImage.new("RGB", (20, 30), (200, 30, 40)).save(path)
    from_file = Sample(
        [
            Message("user", [Image(key=str(path), source=str(path)), Text("Colour?")]),
            Message.text_message("assistant", "red"),
        ],
        [str(path)],
        "file",
    )
    items = [
        encode_sample(s, CHATML, None, tokenize, TOKENS_PER_IMAGE)
        for s in (qa_sample(3, "en", turns=2), from_file, caption_sample(4))
    ]
    lengths = [len(item.ids) for item in items]
    assert len(set(lengths)) > 1  # the padding is exercised
    batch = collate(items, 64, pad_id=7)
    width = max(lengths)
    assert batch.ids.shape == batch.labels.shape == batch.attention_mask.shape == (3, width)
    assert batch.ids.dtype == batch.labels.dtype == torch.long
    for row, item in enumerate(items):
        n = len(item.ids)
        assert batch.ids[row, :n].tolist() == item.ids and batch.labels[row, :n].tolist() == item.labels
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert batch.ids[row, n:].eq(7).all() and batch.labels[row, n:].eq(IGNORE).all()
    assert batch.pixels.shape == (3, 3, 64, 64)  # (n_images, 3, S, S), in slot order
    assert batch.pixels.dtype == torch.float32
    assert not torch.equal(batch.pixels[0], batch.pixels[1])


def test_collate_several_images_and_none(tokenize):
    one, two = caption_sample(1), caption_sample(2)
    both = Sample(
        [
            Message("user", [one.messages[0].parts[0], Text("and"), two.messages[0].parts[0]]),
            Message.text_message("assistant", "two scenes"),
        ],
        one.images + two.images,
        "pair",
    )
    items = [encode_sample(s, CHATML, None, tokenize, TOKENS_PER_IMAGE) for s in (both, one)]
    assert sum(t == IMAGE_TOKEN_ID for t in items[0].ids) == 2 * TOKENS_PER_IMAGE
    batch = collate(items, 32, pad_id=0)
    assert batch.pixels.shape == (3, 3, 32, 32)
    assert torch.equal(batch.pixels[0], batch.pixels[2])  # `one` twice: the same pixels
    text_only = Sample([Message.text_message("user", "hi"), Message.text_message("assistant", "hello")])
    batch = collate([encode_sample(text_only, CHATML, None, tokenize, TOKENS_PER_IMAGE)], 32, pad_id=0)
    assert batch.pixels is None and batch.attention_mask.all()


def test_answer_runs_number_the_answers_in_reading_order():
    from vlchat.train.collate import answer_runs

    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, 7], [IGNORE, 8, IGNORE, IGNORE, 9, 9]])
    # targets are labels[:, 1:]; each run of supervised targets is one answer, numbered across rows
    assert answer_runs(labels).tolist() == [[0, 1, 1, 1, 2], [3, 3, 3, 4, 4]]
