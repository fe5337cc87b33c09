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

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
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
class TokenLogprob:
    """One answer token's log-probability under the model (log-softmax of its raw logits, before
    any penalty, bias or temperature), with the `top` likeliest tokens at that step, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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


def apply_frequency_presence(
    logits: torch.Tensor, previous: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's rule: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, where count[j]
    is how often token j is in `previous` (B, t), the answer so far. logits (B, V)."""
    if (frequency == 0 and presence == 0) or previous.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, previous, torch.ones_like(previous, dtype=logits.dtype))
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add each (token id, bias) to that token's logit in every row of (B, V) logits."""
    if not bias:
        return logits
    ids = torch.tensor([token for token, _ in bias])
    return logits.index_add(1, ids, torch.tensor([b for _, b in bias], dtype=logits.dtype).expand(len(logits), -1))


def process_logits(
    logits: torch.Tensor, previous: torch.Tensor, config: GenerationConfig, eos: set[int]
) -> torch.Tensor:
    """Every front end's logits processors, in one order: (B, V) logits and each row's answer so
    far (B, t) -> (B, V). Repetition penalty, frequency/presence penalties, logit_bias, then EOS is
    forbidden while the answer is shorter than min_new_tokens. Greedy decoding, sampling and
    beam search (chat/beam.py, per beam over its own tokens) all go through here."""
    logits = apply_repetition_penalty(logits, previous, config.repetition_penalty)
    logits = apply_frequency_presence(logits, previous, config.frequency_penalty, config.presence_penalty)
    logits = apply_logit_bias(logits, config.logit_bias)
    if previous.shape[1] < config.min_new_tokens:
        logits = suppress(logits, eos)
    return logits


def check_for_model(config: GenerationConfig, vocab_size: int) -> None:
    """Refuse settings this model cannot honour: logit_bias ids outside its vocabulary."""
    outside = sorted(token for token, _ in config.logit_bias if token >= vocab_size)
    if outside:
        raise VlchatError(
            f"logit_bias token id {outside[0]} is outside the model's vocabulary (ids 0..{vocab_size - 1})"
        )


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
    """(B, V) processed logits -> (B,) ids: argmax when greedy, else a sample.

    The logits are shifted so the largest is 0 before dividing by the temperature, in float64:
    every scaled logit is then <= 0, so a tiny temperature (1e-300) drives the others to -inf and
    the sample is the argmax (the limit of temperature -> 0) instead of overflowing to +inf."""
    if config.temperature == 0:
        return logits.argmax(-1)
    wide = logits.double()
    scaled = (wide - wide.max(-1, keepdim=True).values) / config.temperature
    probs = top_k_top_p_filter(scaled, config.top_k, config.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's log-probability of `token` from its raw (1, V) logits, and the `top` likeliest."""
    logp = logits[0].float().log_softmax(-1)
    best = torch.topk(logp, min(top, logp.shape[-1])) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2, SmolLM2, Qwen): byte b is shown as itself when it is a
    printable Latin-1 character, else as chr(256 + n) for the n-th of the others, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in shown]
    shown.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {char: b for b, char in shown.items()}


BYTE_DECODER = byte_level_decoder()


def token_bytes(lm: LanguageModel, token_id: int) -> bytes:
    """A token's own bytes (a piece of a multi-byte character stays a piece): byte-level BPE pieces
    map back through their alphabet, SentencePiece byte-fallback pieces ("<0xE4>") to their byte,
    anything else is its decoded text."""
    piece = lm.tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and (hit := _BYTE_FALLBACK.fullmatch(piece)):
        return bytes([int(hit.group(1), 16)])
    if isinstance(piece, str) and piece and all(c in BYTE_DECODER for c in piece) and "▁" not in piece:
        return bytes(BYTE_DECODER[c] for c in piece)
    return lm.detokenize([token_id]).encode("utf-8")


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
    is set and `result(state)` gives the answer. An optional `constraint` (chat/grammar.py) masks
    the logits before the pick and is advanced after it. With `config.logprobs`, `logprobs` grows
    by one entry per answer token (not for EOS, nor for a token that completes a stop string).
    """

    def __init__(
        self, lm: LanguageModel, config: GenerationConfig, stops: tuple[str, ...] = (), constraint=None
    ) -> None:
        check_for_model(config, lm.vocab_size)
        self.lm, self.config, self.constraint = lm, config, constraint
        self.generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        self.stream, self.eos = TextStream(lm, stops + tuple(config.stop)), lm.eos_token_ids
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []

    def step(self, logits: torch.Tensor) -> tuple[str, int | None]:
        previous = torch.tensor([self.stream.ids], dtype=torch.long)
        processed = process_logits(logits, previous, self.config, self.eos)
        if self.constraint is not None:
            processed = self.constraint.mask(processed, logits)
        token = int(next_token(processed, self.config, self.generator))
        if token in self.eos:
            return self._end("stop"), None
        if self.constraint is not None:
            self.constraint.advance(token)
        delta = self.stream.push(token)
        if self.stream.stopped:
            return delta + self._end("stop"), None
        if self.config.logprobs:
            self.logprobs.append(token_logprob(logits, token, self.config.top_logprobs))
        if len(self.stream.ids) >= self.config.max_new_tokens:
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
    constraint=None,
) -> Iterator[Chunk]:
    """Decode one sequence (greedy or sampled) after a prefilled prompt. logits (1, V) at the prompt's
    last position; state its cache; `constraint` (chat/grammar.py) restricts the tokens. Beam search
    (num_beams > 1) is beam.beam_search, built on this module's pieces; the caller picks it (the chat
    engine, the serving scheduler)."""
    if config.num_beams > 1:
        raise ValueError("generate() decodes one sequence; call beam.beam_search for num_beams > 1")
    decoder = SequenceDecoder(lm, config, stops, constraint)
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
