"""BLIP-2's connector: a fixed set of learned queries reads the vision tokens through the Q-Former
(self-attention among the queries, cross-attention to the image), and one linear layer maps each
query's output into the LM's input space (InstructBLIP's variant, below, also reads the question).
Whatever the image's token count, it enters the LM as `num_output_tokens` embeddings (32 for the
published BLIP-2 checkpoints).

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


class InstructQFormerProjector(nn.Module):
    """InstructBLIP's connector: BLIP-2's queries and projection, but the Q-Former also reads the
    instruction text (tokenized by the checkpoint's own BERT-style `qformer_tokenizer`): queries and
    text tokens share its self-attention, only the queries cross-attend to the image, and only the
    queries' outputs go on to the LM. So an image's embeddings depend on the question asked about it.

    (B, N, Dv) vision tokens + B instruction texts -> (B, Q, D) LM embeddings; float32 as BLIP-2's.
    Reference: transformers `models/instructblip/modeling_instructblip.py`
    (`InstructBlipForConditionalGeneration.get_image_features`).
    """

    reads_instructions = True  # VisionLanguageModel.encode_images passes the texts

    def __init__(self, qformer_config, num_queries: int, out_dim: int, tokenizer) -> None:
        from transformers import InstructBlipQFormerModel

        super().__init__()
        self.tokenizer = tokenizer  # the checkpoint's qformer_tokenizer (not a module: no weights)
        self.max_text_tokens = qformer_config.max_position_embeddings  # text positions 0.. (queries have none)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, qformer_config.hidden_size))  # (1, Q, Dq)
        self.qformer = InstructBlipQFormerModel(qformer_config)
        self.language_projection = nn.Linear(qformer_config.hidden_size, out_dim)

    @property
    def num_output_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def text_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (B, L) Q-Former ids and attention mask, as InstructBlipProcessor makes them ([CLS] ... [SEP]),
        padded to the longest and cut at the Q-Former's position table."""
        batch = self.tokenizer(
            instructions, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"]

    def forward(self, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """(B, N, Dv) vision tokens and B texts -> (B, Q, D) LM embeddings."""
        device, count = self.query_tokens.device, self.num_output_tokens
        ids, text_mask = self.text_ids(instructions)  # (B, L)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # (B, Q, Dq)
        mask = torch.cat([text_mask.new_ones(features.shape[0], count), text_mask], dim=1).to(device)  # (B, Q + L)
        out = self.qformer(
            input_ids=ids.to(device),
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=features.to(self.query_tokens.dtype),
            encoder_attention_mask=torch.ones(features.shape[:2], dtype=torch.long, device=device),
        ).last_hidden_state[:, :count]  # (B, Q, Dq): the queries' outputs, the text's dropped
        return self.language_projection(out.to(self.language_projection.weight.dtype))  # (B, Q, D)
