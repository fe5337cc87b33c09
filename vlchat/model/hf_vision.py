"""Vision towers from transformers (CLIP, SigLIP, BLIP-2's and InstructBLIP's ViT) behind the same seam as
the EfficientNet encoder: pixels (B, 3, S, S) -> tokens (B, N, D), plus the checkpoint's own image preprocessing.

The output is one hidden state of the ViT (`VisionConfig.feature_layer`; LLaVA-1.5 takes -2, the
penultimate layer's output, as `LlavaModel.get_image_features` does) with CLIP's CLS token dropped
unless `keep_cls` (LLaVA's "default" feature select strategy drops it; SigLIP has none). BLIP-2's
tower gives its final, post-layernormed output with the CLS token (`Blip2Model.get_image_features`).

Preprocessing follows the checkpoint's preprocessor_config.json the way transformers' PIL image
processors apply it (`image_processing_backends.PilBackend`): resize (shortest edge, aspect kept,
long side truncated; or an exact height x width) with the configured PIL filter, center crop
(top = (h - crop_h) // 2), rescale (1/255), normalise with the checkpoint's mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlchat.config import VisionConfig
from vlchat.errors import VlchatError

HF_VISION_FAMILIES = ("clip", "siglip", "blip2", "instructblip")
HAS_CLS = {"clip": True, "siglip": False, "blip2": True, "instructblip": True}
# Families whose feature_layer -1 is the tower's final output after its post-layernorm (BLIP-2's and
# InstructBLIP's Q-Formers attend to `Blip2VisionModel(...).last_hidden_state`), not the last encoder
# layer's raw hidden state.
POST_NORM_OUTPUT = ("blip2", "instructblip")
# model_type of a standalone vision checkpoint's config.json -> family
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}


@dataclass(frozen=True)
class ImagePreprocess:
    """What a checkpoint's preprocessor_config.json asks for (CLIPImageProcessor/SiglipImageProcessor keys)."""

    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio ...
    size: tuple[int, int] | None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None  # center crop (height, width) after the resize; None: no crop
    resample: int  # PIL filter id (3 = bicubic)
    rescale: float | None  # pixel values times this (1/255), None: none
    mean: tuple[float, float, float] | None  # normalisation per channel, None: none
    std: tuple[float, float, float] | None

    @classmethod
    def from_file(cls, path: Path) -> ImagePreprocess:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise VlchatError(f"cannot read image preprocessing from {path}: {error}") from None
        size = raw.get("size") or {}
        if isinstance(size, int):  # old files: a bare int is the shortest edge
            size = {"shortest_edge": size}
        crop = raw.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do = {key: raw.get(f"do_{key}", True) for key in ("resize", "center_crop", "rescale", "normalize")}
        shortest = size.get("shortest_edge") if do["resize"] else None
        exact = (size["height"], size["width"]) if do["resize"] and "height" in size else None
        if do["resize"] and shortest is None and exact is None:
            raise VlchatError(f"{path}: unsupported resize {size!r} (expected shortest_edge or height and width)")
        return cls(
            shortest_edge=shortest,
            size=exact,
            crop=(crop["height"], crop["width"]) if do["center_crop"] and crop else None,
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            rescale=float(raw.get("rescale_factor", 1 / 255)) if do["rescale"] else None,
            mean=tuple(raw["image_mean"]) if do["normalize"] else None,
            std=tuple(raw["image_std"]) if do["normalize"] else None,
        )

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, when fixed."""
        return self.crop or self.size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> float (3, H, W)."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if self.shortest_edge is not None:
            rgb = rgb.resize(shortest_edge_size(rgb.size, self.shortest_edge), self.resample)
        elif self.size is not None:
            rgb = rgb.resize((self.size[1], self.size[0]), self.resample)
        if self.crop is not None:
            (width, height), (crop_h, crop_w) = rgb.size, self.crop
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            rgb = rgb.crop((left, top, left + crop_w, top + crop_h))  # PIL pads outside with black
        pixels = np.asarray(rgb, dtype=np.float32)  # (H, W, 3)
        if self.rescale is not None:
            pixels = pixels * np.float32(self.rescale)
        if self.mean is not None:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """PIL (width, height) with the short side = edge and the long side truncated, as transformers does."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (edge, new_long) if width <= height else (new_long, edge)


