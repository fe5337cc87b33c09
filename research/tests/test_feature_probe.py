"""The per-token linear probe (research/feature_probe.py): which token an object is read from,
that the probe scores what it should on made-up features, and the CLI on the real encoder."""

from __future__ import annotations

import re

import pytest
import torch

from research.feature_probe import ATTRIBUTES, centre_token, linear_probe, main, measure, variance_share
from vlchat.config import ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError
from vlchat.model.projector import Projector
from vlchat.model.vision import HEAD_CHANNELS, VisionEncoder
from vlchat.train.synth_scene import SceneObject


@pytest.mark.parametrize(
    "position, token",
    [("left", 3 * 7 + 1), ("right", 3 * 7 + 5), ("top", 1 * 7 + 3), ("bottom", 5 * 7 + 3), ("centre", 3 * 7 + 3)],
)
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


def test_variance_share_is_the_between_class_part_of_normalised_variance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (800,), generator=generator)
    noise = torch.randn(800, 32, generator=generator)
    loud, quiet = noise.clone(), noise.clone()
    loud[torch.arange(800), labels] += 6.0
    quiet[torch.arange(800), labels] += 0.5
    assert variance_share(loud, labels) > 0.4 > 0.05 > variance_share(quiet, labels)
    assert variance_share(noise, labels) < 0.02  # 4 classes of pure noise: about 3/800
    assert variance_share(loud * 100, labels) == pytest.approx(variance_share(loud, labels), rel=1e-4)  # scale-free
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    assert variance_share(one_hot, labels) == pytest.approx(1.0)  # the class is all there is


def test_measure_slices_head_and_taps_of_the_same_tokens():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(image_size=64, weights=None, sha256=None, taps=(7,))).eval()
    projector = Projector(ProjectorConfig(kind="linear", in_dim=encoder.hidden_size, out_dim=16, position_tokens=4))
    results = measure(encoder, 12, {"p": projector})
    assert list(results) == ["head", "taps [7]", "head + taps", "projector p"]
    for scores in results.values():
        assert list(scores) == list(ATTRIBUTES)
        assert all(0.0 <= s.accuracy <= 1.0 and 0.0 <= s.share <= 1.0 for s in scores.values())
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
    assert main(["--scenes", "8", "--projector", "no/such/projector"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: cannot read projector config")


def test_cli_scores_the_shipped_projector_s_tokens(capsys):
    assert main(["--scenes", "40", "--projector", "vlchat/weights/default-projector"]) == 0
    out = capsys.readouterr().out
    assert "colour share" in out
    row = re.search(r"^\| projector vlchat/weights/default-projector ((?:\| [\d.]+ )+)\|$", out, re.M)
    shape, colour, size, shape_share, colour_share, size_share = (float(c) for c in row.group(1).split("|")[1:])
    assert shape > 50 and 0 < colour_share < 100
