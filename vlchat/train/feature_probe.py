"""Can an object's shape, colour and size be read off the one image token at its centre?
python -m vlchat.train.feature_probe [--model NAME|FILE] [--scenes N].

Renders synthetic training scenes, runs the model's frozen vision encoder, takes for every
object the token whose 32-px cell holds its cell centre, and fits a linear classifier (softmax
regression on standardised features: the first 3/4 of the objects to fit, the rest to score)
for each attribute, on three slices of the same tokens: the encoder's head alone, its tapped
blocks alone (average-pooled to the grid, `VisionConfig.taps`), and both, as the projector gets
them. A high score means the attribute is in that token, linearly, so a projector can pass it
on; a stage 2 that still cannot answer "what colour is the star?" is failing to find the
token (binding), not to read it. Forward only, no training of the model.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from vlchat.errors import VlchatError
from vlchat.images import to_tensor
from vlchat.model.vision import HEAD_CHANNELS, VisionEncoder
from vlchat.train.synth import cell_centre, render
from vlchat.train.synth_scene import COLOURS, HELD_OUT_SEEDS, SHAPES, SIZES, SceneObject, make_scene

ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}
FIT_SHARE = 0.75  # of the objects, in scene order: the rest are scored


def centre_token(obj: SceneObject, image_size: int, grid: int) -> int:
    """Row-major index of the grid x grid token whose cell holds the object's cell centre."""
    x, y = cell_centre(obj.position, image_size)
    cell = image_size / grid
    return int(y // cell) * grid + int(x // cell)


def object_tokens(encoder: VisionEncoder, seeds: range, batch: int = 32) -> tuple[torch.Tensor, list[SceneObject]]:
    """(objects, C) the encoder's token at each object's centre, and the objects, scene by scene."""
    size, grid = encoder.image_size, math.isqrt(encoder.num_tokens)
    rows, objects = [], []
    for start in range(seeds.start, seeds.stop, batch):
        scenes = [make_scene(seed) for seed in range(start, min(start + batch, seeds.stop))]
        with torch.no_grad():
            tokens = encoder(torch.stack([to_tensor(render(s, size), size) for s in scenes]))  # (B, N, C)
        for scene, image_tokens in zip(scenes, tokens):
            for obj in scene.objects:
                rows.append(image_tokens[centre_token(obj, size, grid)])
                objects.append(obj)
    return torch.stack(rows), objects


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


def measure(encoder: VisionEncoder, scenes: int) -> dict[str, dict[str, float]]:
    """{feature slice: {attribute: held-back accuracy}} over the objects of `scenes` scenes."""
    features, objects = object_tokens(encoder, range(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + scenes))
    slices = {"head": features[:, :HEAD_CHANNELS]}
    if features.shape[1] > HEAD_CHANNELS:
        slices |= {f"taps {list(encoder.config.taps)}": features[:, HEAD_CHANNELS:], "head + taps": features}
    out = {}
    for name, x in slices.items():
        out[name] = {attr: linear_probe(x, torch.tensor([values.index(getattr(o, attr)) for o in objects]),
                                        len(values)) for attr, values in ATTRIBUTES.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    from vlchat.assets import verified_file
    from vlchat.config import ModelConfig
    from vlchat.model.vision import load_vision_encoder

    parser = argparse.ArgumentParser(prog="python -m vlchat.train.feature_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="a preset name or a model config file")
    parser.add_argument("--scenes", type=int, default=1200, help="scenes to render (about 2.5 objects each)")
    args = parser.parse_args(argv)
    try:
        if args.scenes < 4:
            raise VlchatError("--scenes must be at least 4")
        vision = ModelConfig.from_name(args.model).vision
        weights = verified_file(vision.weights, vision.sha256) if vision.weights else None
        encoder = load_vision_encoder(vision, weights)
        results = measure(encoder, args.scenes)
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"linear probe, {args.model}'s vision encoder, {args.scenes} held-out scenes: "
          f"accuracy on the last {1 - FIT_SHARE:.0%} of the objects (%)")
    print("| features | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---:|" * len(ATTRIBUTES))
    for name, accuracy in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * accuracy[a]:.1f}" for a in ATTRIBUTES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
