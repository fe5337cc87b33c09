"""Can an object's shape, colour and size be read off the one image token at its centre?
python -m research.feature_probe [--model NAME|FILE] [--scenes N].

Renders synthetic training scenes, runs the model's frozen vision encoder, takes for every
object the token whose 32-px cell holds its cell centre, and fits a linear classifier (softmax
regression on standardised features: the first 3/4 of the objects to fit, the rest to score)
for each attribute, on three slices of the same tokens: the encoder's head alone, its tapped
blocks alone (average-pooled to the grid, `VisionConfig.taps`), and both, as the projector gets
them. A high score means the attribute is in that token, linearly, so a projector can pass it
on; a stage 2 that still cannot answer "what colour is the star?" is failing to find the
token (binding), not to read it. Forward only, no training of the model.

`--projector STEM` (repeatable) adds the same tokens after a trained projector, as the LM gets
them, and every row also gives each attribute's share of the tokens' variance (between-class
variance over total, after RMS-normalising each token as the LM's first norm does): how loud the
attribute is among everything else a token says, which a linear probe, standardising every
channel, cannot see. The shipped projector and the stalled runs' differ there, not in the probe.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlchat.errors import VlchatError
from vlchat.images import to_tensor
from vlchat.model.loaders import model_config
from vlchat.model.projector import Projector
from vlchat.model.vision import HEAD_CHANNELS, VisionEncoder
from vlchat.train.synth import cell_centre, render
from vlchat.train.synth_scene import COLOURS, HELD_OUT_SEEDS, SHAPES, SIZES, Scene, SceneObject, make_scene

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}
FIT_SHARE = 0.75  # of the objects, in scene order: the rest are scored


def centre_token(obj: SceneObject, image_size: int, grid: int) -> int:
    """Row-major index of the grid x grid token whose cell holds the object's cell centre."""
    x, y = cell_centre(obj.position, image_size)
    cell = image_size / grid
    return int(y // cell) * grid + int(x // cell)


def scene_tokens(encoder: VisionEncoder, seeds: range, batch: int = 32) -> tuple[torch.Tensor, list[Scene]]:
    """(scenes, N, C) the encoder's tokens of each seed's rendered scene, and the scenes."""
    size = encoder.image_size
    scenes = [make_scene(seed) for seed in seeds]
    tokens = []
    for start in range(0, len(scenes), batch):
        with torch.no_grad():
            tokens.append(
                encoder(torch.stack([to_tensor(render(s, size), size) for s in scenes[start : start + batch]]))
            )
    return torch.cat(tokens), scenes


def centre_rows(tokens: torch.Tensor, scenes: list[Scene], image_size: int) -> tuple[torch.Tensor, list[SceneObject]]:
    """(objects, C) each object's token at its centre from (scenes, N, C), and the objects in order."""
    grid = math.isqrt(tokens.shape[1])
    rows, objects = [], []
    for scene, image_tokens in zip(scenes, tokens):
        for obj in scene.objects:
            rows.append(image_tokens[centre_token(obj, image_size, grid)])
            objects.append(obj)
    return torch.stack(rows), objects


def variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class share of the variance of RMS-normalised (objects, C) features, 0-1."""
    x = features.float() / features.float().pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    centred = x - x.mean(0)
    class_means = torch.zeros(int(labels.max()) + 1, x.shape[1]).index_add_(0, labels, centred)
    class_means /= torch.bincount(labels, minlength=class_means.shape[0]).clamp_min(1).unsqueeze(1)
    return (class_means[labels].pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12)).item()


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Test accuracy of softmax regression fitted on the first FIT_SHARE of (features, labels)."""
    fit = int(len(labels) * FIT_SHARE)
    if fit < 1 or fit == len(labels):
        raise VlchatError(f"a probe needs objects both to fit and to score, got {len(labels)}")
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-5
    x = (features - mean) / std  # (objects, C)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):  # full batch; a little L2 keeps the 1,000+ dimensions from overfitting
        optimizer.zero_grad()
        loss = F.cross_entropy(x[:fit] @ weight + bias, labels[:fit]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((x[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean().item()


class Score(NamedTuple):
    accuracy: float  # held-back accuracy of the linear probe, 0-1
    share: float  # the attribute's share of the tokens' variance, 0-1 (variance_share)


def measure(
    encoder: VisionEncoder,
    scenes: int,
    projectors: dict[str, Projector] | None = None,
) -> dict[str, dict[str, Score]]:
    """{feature slice: {attribute: Score}} over the objects of `scenes` held-out scenes; each of
    `projectors` adds a row of the same tokens after it."""
    tokens, drawn = scene_tokens(encoder, range(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + scenes))
    features, objects = centre_rows(tokens, drawn, encoder.image_size)
    slices = {"head": features[:, :HEAD_CHANNELS]}
    if features.shape[1] > HEAD_CHANNELS:
        slices |= {f"taps {list(encoder.config.taps)}": features[:, HEAD_CHANNELS:], "head + taps": features}
    for name, projector in (projectors or {}).items():
        with torch.no_grad():
            projected = projector.float().eval()(tokens.float())  # (scenes, N, D), as the LM gets them
        slices[f"projector {name}"] = centre_rows(projected, drawn, encoder.image_size)[0]
    labels = {
        attr: torch.tensor([values.index(getattr(o, attr)) for o in objects]) for attr, values in ATTRIBUTES.items()
    }
    return {
        name: {
            attr: Score(linear_probe(x, labels[attr], len(ATTRIBUTES[attr])), variance_share(x, labels[attr]))
            for attr in ATTRIBUTES
        }
        for name, x in slices.items()
    }


def main(argv: list[str] | None = None) -> int:
    from vlchat.assets import verified_file
    from vlchat.model.projector import load_projector, read_projector_config
    from vlchat.model.vision import load_vision_encoder

    parser = argparse.ArgumentParser(prog="python -m research.feature_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="a preset name or a model config file")
    parser.add_argument("--scenes", type=int, default=1200, help="scenes to render (about 2.5 objects each)")
    parser.add_argument(
        "--projector",
        action="append",
        default=[],
        metavar="STEM",
        help="also score the tokens after this projector (e.g. runs/stage1/projector); repeatable",
    )
    args = parser.parse_args(argv)
    try:
        if args.scenes < 4:
            raise VlchatError("--scenes must be at least 4")
        vision = model_config(args.model).vision
        projectors = {}
        for stem in args.projector:  # every file is checked before the encoder runs
            try:
                projectors[stem] = load_projector(stem, read_projector_config(stem))
            except FileNotFoundError:
                raise VlchatError(f"no projector at {stem} (expected {stem}.safetensors and {stem}.json)") from None
        weights = verified_file(vision.weights, vision.sha256) if vision.weights else None
        encoder = load_vision_encoder(vision, weights)
        results = measure(encoder, args.scenes, projectors)
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"linear probe, {args.model}'s vision encoder, {args.scenes} held-out scenes: accuracy on the "
        f"last {1 - FIT_SHARE:.0%} of the objects, and each attribute's share of the token variance (%)"
    )
    print("| features | " + " | ".join(ATTRIBUTES) + " | " + " | ".join(f"{a} share" for a in ATTRIBUTES) + " |")
    print("|---|" + "---:|" * 2 * len(ATTRIBUTES))
    for name, scores in results.items():
        cells = [f"{100 * scores[a].accuracy:.1f}" for a in ATTRIBUTES] + [
            f"{100 * scores[a].share:.1f}" for a in ATTRIBUTES
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
