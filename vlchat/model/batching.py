"""Decode several sequences in one forward pass (continuous batching for the server).

Each sequence is prefilled alone (batch 1, its own `LMState`), then joins a `DecodeBatch`:
its KV cache is left-padded to the batch's length, with an attention mask that hides the
padding and explicit position ids, so every row computes exactly what it would alone (up to
floating-point rounding). Rows join and leave between steps; a leaving row is cut back to its
own batch-1 state, so the server can keep its cache for the next turn of that conversation.
Rows with the LoRA adapter on (sequences with an image) and off share the batch: the adapter
gate is set per row (model/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlchat.model.language import LanguageModel, LMState


def layer_tensors(state: LMState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (B, H, T, hd)."""
    return [(layer.keys, layer.values) for layer in state.cache.layers]


def make_state(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int, adapter: bool = False) -> LMState:
    from transformers import DynamicCache

    return LMState(DynamicCache(ddp_cache_data=layers), length, adapter)


def prefix_state(state: LMState, length: int) -> LMState:
    """A new state holding a copy of the first `length` positions of a batch-1 state (same gate)."""
    if length == 0 or state.cache is None:
        return LMState(adapter=state.adapter)
    layers = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in layer_tensors(state)]
    return make_state(layers, length, state.adapter)


def state_bytes(state: LMState) -> int:
    if state.cache is None:
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layer_tensors(state))


@dataclass
class DecodeBatch:
    """Rows of sequences of different lengths, left-padded to `width` cache positions."""

    lengths: list[int] = field(default_factory=list)  # each row's real cache length
    adapters: list[bool] = field(default_factory=list)  # each row's adapter gate (LMState.adapter)
    state: LMState | None = None  # (B, H, width, hd) per layer
    mask: torch.Tensor | None = None  # (B, width): 1 for real positions, 0 for padding

    @property
    def size(self) -> int:
        return len(self.lengths)

    @classmethod
    def of(cls, states: list[LMState]) -> DecodeBatch:
        """Stack batch-1 states into one left-padded batch."""
        batch = cls([s.length for s in states], [s.adapter for s in states])
        if states:
            width = max(batch.lengths)
            per_layer = zip(*(layer_tensors(s) for s in states))
            layers = [
                (_stack_left_padded([k for k, _ in pairs], width), _stack_left_padded([v for _, v in pairs], width))
                for pairs in per_layer
            ]
            batch.state = make_state(layers, width)
            batch.mask = torch.tensor([[0] * (width - n) + [1] * n for n in batch.lengths])
        return batch

    def row(self, i: int) -> LMState:
        """Row i as its own batch-1 state (a copy without the padding)."""
        n = self.lengths[i]
        layers = [
            (k[i : i + 1, :, k.shape[2] - n :].clone(), v[i : i + 1, :, v.shape[2] - n :].clone())
            for k, v in layer_tensors(self.state)
        ]
        return make_state(layers, n, self.adapters[i])

    def rows(self) -> list[LMState]:
        return [self.row(i) for i in range(self.size)]

    @torch.inference_mode()
    def decode(self, lm: LanguageModel, token_ids: torch.Tensor) -> torch.Tensor:
        """One step for every row: (B,) ids -> (B, V) logits; each row's cache grows by one."""
        mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=self.mask.dtype)], dim=1)  # (B, width+1)
        positions = torch.tensor(self.lengths)[:, None]  # (B, 1): each row's own next position
        logits, cache = lm.forward_cached(
            lm.embed(token_ids[:, None]), self.state.cache, mask, positions, self.adapters
        )
        self.mask, self.lengths = mask, [n + 1 for n in self.lengths]
        self.state = LMState(cache, mask.shape[1])
        return logits  # (B, V)


def _stack_left_padded(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """(1, H, t_i, hd) tensors -> (B, H, width, hd), each padded with zeros on the left."""
    return torch.cat([F.pad(t, (0, 0, width - t.shape[2], 0)) for t in tensors], dim=0)
