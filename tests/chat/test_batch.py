"""BatchDecoder: rows that join and leave at different steps decode as `generate()` does alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlchat.chat.batch import BatchDecoder
from vlchat.chat.generate import SequenceDecoder, generate
from vlchat.config import GenerationConfig
from vlchat.model.language import LMState


@dataclass
class Row:
    name: str
    decoder: SequenceDecoder
    logits: torch.Tensor


def prefilled(lm, text: str) -> tuple[torch.Tensor, LMState]:
    return lm.prefill(lm.embed(torch.tensor([lm.tokenize(text)])), LMState())


def alone(lm, text: str, config: GenerationConfig) -> tuple[str, str]:
    chunks = list(generate(lm, *prefilled(lm, text), config))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_rows_joining_and_leaving_answer_as_generate_alone(tiny_model):
    lm = tiny_model.lm
    lengths = {"a short one": 3, "a much longer prompt about shapes and colours": 7, "third": 5}
    decoding: BatchDecoder[Row] = BatchDecoder(lm)
    left: dict[str, tuple[str, str, int]] = {}

    def leave(row: Row, state: LMState) -> None:
        left[row.name] = (row.decoder.result(state).text, row.decoder.finish_reason, state.length)

    def join(text: str) -> None:
        logits, state = prefilled(lm, text)
        decoder = SequenceDecoder(lm, GenerationConfig(max_new_tokens=lengths[text]))
        decoding.join([(Row(text, decoder, logits), state)])

    join("a short one")
    join("a much longer prompt about shapes and colours")
    decoding.step(leave)
    decoding.step(leave)
    join("third")  # joins a running batch, two steps behind
    while decoding.size:
        decoding.step(leave)
    for text, count in lengths.items():
        expected = alone(lm, text, GenerationConfig(max_new_tokens=count))
        assert left[text][:2] == expected
        assert left[text][2] == len(lm.tokenize(text)) + count - 1  # prompt + fed tokens (not the last one)
