"""Beam search over the LM runtime seam (deterministic; length-normalised scores as HF's default).

The beams run on a fork of the prompt's cache, so the caller's state still holds just the
prompt; the answer's ids are returned and prefilled with the next turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vlchat.chat.generate import Chunk, GenerationResult, check_for_model, find_stop, process_logits
from vlchat.config import GenerationConfig
from vlchat.model.language import LanguageModel, LMState


@dataclass
class Hypothesis:
    ids: list[int]
    score: float  # sum of log-probs
    finish: str

    @property
    def normalised(self) -> float:
        return self.score / max(len(self.ids), 1)


def step_scores(
    lm: LanguageModel, logits: torch.Tensor, beams: list[list[int]], step: int, config: GenerationConfig
) -> torch.Tensor:
    """(B, V) logits -> (B, V) log-probs after the logits processors (generate.process_logits),
    each beam penalised for its own tokens: a beam's score is the sum of these processed log-probs."""
    previous = torch.tensor(beams, dtype=torch.long).reshape(len(beams), step)  # (B, step)
    return process_logits(logits, previous, config, lm.eos_token_ids).log_softmax(-1)


def beam_search(
    lm: LanguageModel,
    logits: torch.Tensor,
    state: LMState,
    config: GenerationConfig,
    stops: tuple[str, ...],
    interrupted: Callable[[], bool] = lambda: False,
    progress: bool = False,
) -> Iterator[Chunk | None]:
    """Yield the best hypothesis's text as one chunk, then the finish chunk. `interrupted()` is
    asked every step (a server's cancel or timeout); when true the search ends as if at max length.
    With `progress`, a None is also yielded after every decode step, so a scheduler can run other
    requests' steps between this search's steps."""
    check_for_model(config, lm.vocab_size)
    width, eos = config.num_beams, lm.eos_token_ids
    work = state.fork()
    work.repeat(width)
    logits = logits.expand(width, -1)
    beams, scores = [[] for _ in range(width)], torch.full((width,), float("-inf"))
    scores[0] = 0.0  # all rows hold the same prefix: expand from one of them only
    done: list[Hypothesis] = []
    for step in range(config.max_new_tokens):
        total = (scores[:, None] + step_scores(lm, logits, beams, step, config)).flatten()
        top = torch.topk(total, 2 * width)
        rows, live, live_scores = [], [], []
        for flat, score in zip(top.indices.tolist(), top.values.tolist()):
            row, token = divmod(flat, logits.shape[-1])
            ids = beams[row] + [token]
            if token in eos or find_stop(lm.detokenize(ids), stops) >= 0:
                done.append(Hypothesis(beams[row] if token in eos else ids, score, "stop"))
            elif len(live) < width:
                rows.append(row), live.append(ids), live_scores.append(score)
        if not live or finished_enough(done, live_scores, width, step + 1):
            break
        if interrupted():
            done += [Hypothesis(ids, s, "length") for ids, s in zip(live, live_scores)]
            break
        beams, scores = live, torch.tensor(live_scores)
        work.select(torch.tensor(rows))
        logits, work = lm.decode(torch.tensor([ids[-1] for ids in live]), work)
        if progress:
            yield None
    else:
        done += [Hypothesis(ids, s, "length") for ids, s in zip(beams, scores.tolist())]
    best = max(done, key=lambda h: h.normalised)
    yield from best_chunks(lm, best, state, stops)


def finished_enough(done: list[Hypothesis], live_scores: list[float], width: int, length: int) -> bool:
    """Stop once `width` hypotheses are done and no live beam can beat the worst of them."""
    if len(done) < width:
        return False
    worst = sorted(h.normalised for h in done)[-width]
    return max(live_scores) / length <= worst


def best_chunks(lm: LanguageModel, best: Hypothesis, state: LMState, stops: tuple[str, ...]) -> Iterator[Chunk]:
    text = lm.detokenize(best.ids)
    cut = find_stop(text, stops)
    exact = cut < 0
    text = text if exact else text[:cut]
    if text:
        yield Chunk(text)
    result = GenerationResult(best.ids if exact else [], text, best.finish, state, exact)
    yield Chunk(finish_reason=best.finish, result=result)
