"""The per-token linear probe (vlchat/train/feature_probe.py): which token an object is read from,
that the probe scores what it should on made-up features, and the CLI on the real encoder."""

from __future__ import annotations

import re

import pytest
import torch

from vlchat.config import VisionConfig
from vlchat.errors import VlchatError
from vlchat.model.vision import HEAD_CHANNELS, VisionEncoder
from vlchat.train.feature_probe import ATTRIBUTES, centre_token, linear_probe, main, measure
from vlchat.train.synth_scene import SceneObject


@pytest.mark.parametrize("position, token", [("left", 3 * 7 + 1), ("right", 3 * 7 + 5), ("top", 1 * 7 + 3),
                                             ("bottom", 5 * 7 + 3), ("centre", 3 * 7 + 3)])
def test_centre_token_is_the_cell_under_each_position(position, token):
    obj = SceneObject("star", "red", "small", position)
    assert centre_token(obj, 224, 7) == token  # 224 px, 32-px cells: cell centres at 37, 112, 187 px
    assert centre_token(obj, 64, 2) == {"left": 2, "right": 3, "top": 1, "bottom": 3, "centre": 3}[position]


def test_probe_reads_a_linear_attribute_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = torch.randn(400, 32, generator=generator)
    features[torch.arange(400), labels] += 4.0  # each class raises its own of 32 noisy dimensions
    assert linear_probe(features, labels, 4) > 0.9
    unrelated = torch.randint(0, 4, (400,), generator=generator)
    assert linear_probe(features, unrelated, 4) < 0.45  # chance is 0.25
    with pytest.raises(VlchatError, match="both to fit and to score"):
        linear_probe(features[:1], labels[:1], 4)


def test_measure_slices_head_and_taps_of_the_same_tokens():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(image_size=64, weights=None, sha256=None, taps=(7,))).eval()
    results = measure(encoder, 12)
    assert list(results) == ["head", "taps [7]", "head + taps"]
    for accuracy in results.values():
        assert list(accuracy) == list(ATTRIBUTES) and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert encoder.hidden_size == HEAD_CHANNELS + 80
    assert list(measure(VisionEncoder(VisionConfig(image_size=64, weights=None, sha256=None)).eval(), 8)) == ["head"]


def test_cli_on_the_default_encoder_prints_a_table_and_fails_cleanly(capsys):
    assert main(["--scenes", "60"]) == 0
    out = capsys.readouterr().out
    assert "| features | shape | colour | size |" in out
    rows = dict(re.findall(r"^\| (head|taps \[7, 10\]|head \+ taps) ((?:\| [\d.]+ )+)\|$", out, re.M))
    assert set(rows) == {"head", "taps [7, 10]", "head + taps"}
    shape = float(rows["taps [7, 10]"].split("|")[1])
    assert shape > 50  # 7 shapes: chance is 14%; the packaged ImageNet weights read them
    assert main(["--scenes", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --scenes must be at least 4"
