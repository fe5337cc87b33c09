"""A held-out probe during training: teacher-forced answer loss and exactness per question type.

Every `probe_every` steps the trainer scores the questions of the first `probe_scenes` held-out
synthetic scenes (the scenes `vlchat eval` asks about first: seeds never trained on), each asked
alone with its image, rendered by the recipe's template as training renders a sample; a scene's
questions are packed as independent turns, as training packs them, so its image is attended
once. Per question type it logs the mean answer loss and the share of answers whose every token
(end marker included) is the model's top choice given the tokens before it: then greedy
decoding says exactly that answer, so the share is a floor under what `vlchat eval` would score
on those questions (eval also accepts other spellings). Binding (colour, shape, position of a named
object) is what separates a stalled stage 2 from the default model's, and it shows here per type
long before the run ends (docs/experiments.md).

Forward only, in eval mode (the modes are restored after), under the training step's autocast;
it draws no random numbers, so a run with the probe trains exactly the weights of one without.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.template_lookup import get_template
from vlchat.images import image_key
from vlchat.model.vlm import VisionLanguageModel
from vlchat.train.collate import Encoded, answer_runs, collate, encode_sample
from vlchat.train.data import Sample


@dataclass
class ProbeScene:
    qtypes: list[str]  # e.g. ["colour", "count", ...], one per question, in turn order
    encoded: Encoded  # the scene's questions as independent turns (collate.py), answers supervised


def encode_scenes(
    vlm: VisionLanguageModel,
    scenes: int,
    template: str | None = None,
    system: str | None = None,
    explained: bool = False,
) -> list[ProbeScene]:
    """The held-out scenes' English questions (evaluate.synth_items), each scene's packed as
    independent turns: every question is scored as if asked alone, the image attended once.
    `explained`: "is there ...?" targets give their reason first, as the recipe trains them."""
    from vlchat.train.evaluate import synth_items

    renderer = get_template(template or vlm.config.template)
    by_image: dict[int, list] = {}
    for item in synth_items(scenes, "en", explained):
        by_image.setdefault(id(item.image), []).append(item)
    out = []
    for items in by_image.values():
        image = items[0].image
        messages = []
        for number, item in enumerate(items):  # the image with the first question, as synth.qa_sample
            parts = ([Image(image_key(image))] if number == 0 else []) + [Text(item.question)]
            messages += [Message("user", parts), Message.text_message("assistant", item.answer)]
        sample = Sample(messages, [image], source=items[0].group, meta={"independent_turns": True})
        encoded = encode_sample(sample, renderer, system, vlm.lm.tokenize, vlm.tokens_per_image)
        out.append(ProbeScene([item.group.rsplit("/", 1)[-1] for item in items], encoded))
    return out


def answer_scores(
    logits: torch.Tensor, targets: torch.Tensor, answers: torch.Tensor, n_answers: int
) -> tuple[list[float], list[bool]]:
    """Per answer: mean answer-token cross-entropy, and whether every token is the argmax.
    logits (n, V), targets (n,), answers (n,) = the answer (0-based) each supervised token is in."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)
    right = logits.argmax(-1) == targets  # (n,)
    count = torch.bincount(answers, minlength=n_answers).clamp(min=1)
    mean_loss = torch.zeros(n_answers).index_add_(0, answers, losses) / count
    wrong = torch.zeros(n_answers).index_add_(0, answers, (~right).float())
    return mean_loss.tolist(), (wrong == 0).tolist()


class Probe:
    def __init__(
        self,
        vlm: VisionLanguageModel,
        scenes: int,
        template: str | None = None,
        system: str | None = None,
        batch_size: int = 8,
        explained: bool = False,
    ) -> None:
        self.vlm, self.batch_size = vlm, batch_size
        self.scenes = encode_scenes(vlm, scenes, template, system, explained)
        tokenizer = vlm.lm.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def __call__(self, autocast=None) -> dict[str, dict[str, float]]:
        """{"probe_loss": {qtype: mean loss}, "probe_exact": {qtype: share, "all": share}}."""
        modes = {module: module.training for module in self.vlm.modules()}
        self.vlm.eval()
        losses, exact = defaultdict(list), defaultdict(list)
        try:
            for start in range(0, len(self.scenes), self.batch_size):
                chunk = self.scenes[start : start + self.batch_size]
                with autocast or contextlib.nullcontext():
                    answer_loss, answer_exact = self.score([scene.encoded for scene in chunk])
                qtypes = [qtype for scene in chunk for qtype in scene.qtypes]
                for qtype, loss, ok in zip(qtypes, answer_loss, answer_exact, strict=True):
                    losses[qtype].append(loss)
                    exact[qtype].append(ok)
        finally:
            for module, training in modes.items():
                module.training = training
        every = [ok for oks in exact.values() for ok in oks]
        return {
            "probe_loss": {q: round(sum(v) / len(v), 4) for q, v in sorted(losses.items())},
            "probe_exact": {
                **{q: round(sum(v) / len(v), 4) for q, v in sorted(exact.items())},
                "all": round(sum(every) / max(1, len(every)), 4),
            },
        }

    def score(self, encoded: list[Encoded]) -> tuple[list[float], list[bool]]:
        """(loss, exact) of every answer in `encoded`, in reading order."""
        batch = collate(encoded, self.vlm.pixels, self.pad_id)
        device = next(self.vlm.projector.parameters()).device
        images = self.vlm.projector(self.vlm.vision(batch.pixels.to(device)))  # (n, N, D)
        embeds = self.vlm.embed(batch.ids.to(device), images)  # (B, T, D)
        position_ids = batch.position_ids.to(device) if batch.position_ids is not None else None
        logits, targets, supervised = self.vlm.lm.supervised_logits(
            embeds, batch.attention_mask.to(device), batch.labels.to(device), position_ids
        )
        answers = answer_runs(batch.labels)[supervised.cpu()] - 1  # (n,) 0-based answer of each token
        return answer_scores(logits.cpu(), targets.cpu(), answers, int(answers.max()) + 1)
