"""Where does a trained model read an image's layout from?
python -m research.token_ablation [--model NAME|FILE] [--scenes N].

Scores the held-out probe (vlchat/train/probe.py: each question asked alone, an answer right when every
token is the model's top choice) with the image tokens moved. An image token has three things
that can say where it is: its content (the encoder's features, which know little of absolute
position beyond border effects), the projector's slot-bound position signals (the learned
position embedding, and the grid code of `position_code`), and its place in the sequence (the
LM's rotary positions, in row-major order). Mirroring the content left <-> right while the slot
signals stay tells which of them a position answer follows: if "left" answers stay right, the
model reads the slot; if they flip, it reads the content. Forward only, no training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.projector import Projector


@dataclass(frozen=True)
class Ablation:
    name: str
    content: str = "same"  # same | mirrored | permuted: the encoder's tokens, before the projector
    slots: str = "same"  # same | zeroed | mirrored: the position embedding and grid code


ABLATIONS = (
    Ablation("as trained"),
    Ablation("slot signals zeroed", slots="zeroed"),
    Ablation("slot signals mirrored", slots="mirrored"),
    Ablation("content mirrored", content="mirrored"),
    Ablation("content and slot signals mirrored", content="mirrored", slots="mirrored"),
    Ablation("content permuted", content="permuted"),
)


def grid_order(tokens: int, how: str, seed: int = 0) -> torch.Tensor:
    """(tokens,) the row-major token indices a square grid takes its tokens from: `mirrored`
    swaps left and right, `permuted` is a seeded random order, `same` the identity."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise VlchatError(f"the image tokens form no square grid ({tokens} tokens)")
    if how == "mirrored":
        return torch.arange(tokens).view(side, side).flip(1).reshape(-1)
    if how == "permuted":
        return torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    return torch.arange(tokens)


@contextlib.contextmanager
def ablated(projector: Projector, ablation: Ablation, tokens: int) -> Iterator[None]:
    """The projector with its input tokens and slot signals moved as `ablation` says; everything
    is restored on exit, so the projector is the same afterwards."""
    content = grid_order(tokens, ablation.content)
    slots = grid_order(tokens, "mirrored" if ablation.slots == "mirrored" else "same")
    position = projector.position.data if projector.config.position_tokens else None  # (N, D)
    code = projector.grid_code  # (N, 2 * side), (N, 0) without a grid code, (0, 0) without slots
    if ablation.slots == "zeroed":
        moved_position = None if position is None else torch.zeros_like(position)
        moved_code = torch.zeros_like(code)
    else:
        moved_position = None if position is None else position[slots]
        moved_code = code[slots] if code.shape[0] else code
    forward = projector.forward
    if position is not None:
        projector.position.data = moved_position
    projector.grid_code = moved_code
    projector.forward = lambda features: forward(features[:, content])  # (B, N, Dv), N reordered
    try:
        yield
    finally:
        del projector.forward  # the class's forward again
        projector.grid_code = code
        if position is not None:
            projector.position.data = position


def measure(vlm, scenes: int) -> tuple[dict[str, dict[str, float]], Counter]:
    """(ablation name -> probe_exact per question type and `all`, questions per type)."""
    from vlchat.train.probe import Probe

    probe = Probe(vlm, scenes)
    out = {}
    for ablation in ABLATIONS:
        with ablated(vlm.projector, ablation, vlm.tokens_per_image):
            out[ablation.name] = probe()["probe_exact"]
    asked = Counter(qtype for scene in probe.scenes for qtype in scene.qtypes)
    return out, asked + Counter(all=sum(asked.values()))


def main(argv: list[str] | None = None) -> int:
    from vlchat.model.vlm import load_model

    parser = argparse.ArgumentParser(prog="python -m research.token_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="a preset name or a model config file")
    parser.add_argument("--scenes", type=int, default=48, help="held-out scenes to ask about")
    args = parser.parse_args(argv)
    try:
        if args.scenes < 1:
            raise VlchatError("--scenes must be at least 1")
        results, asked = measure(load_model(model_config(args.model)), args.scenes)
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    qtypes = list(next(iter(results.values())))
    print(f"held-out probe, {args.model}, {args.scenes} scenes: answers exactly right (%)")
    print("| image tokens | " + " | ".join(f"{q} ({asked[q]})" for q in qtypes) + " |")
    print("|---|" + "---:|" * len(qtypes))
    for name, exact in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * exact[q]:.0f}" for q in qtypes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
