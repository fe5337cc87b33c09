"""Samples -> padded training tensors, through the same template and tokenizer path as inference.

Labels come from the template's trainable segments (assistant answers and their end markers);
everything else, image slots included, is -100 (ignored by the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 0 on right padding
    pixels: torch.Tensor | None  # (n_images, 3, S, S) in slot order across the batch


def encode_sample(sample: Sample, template: Template, system: str | None, tokenize,
                  tokens_per_image: int) -> Encoded:
    """Render a sample with `template` (+ system prompt) and mark what the loss sees."""
    messages = ([Message.text_message("system", system)] if system is not None else []) + sample.messages
    keys, trainable = encode(template, messages, tokenize, tokens_per_image, add_generation_prompt=False)
    ids = slot_ids(keys)
    labels = [k if t and not isinstance(k, tuple) else IGNORE for k, t in zip(keys, trainable)]
    n_images = sum(1 for k in keys if isinstance(k, tuple) and k[1] == 0)
    if n_images != len(sample.images):
        raise VlchatError(f"{sample.source}: {n_images} image placeholder(s) but {len(sample.images)} image(s)")
    return Encoded(ids, labels, list(sample.images))


def collate(items: list[Encoded], image_size: int, pad_id: int) -> Batch:
    """Right-pad a list of encoded samples into a batch; load and normalise their images."""
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
            pixels.append(to_tensor(image, image_size))
    return Batch(ids, labels, mask, torch.stack(pixels) if pixels else None)


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
