"""Tests for vlchat.config: validation (each bad value names its field), presets by name, and
lossless dict round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vlchat.config import (
    PRESETS,
    GenerationConfig,
    LMConfig,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
)
from vlchat.errors import VlchatError

# --- GenerationConfig ---------------------------------------------------------------------------


def test_generation_defaults_are_valid_and_greedy():
    config = GenerationConfig()
    assert config.max_new_tokens >= 1 and config.min_new_tokens == 0
    assert config.greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("num_beams", 0),
        ("max_new_tokens", 0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("temperature", float("nan")),
    ],
)
def test_generation_refuses_invalid_value_naming_the_field(field, value):
    with pytest.raises(VlchatError, match=field):
        GenerationConfig(**{field: value})


def test_generation_refuses_min_new_tokens_above_max():
    with pytest.raises(VlchatError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)
    assert GenerationConfig(max_new_tokens=4, min_new_tokens=4).min_new_tokens == 4


@pytest.mark.parametrize("value", [0.0, 1e-3, 1.0])
def test_generation_accepts_boundaries(value):
    GenerationConfig(temperature=value, top_p=1.0, top_k=0, num_beams=1, max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, greedy",
    [
        ({}, True),
        ({"temperature": 0.7}, False),
        ({"num_beams": 3}, False),
        ({"temperature": 0.0, "top_p": 0.5, "top_k": 10}, True),  # filters alone do not sample
    ],
)
def test_greedy_property(kwargs, greedy):
    assert GenerationConfig(**kwargs).greedy is greedy


def test_generation_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationConfig().temperature = 1.0  # type: ignore[misc]


# --- ModelConfig --------------------------------------------------------------------------------


def test_from_name_default_is_the_preset():
    config = ModelConfig.from_name("default")
    assert config == PRESETS["default"] == ModelConfig()
    assert config.projector.out_dim == 576 and config.vision.num_tokens == 49


def test_from_name_applies_overrides_without_mutating_the_preset():
    config = ModelConfig.from_name("default", template="other", projector_weights=None)
    assert config.template == "other" and config.projector_weights is None
    assert PRESETS["default"].template == "chatml"


def test_from_name_unknown_lists_presets():
    with pytest.raises(VlchatError, match="unknown model 'nope'") as err:
        ModelConfig.from_name("nope")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(
            name="tiny",
            vision=VisionConfig(image_size=64, weights=None, sha256=None),
            projector=ProjectorConfig(kind="mlp2x_gelu", in_dim=1280, out_dim=64),
            lm=LMConfig(source="/some/dir", sha256=None, context_window=128),
            projector_weights=None,
        ),
    ],
)
def test_dict_round_trip_is_lossless_and_json_serialisable(config):
    data = config.to_dict()
    assert ModelConfig.from_dict(data) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == config


def test_from_dict_refuses_unknown_key():
    data = ModelConfig().to_dict()
    data["colour"] = "blue"
    with pytest.raises(VlchatError, match="colour"):
        ModelConfig.from_dict(data)


def test_from_dict_partial_uses_defaults():
    assert ModelConfig.from_dict({"name": "x"}) == ModelConfig(name="x")


# --- VisionConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize("size, tokens", [(32, 1), (64, 4), (224, 49), (448, 196)])
def test_vision_num_tokens(size, tokens):
    assert VisionConfig(image_size=size, weights=None).num_tokens == tokens


@pytest.mark.parametrize("size", [0, 16, 33, 100, -32, 224.0, "224", True, None])
def test_vision_refuses_bad_image_size(size):
    with pytest.raises(VlchatError, match="image_size"):
        VisionConfig(image_size=size)


@pytest.mark.parametrize("kwargs", [{"name": ""}, {"name": None}, {"weights": ""}, {"weights": 3}])
def test_vision_refuses_bad_name_or_weights(kwargs):
    with pytest.raises(VlchatError):
        VisionConfig(**kwargs)


def test_from_dict_refuses_unknown_nested_key_with_vlchat_error():
    data = ModelConfig().to_dict()
    data["vision"]["colour"] = "blue"
    with pytest.raises(VlchatError, match="colour"):
        ModelConfig.from_dict(data)


def test_model_configs_from_before_output_rms_was_removed_load_at_its_no_op_value_only():
    data = ModelConfig().to_dict()
    assert "output_rms" not in data["projector"]
    data["projector"]["output_rms"] = 0.0  # as every model config written before the removal holds
    assert ModelConfig.from_dict(data) == ModelConfig()
    assert data["projector"]["output_rms"] == 0.0  # the caller's dict is left as it was
    data["projector"]["output_rms"] = 0.133
    with pytest.raises(VlchatError, match=r"model config 'projector': output_rms 0.133 is no longer supported"):
        ModelConfig.from_dict(data)
    data["projector"] = {"kind": "linear", "position_code": 3.0}
    with pytest.raises(VlchatError, match=r"model config 'projector': projector position_code needs a square"):
        ModelConfig.from_dict(data)
