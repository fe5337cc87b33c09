"""LLaVA-1.5 (HF layout) through vlchat's own engine against transformers' LlavaForConditionalGeneration,
on a tiny random checkpoint built from a config and saved locally."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import photo, save_tiny_llava
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import slot_ids
from vlchat.config import GenerationConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "tiny-llava-hf"
    reference, _ = save_tiny_llava(out)
    return out, reference


def float32(config: ModelConfig) -> ModelConfig:
    return replace(config, lm=replace(config.lm, dtype="float32"))


@pytest.fixture(scope="module")
def vlchat_model(checkpoint):
    return load_model(float32(model_config(str(checkpoint[0]))))


@pytest.fixture(scope="module")
def reference_inputs(checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=photo(), text=prompt, return_tensors="pt")


def asked_session(model):
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=12))
    session.upload_img(photo())
    session.ask(QUESTION)
    return session


def test_config_is_read_from_the_checkpoint(checkpoint):
    config = model_config(str(checkpoint[0]))
    assert (config.vision.name, config.vision.feature_layer, config.vision.keep_cls) == ("clip", -2, False)
    assert (config.vision.image_size, config.vision.patch_size, config.vision.num_tokens) == (28, 7, 16)
    assert (config.projector.kind, config.projector.in_dim, config.projector.out_dim) == ("mlp2x_gelu", 24, 32)
    assert config.template.startswith("hf:") and config.checkpoint == str(checkpoint[0].resolve())
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # data, serialisable


def test_prompt_tokens_and_pixels_equal_the_processors(vlchat_model, reference_inputs, checkpoint):
    session = asked_session(vlchat_model)
    ids = slot_ids(session.position_keys(session.conversation()))
    image_token = checkpoint[1].config.image_token_index
    expected = [IMAGE_TOKEN_ID if i == image_token else i for i in reference_inputs.input_ids[0].tolist()]
    assert ids == expected
    pixels = vlchat_model.pixels(photo())
    assert torch.allclose(pixels, reference_inputs.pixel_values[0], atol=1e-5)


def test_image_features_and_logits_equal_transformers(vlchat_model, reference_inputs, checkpoint):
    reference = checkpoint[1]
    pixels = reference_inputs.pixel_values
    with torch.no_grad():
        theirs = reference.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output[0]
        ours = vlchat_model.encode_images(vlchat_model.pixels(photo())[None])[0]
        assert ours.shape == theirs.shape == (16, 32)
        assert (ours - theirs).abs().max() < 1e-4
        their_logits = reference(**reference_inputs).logits[0]  # (T, V)
        ids = reference_inputs.input_ids.masked_fill(
            reference_inputs.input_ids == reference.config.image_token_index, IMAGE_TOKEN_ID
        )
        embeds = vlchat_model.embed(ids, ours[None])
        our_logits = vlchat_model.lm.model(inputs_embeds=embeds).logits[0]
        last, _ = vlchat_model.lm.prefill(embeds)
    assert (our_logits - their_logits).abs().max() < 1e-4
    assert (last[0] - their_logits[-1]).abs().max() < 1e-4


def test_greedy_generation_equals_transformers(vlchat_model, reference_inputs, checkpoint):
    session = asked_session(vlchat_model)
    session.answer()
    ours = list(session.messages[-1].token_ids or vlchat_model.lm.tokenize(session.messages[-1].content))
    with torch.no_grad():
        out = checkpoint[1].generate(**reference_inputs, max_new_tokens=12, do_sample=False)
    theirs = out[0, reference_inputs.input_ids.shape[1] :].tolist()
    theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
    assert len(ours) > 0
    assert ours == theirs


def hub_layout(state: dict) -> dict:
    """The key layout of llava-hf repositories on the hub (vision_tower.vision_model.*)."""
    return {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}


def internal_layout(state: dict) -> dict:
    """The module names of transformers 5's LlavaForConditionalGeneration (model.language_model.* ...)."""
    out = {}
    for key, value in state.items():
        key = key.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")
        key = key.replace("vision_tower.", "model.vision_tower.").replace(
            "multi_modal_projector.", "model.multi_modal_projector."
        )
        out[key] = value
    return out


@pytest.mark.parametrize("layout", [hub_layout, internal_layout])
def test_other_key_layouts_load_the_same_weights(checkpoint, vlchat_model, tmp_path, layout):
    copy = tmp_path / "relaid"
    shutil.copytree(checkpoint[0], copy)
    save_file(layout(load_file(copy / "model.safetensors")), copy / "model.safetensors")
    model = load_model(float32(model_config(str(copy))))
    pixels = model.pixels(photo())[None]
    assert torch.equal(model.encode_images(pixels), vlchat_model.encode_images(pixels))


def broken_copy(checkpoint, tmp_path, edit):
    copy = tmp_path / "broken"
    shutil.copytree(checkpoint[0], copy)
    edit(copy)
    return copy


def drop_key(copy):
    state = load_file(copy / "model.safetensors")
    del state["multi_modal_projector.linear_2.weight"]
    save_file(state, copy / "model.safetensors")


def other_width(copy):
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (copy / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, words",
    [
        (drop_key, ["lacks the projector weight 'net.2.weight'"]),
        (other_width, ["language model weight", "mlp", "(32, 64)", "(32, 96)", "different models"]),
        (lambda c: (c / "model.safetensors").write_bytes(b"not safetensors"), ["cannot read weights", "corrupt"]),
        (lambda c: (c / "model.safetensors").unlink(), ["has no weights"]),
        (lambda c: (c / "preprocessor_config.json").unlink(), ["no preprocessor_config.json"]),
    ],
)
def test_wrong_checkpoints_fail_with_one_line(checkpoint, tmp_path, edit, words):
    copy = broken_copy(checkpoint, tmp_path, edit)
    with pytest.raises(VlchatError) as error:
        load_model(float32(model_config(str(copy))))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message
