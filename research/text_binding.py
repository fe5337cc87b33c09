"""Can the language model bind attributes to objects when the scene is given as text?
python -m research.text_binding [--model NAME|FILE] [--no-adapter] [--scenes N].

No image: each held-out synthetic scene's caption (the text stage 1 trains on) is put in front
of its binding questions (colour or size of a named shape, the shape at a position, where a
named object is, "is there a …?"), and the LM picks among the answers the scene allows (its
objects' colours, shapes, positions or sizes; yes/no): the candidate whose whole reply, end
marker included, rendered by the model's template, it finds likeliest. Accuracy per question
type beside chance (the mean of 1/candidates). A model that cannot do this from text has to
learn binding in training rather than find it in the LM (README, Training).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vlchat.chat.messages import Message
from vlchat.chat.template_lookup import get_template
from vlchat.errors import VlchatError
from vlchat.model.language import LanguageModel
from vlchat.model.loaders import model_config
from vlchat.train.collate import collate, encode_sample
from vlchat.train.data import Sample

# qtype -> the scene's possible answers to it (every present value, once)
CANDIDATES = {
    "colour": lambda scene: sorted({o.colour for o in scene.objects}),
    "size": lambda scene: sorted({o.size for o in scene.objects}),
    "shape": lambda scene: sorted({o.shape for o in scene.objects}),
    "position": lambda scene: sorted({o.position for o in scene.objects}),
    "exists": lambda scene: ["no", "yes"],
}


@dataclass
class Question:
    qtype: str
    prompt: str  # caption + question
    answer: str
    candidates: list[str]


def binding_questions(scenes: int) -> list[Question]:
    """The English binding questions of the first `scenes` held-out scenes, each after its caption;
    only those with at least two candidates (one is no choice)."""
    from vlchat.train import synth

    out = []
    for seed in synth.HELD_OUT_SEEDS[:scenes]:
        scene = synth.make_scene(seed)
        for question, answer, qtype in synth.questions(scene, random.Random(seed), "en"):
            candidates = CANDIDATES[qtype](scene) if qtype in CANDIDATES else []
            if len(candidates) > 1 and answer in candidates:
                out.append(Question(qtype, f"{synth.caption(scene)} {question}", answer, candidates))
    return out


def reply_log_probs(lm: LanguageModel, template: str, question: Question) -> list[float]:
    """Teacher-forced log-probability of each candidate as the whole reply, end marker included."""
    renderer = get_template(template)
    encoded = [
        encode_sample(
            Sample([Message.text_message("user", question.prompt), Message.text_message("assistant", candidate)], []),
            renderer,
            None,
            lm.tokenize,
            0,
        )
        for candidate in question.candidates
    ]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = collate(encoded, 1, pad_id)
    with torch.no_grad():
        # the adapter on (if the LM has one) although no image is given: what it learnt is measured
        logits, targets, supervised = lm.supervised_logits(
            lm.embed(batch.ids), batch.attention_mask, batch.labels, adapter=True
        )
    losses = F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)
    rows = supervised.nonzero()[:, 0]  # (n,) the candidate each supervised token belongs to
    return (-torch.zeros(len(encoded)).index_add_(0, rows, losses)).tolist()


def measure(lm: LanguageModel, template: str, questions: list[Question]) -> dict[str, tuple[int, int, float]]:
    """{qtype: (right, asked, chance)} and "all"."""
    right: dict[str, list[int]] = {}
    chance: dict[str, list[float]] = {}
    for question in questions:
        scores = reply_log_probs(lm, template, question)
        picked = question.candidates[max(range(len(scores)), key=scores.__getitem__)]
        right.setdefault(question.qtype, []).append(int(picked == question.answer))
        chance.setdefault(question.qtype, []).append(1 / len(question.candidates))
    right["all"] = [r for qtype in list(right) for r in right[qtype]]
    chance["all"] = [c for qtype in list(chance) for c in chance[qtype]]
    return {q: (sum(r), len(r), sum(chance[q]) / len(chance[q])) for q, r in sorted(right.items())}


def main(argv: list[str] | None = None) -> int:
    from vlchat.model.language import load_language_model

    parser = argparse.ArgumentParser(prog="python -m research.text_binding", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="a preset name or a model config file")
    parser.add_argument("--no-adapter", action="store_true", help="the LM without its LoRA adapter")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes to ask about")
    args = parser.parse_args(argv)
    try:
        if args.scenes < 1:
            raise VlchatError("--scenes must be at least 1")
        config = model_config(args.model)
        lm_config = replace(config.lm, adapter=None) if args.no_adapter else config.lm
        results = measure(load_language_model(lm_config), config.template, binding_questions(args.scenes))
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    adapter = "none" if args.no_adapter or not config.lm.adapter else config.lm.adapter
    print(f"scene given as text, {args.model} (adapter: {adapter}), {args.scenes} held-out scenes")
    for qtype, (right, asked, chance) in results.items():
        print(f"{qtype:9s} {right:4d}/{asked:<4d} {100 * right / asked:5.1f}%  (chance {100 * chance:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
