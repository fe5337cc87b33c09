"""BLIP-2's connector: a fixed set of learned queries reads the vision tokens through the Q-Former
(self-attention among the queries, cross-attention to the image), and one linear layer maps each
query's output into the LM's input space. Whatever the image's token count, it enters the LM as
`num_output_tokens` embeddings (32 for the published BLIP-2 checkpoints).

Plays the projector's part behind the same seam: vision tokens (B, N, Dv) -> LM embeddings (B, Q, D).
The Q-Former itself is transformers' `Blip2QFormerModel`, built from the checkpoint's qformer_config;
like transformers (`_keep_in_fp32_modules`) it and the queries stay in float32 whatever the LM's dtype.
Reference: transformers `models/blip_2/modeling_blip_2.py` (`Blip2ForConditionalGeneration.get_image_features`).
"""

from __future__ import annotations

import torch
from torch import nn


class QFormerProjector(nn.Module):
    def __init__(self, qformer_config, num_queries: int, out_dim: int) -> None:
        from transformers import Blip2QFormerModel

        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, qformer_config.hidden_size))  # (1, Q, Dq)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, out_dim)

    @property
    def num_output_tokens(self) -> int:
        """Image tokens the LM sees per image (VisionLanguageModel.tokens_per_image reads it)."""
        return self.query_tokens.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) vision tokens -> (B, Q, D) LM embeddings."""
        dtype = self.query_tokens.dtype  # float32
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # (B, Q, Dq)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features.to(dtype)).last_hidden_state
        return self.language_projection(out.to(self.language_projection.weight.dtype))  # (B, Q, D)
