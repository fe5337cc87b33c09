"""image_labels: what the vision encoder itself sees -- its ImageNet-1k classifier head, top-k.

The encoder is vlchat's EfficientNet-Lite0 (model/vision.py) with the packaged ImageNet weights,
whose .pth includes the 1000-way head; the chat model only uses the features before it.
Label names: timm's package data (`timm/data/_info/imagenet_synsets.txt`, the 1000 WordNet ids in
class-index order, and `imagenet_synset_to_lemma.txt`, id -> "tabby, tabby cat"), read as files
located with importlib.util.find_spec: importing timm would import torchvision, which does not
import beside this CPU torch. timm is installed with --no-deps for these files only.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import torch
from PIL import Image

from vlchat.agent.builtin.regions import Box, crop
from vlchat.agent.tools import Schema, Tool, ToolContext, ToolError
from vlchat.assets import verified_file
from vlchat.config import EFFICIENTNET_PTH, EFFICIENTNET_SHA256, VisionConfig
from vlchat.images import to_tensor
from vlchat.model.vision import NUM_CLASSES, load_vision_encoder

TIMM_REQUIREMENT = "timm==1.0.31"


@dataclass(frozen=True)
class LabelsConfig:
    weights: str = EFFICIENTNET_PTH
    sha256: str | None = EFFICIENTNET_SHA256
    image_size: int = 224  # the ImageNet training resolution of Lite0
    timeout_s: float = 60.0


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order, e.g. [281] = "tabby, tabby cat"."""
    spec = importlib.util.find_spec("timm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ToolError(f"ImageNet label names come from timm's data files: pip install --no-deps {TIMM_REQUIREMENT}")
    info = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if line
    )
    if len(synsets) != NUM_CLASSES:
        raise ToolError(f"{info / 'imagenet_synsets.txt'} lists {len(synsets)} classes, expected {NUM_CLASSES}")
    return tuple(lemmas.get(s, s) for s in synsets)


class ImageClassifier:
    """EfficientNet-Lite0 with its ImageNet head, loaded on first use (about 0.2 s)."""

    def __init__(self, config: LabelsConfig | None = None) -> None:
        self.config = config or LabelsConfig()
        self._encoder = None
        self._lock = threading.Lock()

    def _get_encoder(self) -> torch.nn.Module:
        with self._lock:
            if self._encoder is None:
                config = VisionConfig(image_size=self.config.image_size, weights=self.config.weights)
                self._encoder = load_vision_encoder(config, verified_file(self.config.weights, self.config.sha256))
            return self._encoder

    @torch.inference_mode()
    def top_k(self, image: Image.Image, k: int) -> list[tuple[str, float]]:
        """[(label, probability)] for the k most likely classes, most likely first."""
        labels = imagenet_labels()
        pixels = to_tensor(image, self.config.image_size).unsqueeze(0)  # (1, 3, S, S), the encoder's own input
        logits = self._get_encoder().backbone(pixels)  # (1, 1000): EfficientNetLite0.forward ends in the head
        probabilities = logits.softmax(dim=-1)[0]
        values, indices = probabilities.topk(k)
        return [(labels[i], round(float(p), 4)) for p, i in zip(values.tolist(), indices.tolist())]


def image_labels_tool(config: LabelsConfig | None = None, classifier: ImageClassifier | None = None) -> Tool:
    classifier = classifier or ImageClassifier(config)

    def image_labels(
        image: str, ctx: ToolContext, top_k: Annotated[int, Schema(minimum=1, maximum=20)] = 5, box: Box | None = None
    ) -> dict[str, Any]:
        """Name the main object in an image (ImageNet's 1000 classes: animals, objects, food,
        vehicles): the likeliest labels with probabilities.

        Args:
            image: an image name, e.g. "image_1".
            top_k: how many labels.
            box: optional region [left, top, right, bottom], fractions of the image size.
        """
        region, _ = crop(ctx.image(image), box)
        labels = classifier.top_k(region, top_k)
        return {"image": image, "labels": [{"label": name, "probability": p} for name, p in labels]}

    return Tool.from_function(image_labels, timeout_s=classifier.config.timeout_s)
