"""Decode several sequences in one forward pass (continuous batching for the server).

Each sequence has its own batch-1 `LMState`; a `DecodeBatch` stacks them: every KV cache is
left-padded to the batch's length, with an attention mask that hides the padding and explicit
position ids, so every row computes exactly what it would alone (up to floating-point rounding).
Rows join and leave between steps; a leaving row is cut back to its own batch-1 state, so the
server can keep its cache for the next turn of that conversation. `prefill` runs several
prompts' next chunks in one forward (the server prefills new requests together this way).
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
        """Stack batch-1 states into one left-padded batch (a state may be empty: no cache yet)."""
        batch = cls([s.length for s in states], [s.adapter for s in states])
        if states:
            width = max(batch.lengths)
            batch.mask = torch.tensor([[0] * (width - n) + [1] * n for n in batch.lengths], dtype=torch.long)
            if width:
                reference = layer_tensors(next(s for s in states if s.length))
                per_layer = zip(*(layer_tensors(s) if s.length else _empty_like(reference) for s in states))
                layers = [
                    (_stack_left_padded([k for k, _ in pairs], width), _stack_left_padded([v for _, v in pairs], width))
                    for pairs in per_layer
                ]
                batch.state = make_state(layers, width)
            else:
                batch.state = LMState()
        return batch

    def row(self, i: int) -> LMState:
        """Row i as its own batch-1 state: a copy of its real positions only (the mask's 1s: the
        left padding and any hole a left-padded prefill chunk left inside the row go)."""
        if not self.lengths[i]:
            return LMState(adapter=self.adapters[i])
        real = self.mask[i].nonzero().squeeze(1)  # (n,) cache positions
        layers = [
            (k[i : i + 1].index_select(2, real), v[i : i + 1].index_select(2, real))
            for k, v in layer_tensors(self.state)
        ]
        return make_state(layers, self.lengths[i], self.adapters[i])

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

    @torch.inference_mode()
    def prefill(self, lm: LanguageModel, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Every row's next chunk in one forward: (1, T_i, D) embeddings per row -> the logits
        (B, V) at each row's last chunk position. Shorter chunks are padded on the LEFT (mask 0)
        so that every row's last real token is the last position; positions continue each row's
        own length. A row's cache then has a hole of T - T_i positions; `row` drops it."""
        width = max(chunk.shape[1] for chunk in chunks)
        sizes = [chunk.shape[1] for chunk in chunks]
        embeds = torch.cat([F.pad(chunk, (0, 0, width - t, 0)) for chunk, t in zip(chunks, sizes)])  # (B, T, D)
        chunk_mask = torch.tensor([[0] * (width - t) + [1] * t for t in sizes], dtype=self.mask.dtype)  # (B, T)
        mask = torch.cat([self.mask, chunk_mask], dim=1)  # (B, P + T)
        # (B, T): padding gets the row's next position too (masked, it only has to be in range)
        positions = torch.tensor([[n] * (width - t) + list(range(n, n + t)) for n, t in zip(self.lengths, sizes)])
        logits, cache = lm.forward_cached(embeds, self.state.cache, mask, positions, self.adapters)
        self.mask, self.lengths = mask, [n + t for n, t in zip(self.lengths, sizes)]
        self.state = LMState(cache, mask.shape[1])
        return logits  # (B, V)


def _empty_like(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-length (1, H, 0, hd) keys and values shaped like `layers`, for a row with no cache yet."""
    return [(k[:1, :, :0], v[:1, :, :0]) for k, v in layers]


def _stack_left_padded(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """(1, H, t_i, hd) tensors -> (B, H, width, hd), each padded with zeros on the left."""
    return torch.cat([F.pad(t, (0, 0, width - t.shape[2], 0)) for t in tensors], dim=0)
