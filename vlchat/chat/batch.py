"""Many sequences decoded together: one `SequenceDecoder` per row over one `DecodeBatch`.

`generate()` drives one `SequenceDecoder` for one prefilled prompt; `BatchDecoder` drives many
at once, one forward pass per step for all rows. Rows join after their prompt is prefilled
(each with its own batch-1 state) and leave as soon as they are done, so the batch stays full when the caller
keeps joining new rows (continuous batching). The server's scheduler (jobs from HTTP clients)
and `vlchat eval` (a list of questions) both run this loop; greedy rows answer what the chat
engine answers for the same prompt, up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import torch

from vlchat.chat.generate import SequenceDecoder
from vlchat.model.batching import DecodeBatch
from vlchat.model.language import LanguageModel, LMState


class Row(Protocol):
    """What a row must carry; callers add their own fields (a job, an item index)."""

    decoder: SequenceDecoder
    logits: torch.Tensor  # (1, V) at the row's current position


R = TypeVar("R", bound=Row)


def pick_token(row: Row) -> int | None:
    """The row's next token, or None when its decoder has finished (stop, EOS, max_new_tokens)."""
    _, token = row.decoder.step(row.logits)
    return None if row.decoder.finish_reason else token


class BatchDecoder(Generic[R]):
    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.rows: list[R] = []
        self.batch = DecodeBatch()  # row i of the batch is self.rows[i]

    @property
    def size(self) -> int:
        return len(self.rows)

    def join(self, joined: list[tuple[R, LMState]]) -> None:
        """Add rows, each with the batch-1 state of its prefilled prompt."""
        if joined:
            self.batch = DecodeBatch.of(self.batch.rows() + [state for _, state in joined])
            self.rows += [row for row, _ in joined]

    def step(self, leave: Callable[[R, LMState], None], pick: Callable[[R], int | None] = pick_token) -> None:
        """Pick one token for every row (`pick` returns None for a row that is done), hand each
        row that is done to `leave` with its own batch-1 state (prompt + fed answer tokens) at
        once, then feed the other rows' tokens in one forward pass."""
        keep, tokens = [], []
        for i, row in enumerate(self.rows):
            token = pick(row)
            if token is None:
                leave(row, self.batch.row(i))
            else:
                keep.append(i)
                tokens.append(token)
        if len(keep) < self.size:
            self.batch = DecodeBatch.of([self.batch.row(i) for i in keep])
            self.rows = [self.rows[i] for i in keep]
        if self.rows:
            logits = self.batch.decode(self.lm, torch.tensor(tokens))  # (B, V)
            for i, row in enumerate(self.rows):
                row.logits = logits[i : i + 1]
