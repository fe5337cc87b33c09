"""EVA ViT-g as BLIP-2 and MiniGPT-4 use it (LAVIS's `eva_vit_g.pth`), in plain PyTorch, plus the
`ln_vision` LayerNorm that follows it: pixels (B, 3, S, S) -> tokens (B, 1 + P, D), CLS first.

The network, from the key names and shapes of the released file and LAVIS's description of it: a
14 px patch embedding (conv), a CLS token, learned absolute position embeddings, then pre-norm blocks
(LayerNorm eps 1e-6; attention whose packed `qkv` matrix has no bias of its own but separate learned
`q_bias` and `v_bias`, the key bias being zero; an exact-GELU MLP). No final norm. The released file
has 40 blocks; BLIP-2 and MiniGPT-4 build 39 and ignore the last, so their features are the
penultimate block's output: vlchat runs every block but the last (`blocks_used`).
EVA-g's heads are 88 wide (1408 = 16 x 88); the head count is width / 88.
Reference: https://github.com/Vision-CAIR/MiniGPT-4 `minigpt4/models/eva_vit.py` (read, not copied).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlchat.errors import VlchatError

HEAD_DIM = 88  # EVA ViT-g: 16 heads of 88 = 1408
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class EvaVitConfig:
    width: int = 1408
    depth: int = 39  # blocks run (the file holds one more)
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    patch_size: int = 14
    image_size: int = 224

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], where: str) -> EvaVitConfig:
        """The geometry read from the weights' shapes (all blocks but the last are used)."""
        try:
            width = state["cls_token"].shape[-1]
            patch = state["patch_embed.proj.weight"].shape[-1]
            positions = state["pos_embed"].shape[1] - 1
            mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        except KeyError as error:
            raise VlchatError(
                f"{where} lacks the EVA ViT weight {error.args[0]!r}: not LAVIS's eva_vit_g.pth layout"
            ) from None
        blocks = {int(m[1]) for key in state if (m := BLOCK_KEY.match(key))}
        grid = int(round(positions**0.5))
        if grid * grid != positions or width % HEAD_DIM or len(blocks) < 2:
            raise VlchatError(
                f"{where}: {positions} position embeddings, width {width}, {len(blocks)} blocks do not make an "
                f"EVA ViT (a square patch grid, heads of {HEAD_DIM}, at least 2 blocks)"
            )
        return cls(width=width, depth=len(blocks) - 1, mlp_hidden=mlp_hidden, patch_size=patch, image_size=grid * patch)


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # no key bias
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EvaBlock(nn.Module):
    def __init__(self, config: EvaVitConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=1e-6)
        self.attn = EvaAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=1e-6)
        self.mlp = nn.Sequential()  # named fc1 / fc2 as in the file
        self.mlp.add_module("fc1", nn.Linear(config.width, config.mlp_hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(config.mlp_hidden, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVit(nn.Module):
    """The ViT alone, keys as in eva_vit_g.pth (blocks 0 .. depth-1)."""

    def __init__(self, config: EvaVitConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, config.width, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid**2 + 1, config.width))
        self.blocks = nn.ModuleList(EvaBlock(config) for _ in range(config.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + P, D)
        for block in self.blocks:
            x = block(x)
        return x


class EvaVisionEncoder(nn.Module):
    """EVA ViT + ln_vision behind the vision seam: pixels (B, 3, S, S) -> (B, 1 + P, D), CLS kept.
    `preprocess` is MiniGPT-4's eval transform (an ImagePreprocess)."""

    def __init__(self, vit: EvaVit, preprocess) -> None:
        super().__init__()
        self.vit = vit
        self.ln_vision = nn.LayerNorm(vit.config.width)  # eps 1e-5, computed in float32 as LAVIS does
        self.preprocess = preprocess
        self.hidden_size = vit.config.width

    @property
    def image_size(self) -> int:
        return self.vit.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.vit.config.grid**2 + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"vision encoder expects pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        hidden = self.vit(pixels.to(self.vit.cls_token.dtype))
        return F.layer_norm(
            hidden.float(), hidden.shape[-1:], self.ln_vision.weight.float(), self.ln_vision.bias.float()
        ).to(hidden.dtype)
