"""Samples -> padded training tensors, through the same template and tokenizer path as inference.

Labels come from the template's trainable segments (assistant answers and their end markers);
everything else, image slots included, is -100 (ignored by the loss).

Independent turns (a data source's `independent_turns: true`): a conversation of questions that
do not depend on each other is packed as one shared prefix (system prompt, image) and one branch
per question-answer turn. Each branch is tokenized as that turn asked alone and attends only to
the prefix and itself, at the positions it would have alone, so it trains exactly the
single-question prompt while the image is encoded and attended once for all turns. In an
ordinary multi-turn sample a later answer can be read off an earlier one ("Where is the red
circle?" gives away "Is there a red circle?"), which teaches the model to look at the text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from PIL import Image

from vlchat.chat.messages import Message
from vlchat.chat.prompt import encode, slot_ids
from vlchat.chat.templates import Template
from vlchat.errors import VlchatError
from vlchat.images import load_image, to_tensor
from vlchat.train.data import Sample

IGNORE = -100


@dataclass
class Encoded:
    ids: list[int]  # IMAGE_TOKEN_ID at image slots
    labels: list[int]  # IGNORE where no loss
    images: list  # PIL images or paths, in slot order
    branches: list[int] | None = None  # independent turns: 0 = shared prefix, k = turn k
    positions: list[int] | None = None  # independent turns: position ids (each branch restarts after the prefix)
    samples: int = 1  # training samples in this row (shared-prefix packing merges several: train/packing.py)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 0 on right padding; or (B, 1, T, T) bool, True = may attend
    pixels: torch.Tensor | None  # (n_images, 3, S, S) in slot order across the batch
    position_ids: torch.Tensor | None = None  # (B, T) with a 4D mask (independent turns), else None
    samples: int = 0  # training samples in the batch (rows, unless packed rows hold several)


def encode_sample(sample: Sample, template: Template, system: str | None, tokenize, tokens_per_image: int) -> Encoded:
    """Render a sample with `template` (+ system prompt, + the tools it offers) and mark what the loss sees."""
    head = [Message.text_message("system", system)] if system is not None else []
    keys, trainable = encode(
        template, head + sample.messages, tokenize, tokens_per_image, add_generation_prompt=False, tools=sample.tools
    )
    n_images = sum(1 for k in keys if isinstance(k, tuple) and k[1] == 0)
    if n_images != len(sample.images):
        raise VlchatError(f"{sample.source}: {n_images} image placeholder(s) but {len(sample.images)} image(s)")
    images = list(sample.images)
    packed = None
    if sample.meta.get("independent_turns") and not sample.tools:  # packing renders without tools
        packed = _independent_turns(sample.messages, images, head, template, tokenize, tokens_per_image)
    return packed or Encoded(slot_ids(keys), _labels(keys, trainable), images)


def _labels(keys: list, trainable: list[bool]) -> list[int]:
    return [k if t and not isinstance(k, tuple) else IGNORE for k, t in zip(keys, trainable)]


def _turns_alone(messages: list[Message]) -> list[list[Message]] | None:
    """Each user/assistant pair as its own conversation, the first user message's images in
    front of every question; None if the sample is not pairs with images in the first turn only."""
    pairs = list(zip(messages[::2], messages[1::2]))
    if (
        len(messages) % 2
        or any(u.role != "user" or a.role != "assistant" for u, a in pairs)
        or any(m.images for m in messages[1:])
    ):
        return None
    images = messages[0].images
    return [[replace(user, parts=(images if i else []) + user.parts), answer] for i, (user, answer) in enumerate(pairs)]


def _independent_turns(messages, images, head, template, tokenize, tokens_per_image) -> Encoded | None:
    """Shared prefix + one branch per turn (module docstring); None when the turns cannot be
    split so (then the sample trains as an ordinary conversation)."""
    turns = _turns_alone(messages)
    if turns is None or len(turns) < 2:
        return None
    rendered = [
        encode(template, head + turn, tokenize, tokens_per_image, add_generation_prompt=False) for turn in turns
    ]
    prefix = _common_prefix([keys for keys, _ in rendered])
    if any(isinstance(k, tuple) for keys, _ in rendered for k in keys[prefix:]):
        return None  # an image slot past the shared prefix: the image is not in front of the question
    keys, trainable = rendered[0][0][:prefix], rendered[0][1][:prefix]
    branches, positions = [0] * prefix, list(range(prefix))
    for number, (turn_keys, turn_trainable) in enumerate(rendered, start=1):
        keys, trainable = keys + turn_keys[prefix:], trainable + turn_trainable[prefix:]
        branches += [number] * (len(turn_keys) - prefix)
        positions += range(prefix, len(turn_keys))
    return Encoded(slot_ids(keys), _labels(keys, trainable), images, branches, positions)


def _common_prefix(sequences: list[list]) -> int:
    """Length of the longest prefix all `sequences` share (< the shortest's length)."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest - 1  # keep one token in every branch


def collate(items: list[Encoded], preprocess: Callable[[Image.Image], torch.Tensor] | int, pad_id: int) -> Batch:
    """Right-pad a list of encoded samples into a batch; load their images and preprocess them with
    the model's own preprocessing (`VisionLanguageModel.pixels`: a CLIP/SigLIP checkpoint's size, mean
    and std; EfficientNet's otherwise), or, given an int, EfficientNet's at that image size."""
    if isinstance(preprocess, int):
        preprocess = functools.partial(_efficientnet_pixels, size=preprocess)
    width = max(len(item.ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    pixels = []
    for row, item in enumerate(items):
        n = len(item.ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(item.ids), torch.tensor(item.labels), 1
        for image in item.images:
            image = load_image(image) if isinstance(image, str) else image
            pixels.append(preprocess(image))
    pixels = torch.stack(pixels) if pixels else None
    samples = sum(item.samples for item in items)
    if any(item.branches for item in items):
        return Batch(ids, labels, branch_mask(items, width), pixels, branch_positions(items, width), samples)
    return Batch(ids, labels, mask, pixels, samples=samples)


def _efficientnet_pixels(image: Image.Image, size: int) -> torch.Tensor:
    return to_tensor(image, size)


def branch_mask(items: list[Encoded], width: int) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend key s: causal, and within the shared prefix
    or its own branch. Padding queries see key 0 only (a row with no key would softmax to NaN)."""
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = torch.zeros((len(items), 1, width, width), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.ids)
        branch = torch.tensor(item.branches or [0] * n)
        same = (branch[:, None] == branch[None, :]) | (branch[None, :] == 0)  # (n, n)
        allowed[row, 0, :n, :n] = same & causal[:n, :n]
        allowed[row, 0, n:, 0] = True
    return allowed


def branch_positions(items: list[Encoded], width: int) -> torch.Tensor:
    """(B, T) position ids: each branch continues from the end of the shared prefix."""
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        positions[row, : len(item.ids)] = torch.tensor(item.positions or range(len(item.ids)))
    return positions


def length_groups(items: list[Encoded], groups: int) -> list[list[Encoded]]:
    """Split a batch into at most `groups` runs of similar length, padding the fewest tokens.

    A right-padded batch costs rows x longest row: one Chinese sample (~275 tokens, its characters
    take several tokens each) among English ones (~200) pads them all to its length. Sorting by
    length and cutting where padding is least (a small dynamic programme) removes most of it; each
    group is then its own forward/backward, weighted by its share of supervised tokens.
    """
    ordered = sorted(items, key=lambda item: len(item.ids))
    n = len(ordered)
    lengths = [len(item.ids) for item in ordered]
    # best[g][i]: least padded tokens for the first i rows in g runs; cut[g][i]: where the last run starts
    best = [[0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(groups)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    for g in range(1, groups + 1):
        for i in range(1, n + 1):
            for start in range(i):
                cost = best[g - 1][start] + (i - start) * lengths[i - 1]
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, start
    g = min(range(1, groups + 1), key=lambda k: (best[k][n], k))  # fewest runs among the cheapest
    runs, end = [], n
    for level in range(g, 0, -1):
        start = cut[level][end]
        runs.append(ordered[start:end])
        end = start
    return runs[::-1]  # never empty: a run starts only after a finite-cost (non-empty) prefix


def supervised_tokens(batch: Batch) -> int:
    """Positions the loss sees (labels are compared one step ahead, as in LanguageModel.loss)."""
    return int((batch.labels[:, 1:] != IGNORE).sum())


def answer_runs(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) answer number of each target (labels[:, 1:]): 1, 2, ... in reading
    order, row by row, over the batch's answers (runs of consecutive supervised targets); at
    unsupervised targets the number of the answer before (0 before the first)."""
    supervised = labels[:, 1:] != IGNORE  # (B, T-1)
    starts = supervised & ~torch.nn.functional.pad(supervised, (1, 0))[:, :-1]
    return torch.cumsum(starts.flatten().long(), 0).view_as(supervised)
