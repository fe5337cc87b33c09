"""Shared-prefix packing across samples: a packed micro-batch trains exactly what the same samples
train unpacked (loss and gradients), samples with other prefixes stay apart, each image stays at
its own slots, and no target is ever predicted across a branch boundary."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image as PILImage

from vlchat.chat.template_lookup import get_template
from vlchat.model.vlm import IMAGE_TOKEN_ID
from vlchat.train import data_tools
from vlchat.train.collate import IGNORE, Encoded, collate, encode_sample, supervised_tokens
from vlchat.train.packing import pack_shared_prefixes
from vlchat.train.synth import qa_sample
from vlchat.train.trainer import TrainModule

CHATML = get_template("chatml")
TOOLS = data_tools.builtin_specs()[:2]  # every tool sample below offers these: a shared prefix of ~300 tokens
OTHER_TOOLS = data_tools.builtin_specs()[2:4]


def tool_samples(tools=TOOLS) -> list:
    """Two image questions, one text-only (python) request and one more image question, all offering `tools`."""
    samples = [data_tools.labels_sample(1), data_tools.python_sample(2), data_tools.qa_sample(3)]
    samples.append(data_tools.labels_sample(4))
    return [replace(sample, tools=tools) for sample in samples]


def encode(model, sample) -> Encoded:
    return encode_sample(sample, CHATML, None, model.lm.tokenize, model.tokens_per_image)


def trainable_copy(model, attention: str):
    """The tiny model with its projector and LM trainable (a copy: the fixture is shared)."""
    model = copy.deepcopy(model)
    model.vision = RawPixels()  # so that the projector's gradients depend on the images
    model.lm.model.set_attn_implementation(attention)
    model.projector.requires_grad_(True)
    model.lm.model.requires_grad_(True)
    return model


def weighted_loss(model, rows: list[list[Encoded]]) -> torch.Tensor:
    """Each row list as one batch, weighted by its share of supervised targets (as the trainer does)."""
    batches = [collate(row, model.config.vision.image_size, 0) for row in rows]
    counts = [supervised_tokens(batch) for batch in batches]
    module = TrainModule(model)
    losses = [
        module(b.ids, b.labels, b.attention_mask, b.pixels, b.position_ids) * n / sum(counts)
        for b, n in zip(batches, counts)
    ]
    return sum(losses)


def loss_and_gradients(model, rows: list[list[Encoded]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = weighted_loss(model, rows)
    loss.backward()
    named = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), named


def assert_same_gradients(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and len(expected) > 10
    for name, grad in expected.items():
        error = (got[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_micro_batch_trains_exactly_the_unpacked_one(tiny_model, attention):
    model = trainable_copy(tiny_model, attention)
    items = [encode(model, sample) for sample in tool_samples()]
    items.append(encode(model, replace(qa_sample(5, "en", turns=3), meta={"independent_turns": True})))
    packed = pack_shared_prefixes(items, min_prefix=64, max_tokens=4096)
    assert [row.samples for row in packed] == [4, 1]  # the independent-turns sample stays as it was
    assert packed[1] is items[-1]
    row = packed[0]
    saved = sum(len(item.ids) for item in items[:4]) - len(row.ids)
    assert saved == 3 * row.branches.count(0) and saved > 3 * 200  # the prefix once instead of 4 times

    loss, gradients = loss_and_gradients(model, [[item] for item in items])
    packed_loss, packed_gradients = loss_and_gradients(model, [[r] for r in packed])
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert_same_gradients(packed_gradients, gradients)
    # Both rows in one padded batch (a 4D mask over rows of different lengths): still the same.
    together_loss, together_gradients = loss_and_gradients(model, [packed])
    torch.testing.assert_close(together_loss, loss, rtol=1e-5, atol=0)
    assert_same_gradients(together_gradients, gradients)


def target_losses(model, items: list[Encoded]) -> torch.Tensor:
    """Cross-entropy of each supervised target of `items` (one batch), in reading order."""
    batch = collate(items, model.config.vision.image_size, 0)
    with torch.no_grad():
        images = model.projector(model.vision(batch.pixels))
        embeds = model.embed(batch.ids, images)
        logits, targets, _ = model.lm.supervised_logits(embeds, batch.attention_mask, batch.labels, batch.position_ids)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


class RawPixels(torch.nn.Module):
    """A stand-in encoder whose features are the pixels themselves: (n, 3, 64, 64) -> (n, 4, 1280). The
    tiny model's random EfficientNet gives features of ~1e-9 that no image would change visibly."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)[:, : 4 * 1280].reshape(-1, 4, 1280)


