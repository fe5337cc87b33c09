"""Tests for vlchat.model.vlm: the one checked merge (image rows land in IMAGE_TOKEN_ID slots, in
order; counts must match), the composite's embed/encode shapes on the tiny and default models, and
load_model's dimension check."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EXAMPLES, tiny_config

from vlchat.errors import VlchatError
from vlchat.images import load_image
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model, merge_image_embeddings

S = IMAGE_TOKEN_ID


def test_merge_places_image_rows_in_slot_order_and_keeps_text_rows():
    ids = torch.tensor([[5, S, S, 6, S, S], [S, S, 7, 8, 9, 10]])  # (B=2, T=6): 3 images of N=2 tokens
    text = torch.randn(2, 6, 4)  # (B, T, D)
    images = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)  # (n, N, D)
    merged = merge_image_embeddings(ids, text, images)

    assert merged.shape == text.shape
    torch.testing.assert_close(merged[0, 1:3], images[0], rtol=0, atol=0)
    torch.testing.assert_close(merged[0, 4:6], images[1], rtol=0, atol=0)
    torch.testing.assert_close(merged[1, 0:2], images[2], rtol=0, atol=0)
    text_rows = ids != S
    torch.testing.assert_close(merged[text_rows], text[text_rows], rtol=0, atol=0)


def test_merge_does_not_modify_its_inputs():
    ids = torch.tensor([[1, S, 2]])
    text = torch.zeros(1, 3, 2)
    merge_image_embeddings(ids, text, torch.ones(1, 1, 2))
    assert torch.equal(text, torch.zeros(1, 3, 2))


def test_merge_casts_images_to_the_text_dtype():
    ids = torch.tensor([[1, S]])
    merged = merge_image_embeddings(ids, torch.zeros(1, 2, 3, dtype=torch.float64), torch.ones(1, 1, 3))
    assert merged.dtype == torch.float64 and merged[0, 1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "ids, n_images",
    [
        ([[1, S, S, 2]], 2),  # fewer slots than images
        ([[1, S, S, S, S, 2]], 1),  # more slots than images
        ([[1, S, S, S, 2]], 1),  # not a whole number of images
        ([[1, S, S, 2]], 0),  # slots without any image
        ([[1, 2, 3, 4]], 1),  # an image without any slot
    ],
)
def test_merge_refuses_mismatched_counts(ids, n_images):
    ids = torch.tensor(ids)
    with pytest.raises(VlchatError, match="do not match"):
        merge_image_embeddings(ids, torch.zeros(*ids.shape, 4), torch.zeros(n_images, 2, 4))


def test_embed_without_images_or_slots_is_the_text_embedding(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4]])
    embeds = tiny_model.embed(ids, None)
    assert embeds.shape == (1, 4, 64)
    torch.testing.assert_close(embeds, tiny_model.lm.embed(ids), rtol=0, atol=0)


def test_embed_with_slots_but_no_images_is_refused(tiny_model):
    ids = torch.tensor([[1] + [S] * tiny_model.tokens_per_image + [2]])
    with pytest.raises(VlchatError, match="do not match"):
        tiny_model.embed(ids, None)


def test_tiny_encode_and_embed_an_image(tiny_model):
    assert tiny_model.tokens_per_image == 4  # 64 px -> 2 x 2 grid
    pixels = torch.randn(2, 3, 64, 64)  # (B, 3, S, S)
    with torch.no_grad():
        images = tiny_model.encode_images(pixels)
    assert images.shape == (2, 4, 64)  # (B, N, D)

    ids = torch.tensor([[1] + [S] * 4 + [2, 3] + [S] * 4])  # (1, T=11): two images
    with torch.no_grad():
        embeds = tiny_model.embed(ids, images)
    assert embeds.shape == (1, 11, 64)
    torch.testing.assert_close(embeds[0, 1:5], images[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, 7:11], images[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, 5:7], tiny_model.lm.embed(torch.tensor([2, 3])), rtol=0, atol=0)


def test_default_model_encodes_chelsea(default_model):
    assert default_model.tokens_per_image == 49
    pixels = default_model.pixels(load_image(EXAMPLES / "chelsea.jpg"))
    assert pixels.shape == (3, 224, 224)
    with torch.no_grad():
        images = default_model.encode_images(pixels[None])
    assert images.shape == (1, 49, 576)
    assert torch.isfinite(images).all()


def test_default_model_frozen_parts(default_model):
    assert not any(p.requires_grad for p in default_model.vision.parameters())
    assert not any(p.requires_grad for p in default_model.lm.parameters())
    assert not default_model.training


@pytest.mark.parametrize("field, value", [("out_dim", 32), ("in_dim", 1000)])
def test_load_model_refuses_projector_dims_that_do_not_fit(tiny_lm_dir, field, value):
    config = tiny_config(tiny_lm_dir)
    config = dataclasses.replace(config, projector=dataclasses.replace(config.projector, **{field: value}))
    with pytest.raises(VlchatError, match="do not fit"):
        load_model(config)
