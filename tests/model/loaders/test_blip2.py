"""BLIP-2 (HF layout, OPT decoder) through vlchat's own engine against transformers'
Blip2ForConditionalGeneration, on a tiny random checkpoint built from a config and saved locally."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import photo, save_tiny_blip2
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import slot_ids
from vlchat.config import GenerationConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model

QUESTION = "What is in the picture?"
QUERIES = 8  # the tiny model's num_query_tokens (32 in the published checkpoints)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("blip2") / "tiny-blip2-opt"
    reference, _ = save_tiny_blip2(out, num_query_tokens=QUERIES)
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
    return processor(images=photo(), text=f"Question: {QUESTION} Answer:", return_tensors="pt")


def asked_session(model, max_new_tokens: int = 12):
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=max_new_tokens))
    session.upload_img(photo())
    session.ask(QUESTION)
    return session


def test_config_is_read_from_the_checkpoint(checkpoint):
    config = model_config(str(checkpoint[0]))
    assert (config.vision.name, config.vision.feature_layer, config.vision.keep_cls) == ("blip2", -1, True)
    assert (config.vision.image_size, config.vision.patch_size, config.vision.num_tokens) == (28, 7, 17)
    assert (config.projector.kind, config.projector.in_dim, config.projector.out_dim) == ("qformer", 24, 32)
    assert config.template == "blip2" and config.checkpoint == str(checkpoint[0].resolve())
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # data, serialisable


def test_prompt_puts_the_queries_before_bos_as_the_processor_does(vlchat_model, reference_inputs, checkpoint):
    assert vlchat_model.tokens_per_image == QUERIES
    session = asked_session(vlchat_model)
    ids = slot_ids(session.position_keys(session.conversation()))
    image_token = checkpoint[1].config.image_token_index
    expected = [IMAGE_TOKEN_ID if i == image_token else i for i in reference_inputs.input_ids[0].tolist()]
    assert expected[QUERIES] == 2  # "</s>", OPT's BOS, right after the image
    assert ids == expected
    assert torch.allclose(vlchat_model.pixels(photo()), reference_inputs.pixel_values[0], atol=1e-5)


def test_image_features_and_logits_equal_transformers(vlchat_model, reference_inputs, checkpoint):
    reference = checkpoint[1]
    with torch.no_grad():
        theirs = reference.get_image_features(pixel_values=reference_inputs.pixel_values).pooler_output[0]
        ours = vlchat_model.encode_images(vlchat_model.pixels(photo())[None])[0]
        assert ours.shape == theirs.shape == (QUERIES, 32)  # after the language projection
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
    assert len(set(ours)) > 1  # a real sequence, not one token repeated
    assert ours == theirs


def test_a_follow_up_turn_keeps_the_image_in_front(vlchat_model):
    session = asked_session(vlchat_model, max_new_tokens=3)
    session.answer()
    session.ask("And its colour?")
    keys = session.position_keys(session.conversation())
    assert [isinstance(k, tuple) for k in keys[:QUERIES]] == [True] * QUERIES
    assert not any(isinstance(k, tuple) for k in keys[QUERIES:])
    text = vlchat_model.lm.detokenize(slot_ids(keys)[QUERIES:])
    assert text.startswith("</s>Question: What is in the picture? Answer:")
    assert text.endswith("</s>Question: And its colour? Answer:")
    session.answer()  # reuses the first turn's cache
    assert session.timings.reused_tokens > QUERIES


def test_hf_vision_tower_output_is_the_post_layernorm_state(vlchat_model, reference_inputs, checkpoint):
    with torch.no_grad():
        theirs = checkpoint[1].vision_model(pixel_values=reference_inputs.pixel_values).last_hidden_state
        ours = vlchat_model.vision(reference_inputs.pixel_values)
    assert ours.shape == (1, 17, 24)
    assert torch.allclose(ours, theirs, atol=1e-6)


def broken_copy(checkpoint, tmp_path, edit):
    copy = tmp_path / "broken"
    shutil.copytree(checkpoint[0], copy)
    edit(copy)
    return copy


def drop_key(copy):
    state = load_file(copy / "model.safetensors")
    del state["query_tokens"]
    save_file(state, copy / "model.safetensors")


def other_qformer_width(copy):
    config = json.loads((copy / "config.json").read_text())
    config["qformer_config"]["intermediate_size"] = 40
    (copy / "config.json").write_text(json.dumps(config))


def encoder_decoder(copy):
    config = json.loads((copy / "config.json").read_text())
    config["text_config"] = {"model_type": "t5", "d_model": 32, "vocab_size": 100}
    (copy / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, words",
    [
        (drop_key, ["lacks the Q-Former weight 'query_tokens'"]),
        (other_qformer_width, ["Q-Former weight", "intermediate", "(32,)", "(40,)", "different models"]),
        (encoder_decoder, ["t5", "encoder-decoder", "not supported"]),
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
