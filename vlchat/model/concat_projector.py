"""MiniGPT-4's connector without a Q-Former (its LLaMA-2 variant): the CLS token is dropped and every
four consecutive patch tokens (in raster order, as MiniGPT-4 reshapes them) are concatenated into one,
then one linear layer (`llama_proj`) maps it into the LM's input space.
(B, 1 + P, Dv) -> (B, P / 4, 4 Dv) -> (B, P / 4, D): 256 patches of a 224 px image give 64 LM tokens.
Reference: MiniGPT-4 `minigpt4/models/minigpt4.py` `encode_img` with has_qformer False (read, not copied).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 4  # adjacent tokens concatenated


class ConcatProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, patches: int) -> None:
        super().__init__()
        if patches % GROUP:
            raise ValueError(f"{patches} patch tokens do not split into groups of {GROUP}")
        self.patches = patches
        self.llama_proj = nn.Linear(GROUP * in_dim, out_dim)

    @property
    def num_output_tokens(self) -> int:
        """Image tokens the LM sees per image (VisionLanguageModel.tokens_per_image reads it)."""
        return self.patches // GROUP

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, Dv) vision tokens, CLS first -> (B, P / 4, D) LM embeddings."""
        patches = features[:, 1:]  # (B, P, Dv)
        b, p, d = patches.shape
        grouped = patches.reshape(b, p // GROUP, GROUP * d)  # (B, P/4, 4 Dv)
        return self.llama_proj(grouped.to(self.llama_proj.weight.dtype))