class HFVisionEncoder(nn.Module):
    """A transformers CLIPVisionModel / SiglipVisionModel / Blip2VisionModel: pixels (B, 3, S, S) -> (B, N, D)."""

    def __init__(self, config: VisionConfig, tower: nn.Module, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.config = config
        self.tower = tower
        self.preprocess = preprocess
        self.hidden_size = tower.config.hidden_size
        layers = tower.config.num_hidden_layers
        if not -layers - 1 <= config.feature_layer <= layers:
            raise VlchatError(f"vision feature_layer {config.feature_layer} is outside the tower's {layers} layers")

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"vision encoder expects pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.tower.dtype)
        if self.config.name in POST_NORM_OUTPUT and self.config.feature_layer == -1:
            hidden = self.tower(pixel_values=pixels).last_hidden_state  # (B, 1 + P, D), post-layernorm
        else:
            out = self.tower(pixel_values=pixels, output_hidden_states=True)
            hidden = out.hidden_states[self.config.feature_layer]  # (B, [1 +] P, D); index 0 = the embeddings
        if HAS_CLS[self.config.name] and not self.config.keep_cls:
            hidden = hidden[:, 1:]  # (B, P, D): patches only
        return hidden


def tower_class(family: str) -> type[nn.Module]:
    from transformers import Blip2VisionModel, CLIPVisionModel, InstructBlipVisionModel, SiglipVisionModel

    classes = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "blip2": Blip2VisionModel}
    return {**classes, "instructblip": InstructBlipVisionModel}[family]


def check_family(config: VisionConfig) -> None:
    if config.name not in HF_VISION_FAMILIES:
        raise VlchatError(
            f"unknown vision encoder {config.name!r}; known: efficientnet_lite0, {', '.join(HF_VISION_FAMILIES)}"
        )
    if config.keep_cls and not HAS_CLS[config.name]:
        raise VlchatError(f"vision keep_cls is set, but a {config.name} tower has no CLS token")


def read_preprocess(directory: Path, config: VisionConfig) -> ImagePreprocess:
    """The checkpoint's preprocessing; its output must be the configured square image_size."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise VlchatError(f"{directory} has no preprocessor_config.json: cannot tell how to preprocess images for it")
    preprocess = ImagePreprocess.from_file(path)
    side = config.image_size
    if preprocess.output_size() not in ((side, side), None):
        raise VlchatError(
            f"{path} makes {preprocess.output_size()} images, but the vision config says image_size {side}: "
            "the preprocessing belongs to another model"
        )
    return preprocess


def load_hf_vision_encoder(config: VisionConfig, dtype: torch.dtype = torch.float32) -> HFVisionEncoder:
    """A standalone CLIP/SigLIP checkpoint directory (a vision model alone or a dual encoder; config.json,
    weights, preprocessor_config.json), frozen. Whole-VLM checkpoints (LLaVA, BLIP-2) load their tower
    in model/loaders/ instead."""
    check_family(config)
    if config.source is None:
        raise VlchatError(f"vision encoder {config.name!r} needs a source: a local checkpoint directory")
    directory = Path(config.source).expanduser()
    if not (directory / "config.json").is_file():
        raise VlchatError(f"vision source {directory} is not a checkpoint directory (no config.json)")
    raw = json.loads((directory / "config.json").read_text())
    if VISION_MODEL_TYPES.get(raw.get("model_type", "")) != config.name:
        raise VlchatError(
            f"{directory} holds a {raw.get('model_type')!r} model, but the vision config asks for {config.name!r}"
        )
    from vlchat.model.loaders.checkpoint import pretrained_strict

    tower = pretrained_strict(tower_class(config.name), directory, dtype, "vision tower")
    check_geometry(tower.config, config, directory)
    return HFVisionEncoder(config, tower, read_preprocess(directory, config)).eval()


def check_geometry(vision, config: VisionConfig, where: Path | str) -> None:
    """The checkpoint's image and patch sizes must be the vision config's (they set the token count)."""
    if (vision.image_size, vision.patch_size) != (config.image_size, config.patch_size):
        raise VlchatError(
            f"{where}: the tower takes {vision.image_size} px images in {vision.patch_size} px patches, but the vision "
            f"config says image_size {config.image_size}, patch_size {config.patch_size}"
        )
