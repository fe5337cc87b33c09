"""Independent turns: a QA conversation packed as shared prefix + one branch per turn trains
exactly what each question asked alone would (same tokens, positions, and loss)."""

from __future__ import annotations

import pytest
import torch

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.template_lookup import get_template
from vlchat.model.vlm import IMAGE_TOKEN_ID
from vlchat.train.collate import IGNORE, branch_mask, collate, encode_sample
from vlchat.train.data import Sample
from vlchat.train.synth import qa_sample
from vlchat.train.trainer import TrainModule

CHATML = get_template("chatml")


def independent(sample: Sample) -> Sample:
    return Sample(sample.messages, sample.images, sample.source, {**sample.meta, "independent_turns": True})


def alone(sample: Sample, turn: int) -> Sample:
    """Turn `turn` of a QA sample asked on its own (the image in front of its question)."""
    user, answer = sample.messages[2 * turn], sample.messages[2 * turn + 1]
    image = [p for p in sample.messages[0].parts if isinstance(p, Image)]
    user = Message("user", (image if turn else []) + user.parts)
    return Sample([user, answer], sample.images, sample.source)


def encoder(model):
    def encode(sample: Sample):
        return encode_sample(sample, CHATML, None, model.lm.tokenize, model.tokens_per_image)

    return encode


def loss(model, encoded_items) -> torch.Tensor:
    batch = collate(encoded_items, model.config.vision.image_size, 0)
    with torch.no_grad():
        return TrainModule(model)(batch.ids, batch.labels, batch.attention_mask, batch.pixels, batch.position_ids)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_turns_train_each_question_as_if_asked_alone(tiny_model, attention):
    tiny_model.lm.model.set_attn_implementation(attention)
    try:
        sample, encode = qa_sample(5, "en", turns=3), encoder(tiny_model)
        packed = encode(independent(sample))
        turns = [encode(alone(sample, k)) for k in range(3)]
        # The image and system prompt once, then each turn's own tokens: shorter than the conversation.
        assert packed.ids.count(IMAGE_TOKEN_ID) == tiny_model.tokens_per_image
        assert len(packed.ids) < len(encode(sample).ids)
        assert [t for t in packed.labels if t != IGNORE] == [t for e in turns for t in e.labels if t != IGNORE]
        # Loss of the packed sample == supervised-token-weighted mean of the turns asked alone.
        counts = [sum(t != IGNORE for t in e.labels[1:]) for e in turns]
        expected = sum(loss(tiny_model, [e]) * n for e, n in zip(turns, counts)) / sum(counts)
        torch.testing.assert_close(loss(tiny_model, [packed]), expected, rtol=1e-5, atol=1e-5)
        # Padded beside a longer ordinary sample (right padding, 4D mask), its loss is unchanged.
        other = encode(qa_sample(6, "en", turns=5))
        n_packed, n_other = (sum(t != IGNORE for t in e.labels[1:]) for e in (packed, other))
        mixed = (loss(tiny_model, [packed]) * n_packed + loss(tiny_model, [other]) * n_other) / (n_packed + n_other)
        torch.testing.assert_close(loss(tiny_model, [packed, other]), mixed, rtol=1e-5, atol=1e-5)
    finally:
        tiny_model.lm.model.set_attn_implementation("sdpa")


def test_a_turn_cannot_see_another_turn(tiny_model):
    packed = encoder(tiny_model)(independent(qa_sample(5, "en", turns=3)))
    allowed = branch_mask([packed], len(packed.ids) + 3)[0, 0]
    branches = torch.tensor(packed.branches)
    n = len(packed.ids)
    for query in range(n):
        for key in range(n):
            same = branches[key] == 0 or branches[key] == branches[query]
            assert bool(allowed[query, key]) == bool(key <= query and same)
    assert allowed[n:].sum(dim=1).tolist() == [1, 1, 1]  # padding rows attend one key, never none
    # Positions restart after the shared prefix in every branch.
    prefix = branches.tolist().index(1)
    starts = [packed.positions[branches.tolist().index(b)] for b in (1, 2, 3)]
    assert starts == [prefix] * 3


def test_samples_that_cannot_be_split_stay_ordinary_conversations(tiny_model):
    encode = encoder(tiny_model)
    one_turn = qa_sample(5, "en", turns=1)
    assert encode(independent(one_turn)).branches is None
    image = qa_sample(7).images[0]
    later_image = Sample(
        [
            Message("user", [Text("Hi")]),
            Message.text_message("assistant", "Hello"),
            Message("user", [Image(key="b"), Text("And this?")]),
            Message.text_message("assistant", "A cat"),
        ],
        [image],
    )
    encoded = encode(independent(later_image))
    assert encoded.branches is None and encoded.ids == encode(later_image).ids