def test_each_image_stays_at_its_own_slots(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.vision = RawPixels()
    first, _, third, fourth = (encode(model, sample) for sample in tool_samples())
    (row,) = pack_shared_prefixes([first, third, fourth], min_prefix=64, max_tokens=4096)
    assert row.samples == 3 and row.ids[: row.branches.count(0)].count(IMAGE_TOKEN_ID) == 0
    order = sorted([first, third, fourth], key=lambda item: item.ids)  # the packer's branch order
    assert row.images == [image for item in order for image in item.images]
    alone = torch.cat([target_losses(model, [item]) for item in order])
    torch.testing.assert_close(target_losses(model, [row]), alone, rtol=1e-5, atol=1e-5)

    # Another image in the middle branch changes that sample's targets, and only them, as it does unpacked.
    black = PILImage.new("RGB", (64, 64))
    swapped = [replace(item, images=[black]) if k == 1 else item for k, item in enumerate(order)]
    expected = torch.cat([target_losses(model, [item]) for item in swapped])
    swapped_row = replace(row, images=[black if k == 1 else image for k, image in enumerate(row.images)])
    got = target_losses(model, [swapped_row])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    counts = [sum(label != IGNORE for label in item.labels[1:]) for item in order]
    changed = (got - alone).abs() > 1e-3
    assert not changed[: counts[0]].any() and not changed[counts[0] + counts[1] :].any()
    assert changed[counts[0] : counts[0] + counts[1]].any()


def test_samples_with_other_prefixes_stay_apart(tiny_model):
    mine = [encode(tiny_model, sample) for sample in tool_samples()[:2]]
    theirs = [encode(tiny_model, sample) for sample in tool_samples(OTHER_TOOLS)[:2]]
    rows = pack_shared_prefixes(mine + theirs, min_prefix=128, max_tokens=4096)
    assert [row.samples for row in rows] == [2, 2]
    for row, group in zip(rows, (mine, theirs)):
        prefix = row.branches.count(0)
        assert prefix >= 128 and all(row.ids[:prefix] == member.ids[:prefix] for member in group)
    # Below min_prefix for what the two groups share (the system prompt), nothing merges across them.
    common = next(i for i, (a, b) in enumerate(zip(mine[0].ids, theirs[0].ids)) if a != b)
    assert len(pack_shared_prefixes([mine[0], theirs[0]], min_prefix=common + 1, max_tokens=4096)) == 2
    assert len(pack_shared_prefixes([mine[0], theirs[0]], min_prefix=common, max_tokens=4096)) == 1


def test_the_row_length_cap_is_kept(tiny_model):
    items = [encode(tiny_model, sample) for sample in tool_samples()]
    pairs = [pack_shared_prefixes([a, b], 64, 10**6)[0] for a in items for b in items if a is not b]
    two = min(len(pair.ids) for pair in pairs)  # the shortest merged pair
    rows = pack_shared_prefixes(items, min_prefix=64, max_tokens=two)
    assert [len(row.ids) for row in rows if row.samples > 1] == [two]
    assert sum(row.samples for row in rows) == 4
    assert pack_shared_prefixes(items, min_prefix=64, max_tokens=two - 1) == items  # nothing fits


def encoded(ids: list[int], first_target: int) -> Encoded:
    return Encoded(ids, [IGNORE] * first_target + ids[first_target:], [])


def test_the_prefix_ends_before_the_first_supervised_label():
    shared = list(range(100, 140))
    a, b = encoded(shared + [1, 2, 3], first_target=20), encoded(shared + [4, 5], first_target=30)
    (row,) = pack_shared_prefixes([a, b], min_prefix=8, max_tokens=1000)
    prefix = row.branches.count(0)
    assert prefix == 19  # a's label at 20 is supervised: the prefix and the branch's first label are not
    assert all(label == IGNORE for label in row.labels[: prefix + 1])
    starts = [row.branches.index(k) for k in (1, 2)]
    assert all(row.labels[start] == IGNORE for start in starts)  # no target predicted across a boundary
    assert row.positions[starts[1]] == prefix and row.positions[-1] == len(b.ids) - 1
    # Supervised from the first token on: nothing can be shared, so nothing is packed.
    c, d = encoded(shared + [1], first_target=1), encoded(shared + [2], first_target=1)
    assert pack_shared_prefixes([c, d], min_prefix=1, max_tokens=1000) == [c, d]
    # Too little left to share (first target at 8 with min_prefix 8): not packed.
    e, f = encoded(shared, first_target=8), encoded(shared + [9], first_target=30)
    assert pack_shared_prefixes([e, f], min_prefix=8, max_tokens=1000) == [e, f]


def test_identical_samples_keep_a_token_each_and_images_end_the_prefix():
    same = encoded(list(range(50)), first_target=50)
    (row,) = pack_shared_prefixes([same, copy.deepcopy(same)], min_prefix=8, max_tokens=1000)
    assert row.branches.count(1) == row.branches.count(2) == 1
    slots = list(range(20)) + [IMAGE_TOKEN_ID] * 4 + list(range(30))
    x, y = Encoded(slots, [IGNORE] * len(slots), ["x"]), Encoded(list(slots), [IGNORE] * len(slots), ["y"])
    (row,) = pack_shared_prefixes([x, y], min_prefix=8, max_tokens=1000)
    assert row.branches.count(0) == 20 and sorted(row.images) == ["x", "y"]


def test_the_most_tokens_are_saved():
    """a and b share 40 tokens, b and c share 60: with room for two, b goes with c."""
    base = list(range(60))
    a = encoded(base[:40] + [-1] * 30, first_target=70)
    b = encoded(base + [-2] * 10, first_target=70)
    c = encoded(base + [-3] * 10, first_target=70)
    rows = pack_shared_prefixes([a, b, c], min_prefix=8, max_tokens=80)
    merged = next(row for row in rows if row.samples == 2)
    assert merged.branches.count(0) == 60 and a in rows
