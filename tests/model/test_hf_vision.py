"""CLIP and SigLIP vision towers from transformers behind vlchat's vision-encoder seam, with the
checkpoint's own preprocessing, against transformers on tiny random checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.hf_tiny import photo, save_tiny_vision, tiny_llama_config, tiny_tokenizer
from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError
from vlchat.model.hf_vision import ImagePreprocess, shortest_edge_size
from vlchat.model.vision import load_vision_encoder


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {kind: save_tiny_vision(root / kind, kind) for kind in ("clip", "siglip")}


def vision_config(kind: str, directory, **overrides) -> VisionConfig:
    base = dict(name=kind, image_size=28, patch_size=7, weights=None, sha256=None, source=str(directory))
    return VisionConfig(**{**base, **overrides})


def reference(kind: str, directory):
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    model = (CLIPVisionModel if kind == "clip" else SiglipVisionModel).from_pretrained(directory).eval()
    return model, AutoImageProcessor.from_pretrained(directory)


@pytest.mark.parametrize("size", [(50, 40), (40, 50), (28, 28), (97, 31)])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocessing_equals_the_checkpoints_processor(towers, kind, size):
    encoder = load_vision_encoder(vision_config(kind, towers[kind]), None)
    _, processor = reference(kind, towers[kind])
    image = photo(1, size)
    theirs = processor(images=image, return_tensors="pt").pixel_values[0]
    ours = encoder.preprocess(image)
    assert ours.shape == theirs.shape == (3, 28, 28)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kind, layer, keep_cls, tokens",
    [("clip", -2, False, 16), ("clip", -1, True, 17), ("siglip", -1, False, 16), ("siglip", -2, False, 16)],
)
def test_features_are_the_configured_hidden_state(towers, kind, layer, keep_cls, tokens):
    config = vision_config(kind, towers[kind], feature_layer=layer, keep_cls=keep_cls)
    encoder = load_vision_encoder(config, None)
    model, processor = reference(kind, towers[kind])
    pixels = processor(images=photo(), return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        ours = encoder(pixels)
    expected = hidden[:, 1:] if kind == "clip" and not keep_cls else hidden
    assert ours.shape == (1, tokens, 24) and config.num_tokens == tokens
    assert torch.equal(ours, expected)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_shortest_edge_truncates_the_long_side_like_transformers():
    assert shortest_edge_size((50, 40), 28) == (35, 28)
    assert shortest_edge_size((40, 50), 28) == (28, 35)
    assert shortest_edge_size((97, 31), 28) == (87, 28)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(name="siglip"), ["holds a 'clip_vision_model' model", "'siglip'"]),
        (dict(image_size=35, patch_size=7), ["28 px images in 7 px patches", "image_size 35"]),
        (dict(source=None), ["needs a source"]),
        (dict(source="/nonexistent/tower"), ["not a checkpoint directory"]),
    ],
)
def test_wrong_vision_configs_fail_with_one_line(towers, overrides, words):
    with pytest.raises(VlchatError) as error:
        load_vision_encoder(vision_config("clip", towers["clip"], **overrides), None)
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_keep_cls_on_siglip_is_refused(towers):
    with pytest.raises(VlchatError, match="no CLS token"):
        load_vision_encoder(vision_config("siglip", towers["siglip"], keep_cls=True), None)


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(VlchatError, match="multiple of 14"):
        VisionConfig(name="clip", image_size=300, patch_size=14)
    assert VisionConfig(name="clip", image_size=336, patch_size=14, weights=None).num_tokens == 576


def test_preprocessing_reads_old_int_sizes(tmp_path):
    (tmp_path / "p.json").write_text(
        json.dumps({"size": 28, "crop_size": 28, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    preprocess = ImagePreprocess.from_file(tmp_path / "p.json")
    assert (preprocess.shortest_edge, preprocess.crop) == (28, (28, 28))


def test_a_clip_tower_drives_a_vlchat_model(towers, tmp_path):
    """The tower behind the seam: the default model path with a CLIP encoder, a fresh projector and an LM dir."""
    from transformers import LlamaForCausalLM

    from vlchat.chat.engine import Chat
    from vlchat.model.vlm import load_model

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    config = ModelConfig(
        name="clip-tiny",
        vision=vision_config("clip", towers["clip"], feature_layer=-2),
        projector=ProjectorConfig(kind="mlp2x_gelu", in_dim=24, out_dim=32),
        lm=LMConfig(source=str(tmp_path / "lm"), sha256=None, dtype="float32"),
        template="vicuna_v0",
        projector_weights=None,
    )
    model = load_model(config)
    session = Chat(model).session(generation=replace(Chat(model).session().generation, max_new_tokens=3))
    session.upload_img(photo())
    session.ask("What is in the picture?")
    session.answer()
    assert model.tokens_per_image == 16 and session.timings.prompt_tokens > 16
