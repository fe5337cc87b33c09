"""Generation as a stack of small functions ending in an iterator (after litgpt's generate/base.py).

Every front end picks its tokens through `SequenceDecoder` (processing, greedy/sampling, EOS,
stop strings, max/min_new_tokens, clean text deltas); what differs is who drives it:
- `generate()` drives one, for the chat engine (`ChatSession.stream`): `vlchat chat`, `vlchat ask`
  and the Python API. It yields `Chunk`s: text deltas as tokens arrive, then a last chunk with
  the finish reason and the `GenerationResult`.
- `BatchDecoder` (vlchat/chat/batch.py) drives many over one `DecodeBatch`: the server's
  scheduler for every HTTP request (the OpenAI-compatible API and the web UI, which talks to the
  server only through its `/v1/conversations` routes), and `vlchat eval` for its questions.
- Beam search (`num_beams` > 1) is its own loop, `beam_search` (vlchat/chat/beam.py), over the
  same logits processing and stop-string search; `generate()` and the scheduler both call it.
Text deltas never split a multi-byte UTF-8 character and never show a prefix of a stop string
that might still complete."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vlchat.config import GenerationConfig
from vlchat.model.language import LanguageModel, LMState


@dataclass
class GenerationResult:
    token_ids: list[int]  # the answer's ids (stop token / stop string excluded)
    text: str
    finish_reason: str  # "stop" | "length"
    state: LMState  # the cache after prompt + fed answer tokens
    exact: bool = True  # decode(token_ids) == text (False when a stop string cut a token)
    fed_ids: list[int] = field(default_factory=list)  # answer ids whose KV is in `state`


@dataclass
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    notice: str | None = None  # e.g. "dropped the oldest turn to fit the context window"
    result: GenerationResult | None = field(default=None, repr=False)


# --- logits processing ---------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019): logits (B, V), previous ids (B, t)."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous, seen)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the smallest nucleus with mass >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop[:, 0] = False  # and always the likeliest (top_p may round to 0 in float32)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) ids: argmax when greedy, else a sample."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = top_k_top_p_filter(logits / config.temperature, config.top_k, config.top_p)
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():  # a temperature so small that logits overflow: the limit is greedy
        return logits.nan_to_num(nan=float("-inf")).argmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def suppress(logits: torch.Tensor, token_ids: set[int]) -> torch.Tensor:
    """Forbid `token_ids` (used for EOS before min_new_tokens)."""
    if token_ids:
        logits = logits.clone()
        logits[:, list(token_ids)] = float("-inf")
    return logits


# --- text streaming ------------------------------------------------------------------------


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown now: no trailing partial UTF-8 char, no possible stop prefix."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


class TextStream:
    """Turns a growing list of token ids into clean text deltas and spots stop strings."""

    def __init__(self, lm: LanguageModel, stops: tuple[str, ...]) -> None:
        self.lm, self.stops, self.ids, self.shown = lm, stops, [], 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.lm.detokenize(self.ids)
        cut = find_stop(self.text, self.stops)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        return self._emit(safe_length(self.text, self.stops))

    def flush(self) -> str:
        return self._emit(len(self.text.rstrip("\ufffd")))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return delta


# --- one sequence, one step at a time ------------------------------------------------------


class SequenceDecoder:
    """Picks a sequence's tokens one step at a time; `generate()` drives one, `BatchDecoder` many.

    `step(logits)` takes the (1, V) logits at the current position and returns (text delta,
    token to feed next or None). After None, or after `max_new_tokens` tokens, `finish_reason`
    is set and `result(state)` gives the answer.
    """

    def __init__(self, lm: LanguageModel, config: GenerationConfig, stops: tuple[str, ...] = ()) -> None:
        self.lm, self.config = lm, config
        self.generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.stream, self.eos = TextStream(lm, stops + tuple(config.stop)), lm.eos_token_ids
        self.finish_reason: str | None = None

    def step(self, logits: torch.Tensor) -> tuple[str, int | None]:
        config, steps = self.config, len(self.stream.ids)
        processed = apply_repetition_penalty(
            logits, torch.tensor([self.stream.ids], dtype=torch.long), config.repetition_penalty
        )
        if steps < config.min_new_tokens:
            processed = suppress(processed, self.eos)
        token = int(next_token(processed, config, self.generator))
        if token in self.eos:
            return self._end("stop"), None
        delta = self.stream.push(token)
        if self.stream.stopped:
            return delta + self._end("stop"), None
        if len(self.stream.ids) >= config.max_new_tokens:
            self.finish_reason = "length"  # the last token is still fed, so the cache holds it
        return delta, token

    def _end(self, reason: str) -> str:
        self.finish_reason = reason
        return self.stream.flush()

    def tail(self) -> str:
        """Text held back until the end (a possible stop-string prefix, a partial character)."""
        return self.stream.flush()

    def result(self, state: LMState) -> GenerationResult:
        return finished(self.lm, self.stream, self.finish_reason or "length", state)


# --- the iterator --------------------------------------------------------------------------


def generate(
    lm: LanguageModel,
    logits: torch.Tensor,
    state: LMState,
    config: GenerationConfig,
    stops: tuple[str, ...] = (),
) -> Iterator[Chunk]:
    """Decode after a prefilled prompt. logits (1, V) at the prompt's last position; state its cache."""
    if config.num_beams > 1:
        from vlchat.chat.beam import beam_search

        yield from beam_search(lm, logits, state, config, stops + tuple(config.stop))
        return
    decoder = SequenceDecoder(lm, config, stops)
    while True:
        delta, token = decoder.step(logits)
        if delta:
            yield Chunk(delta)
        if token is None:
            break
        logits, state = lm.decode(torch.tensor([token]), state)
        if decoder.finish_reason:
            break
    if tail := decoder.tail():
        yield Chunk(tail)
    yield Chunk(finish_reason=decoder.finish_reason, result=decoder.result(state))


def finished(lm: LanguageModel, stream: TextStream, finish: str, state: LMState) -> GenerationResult:
    """The answer's ids and text; the cache holds the prompt plus every fed answer token."""
    fed = stream.ids[:-1] if stream.stopped else stream.ids  # a stop-string token was never fed
    exact = not stream.stopped or lm.detokenize(fed) == stream.text
    return GenerationResult(fed if exact else [], stream.text, finish, state, exact, fed)
