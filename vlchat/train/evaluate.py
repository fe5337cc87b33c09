"""`vlchat eval`: exact-match VQA accuracy and caption attribute recall, beside a text-only baseline.

Suites:
- easy_vqa: the easy-vqa test split (a fixed, evenly spread subset when `limit` is set).
- synth: held-out synthetic scenes (seeds never used in training): accuracy per question type,
  in English and Chinese, and caption attribute recall (share of the scene's colours, shapes
  and printed word that a generated description names).
- agent_photos, agent_signs, agent_math, tool_selection, text_only: through the agent loop
  (train/evaluate_agent.py); none of them by default.
The baseline is the LM with the image removed from the prompt: what can be guessed from the
question alone (e.g. "yes" to every yes/no question). Without an image the LM runs without its
LoRA adapter (model/lora.py: the adapter is on only for sequences with an image), so the baseline
is the base LM, as a text-only chat gets it.
Answers are decoded as the server decodes requests (the chat engine's prompt code, greedy
`SequenceDecoder`s in a `BatchDecoder`, stopping on the template's stop strings and EOS): each is
what `vlchat ask` answers for the same image and question, up to floating-point rounding.
Answers are exact-match after `normalise`; a reply that gives its reason before a yes/no
verdict ("It is blue, so no.", as a model trained with `explain_yes_no` answers easy-VQA's)
is scored by its verdict.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from vlchat.chat.batch import BatchDecoder
from vlchat.chat.engine import Chat
from vlchat.chat.generate import SequenceDecoder
from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.prompt import encode, slot_ids
from vlchat.chat.template_lookup import get_template
from vlchat.config import GenerationConfig
from vlchat.images import load_image
from vlchat.model.language import LMState
from vlchat.model.vlm import VisionLanguageModel
from vlchat.train.evaluate_agent import AGENT_SUITES, evaluate_agent, markdown_agent

VQA_SUITES = ("easy_vqa", "synth")


@dataclass
class Item:
    image: object  # PIL image or path
    question: str
    answer: str  # "" for captions
    group: str  # e.g. "easy_vqa", "synth/en/colour", "caption/en"
    scene: object = None  # synthetic scene, for caption recall


@dataclass
class Scores:
    replies: list[dict] = field(default_factory=list)  # one row per item; the totals derive from it

    def add(self, item: Item, reply: str, score: float) -> None:
        self.replies.append(
            {"group": item.group, "question": item.question, "answer": item.answer, "reply": reply, "score": score}
        )

    @property
    def total(self) -> dict[str, int]:
        return dict(Counter(row["group"] for row in self.replies))

    @property
    def correct(self) -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        for row in self.replies:
            sums[row["group"]] += row["score"]
        return dict(sums)

    def table(self) -> dict[str, float]:
        total, correct = self.total, self.correct
        return {g: correct[g] / total[g] for g in sorted(total)}


def normalise(text: str) -> str:
    return re.sub(r"[\s\.\!\?。！？，,\"'“”]+", " ", text).strip().lower()


def verdict(text: str) -> str:
    """The answer a reply commits to: "no" for "It is blue, so no.", else the reply."""
    found = re.search(r"\bso (yes|no)\W*$", text.strip(), re.IGNORECASE)
    return found.group(1) if found else text


def easy_vqa_items(limit: int | None) -> list[Item]:
    from vlchat.train.data import read_easy_vqa

    samples = list(read_easy_vqa("test"))
    step = max(1, len(samples) // limit) if limit else 1
    chosen = samples[::step][:limit] if limit else samples
    return [Item(s.images[0], s.messages[0].parts[-1].text, s.meta["answer"], "easy_vqa") for s in chosen]


def synth_items(scenes: int, lang: str, explained: bool = False) -> list[Item]:
    """The held-out scenes' questions; `explained`: "is there ...?" answered with its reason first,
    as by a model trained with explain_yes_no (English; the training probe's targets)."""
    from vlchat.train import synth

    askers = {"askers": synth.HELD_OUT_ASK_EXPLAINED} if explained else {}  # else questions' default
    items = []
    for seed in synth.HELD_OUT_SEEDS[:scenes]:
        scene = synth.make_scene(seed)
        image = synth.render(scene)
        for question, answer, qtype in synth.questions(scene, random.Random(seed), lang, **askers):
            items.append(Item(image, question, answer, f"synth/{lang}/{qtype}"))
    return items


def caption_items(scenes: int, lang: str) -> list[Item]:
    from vlchat.train import synth

    prompt = "Describe this image." if lang == "en" else "请描述这张图片。"
    offset = synth.HELD_OUT_SEEDS[50_000]  # a held-out range apart from the QA scenes
    return [
        Item(synth.render(s), prompt, "", f"caption/{lang}", s)
        for s in (synth.make_scene(offset + i) for i in range(scenes))
    ]


def caption_recall(text: str, scene, lang: str) -> float:
    """Share of the scene's attribute words (colours, shapes, word) named in `text`."""
    from vlchat.train.synth_phrases import ZH as _ZH

    words = {o.colour for o in scene.objects} | {o.shape for o in scene.objects}
    words = {_ZH[w] if lang == "zh" else w for w in words} | ({scene.word} if scene.word else set())
    low = text.lower()
    return sum(w.lower() in low for w in words) / len(words)


@dataclass
class Asking:
    """One question in the decode batch: a row of `BatchDecoder`."""

    index: int  # the item's place in the list being answered
    decoder: SequenceDecoder
    logits: torch.Tensor  # (1, V) at the row's current position


class Answerer:
    """Greedy answers decoded the way the server decodes them: each prompt, built by the chat
    engine's prompt code, is prefilled alone, then joins a `BatchDecoder` of up to `batch_size`
    rows whose `SequenceDecoder`s stop on the template's stop strings and EOS. Each answer is
    what `ChatSession.answer()` returns for the same image and question (stripped)."""

    def __init__(self, model: VisionLanguageModel, with_image: bool, batch_size: int = 16) -> None:
        self.model, self.with_image, self.batch_size = model, with_image, batch_size
        self.template = get_template(model.config.template)
        self.chat = Chat(model)  # its image-embedding cache: a scene's questions share one encoding

    def prompt(self, item: Item) -> torch.Tensor:
        """The item as one user message (image first, as upload_img then ask) -> (1, T, D) embeddings."""
        parts = [Text(item.question)]
        images = []
        if self.with_image:
            image = item.image if hasattr(item.image, "mode") else load_image(item.image)  # as upload_img
            key, embeddings = self.chat.image_embeddings(image, instruction=item.question)  # read by InstructBLIP
            parts, images = [Image(key), *parts], [embeddings]
        keys, _ = encode(self.template, [Message("user", parts)], self.model.lm.tokenize, self.model.tokens_per_image)
        return self.model.embed(torch.tensor([slot_ids(keys)]), torch.stack(images) if images else None)

    @torch.inference_mode()
    def answer(self, items: list[Item], max_new_tokens: int) -> list[str]:
        config = GenerationConfig(max_new_tokens=max_new_tokens)  # greedy
        lm, answers = self.model.lm, [""] * len(items)
        decoding: BatchDecoder[Asking] = BatchDecoder(lm)
        waiting = iter(enumerate(items))

        def leave(asking: Asking, state: LMState) -> None:
            answers[asking.index] = asking.decoder.result(state).text.strip()

        while True:
            joined = []
            for index, item in islice(waiting, self.batch_size - decoding.size):
                # the LoRA adapter is on for prompts with an image, as in a chat (model/lora.py)
                logits, state = lm.prefill(self.prompt(item), LMState(adapter=lm.adapter_on(self.with_image)))
                joined.append((Asking(index, SequenceDecoder(lm, config, self.template.stop), logits), state))
            decoding.join(joined)
            if not decoding.size:
                return answers
            decoding.step(leave)


def score(model: VisionLanguageModel, items: list[Item], with_image: bool, batch_size: int) -> Scores:
    answerer, scores = Answerer(model, with_image, batch_size), Scores()
    qa = [i for i in items if i.answer]
    for item, said in zip(qa, answerer.answer(qa, max_new_tokens=16)):  # room for a reason
        scores.add(item, said, float(normalise(verdict(said)) == normalise(item.answer)))
    captions = [i for i in items if not i.answer]
    for item, said in zip(captions, answerer.answer(captions, max_new_tokens=64)):
        scores.add(item, said, caption_recall(said, item.scene, item.group.split("/")[1]))
    return scores


def evaluate(
    model: VisionLanguageModel,
    suites: list[str],
    limit: int | None,
    scenes: int,
    langs: list[str],
    batch_size: int = 16,
    chat: Chat | None = None,
    progress=None,
    baseline: bool = True,
) -> dict:
    """{"model", "text_only"} for the VQA suites (easy_vqa, synth), {"agent"} for the agent suites
    (train/evaluate_agent.py), each present when one of its suites is asked for. Without `baseline`
    no "text_only" side (it is the base LM without the image: the same for any projector/adapter)."""
    items: list[Item] = []
    if "easy_vqa" in suites:
        items += easy_vqa_items(limit)
    for lang in langs if "synth" in suites else []:
        items += synth_items(scenes, lang) + caption_items(max(8, scenes // 5), lang)
    report = {}
    sides = (("model", True), ("text_only", False)) if baseline else (("model", True),)
    for name, with_image in sides if items else ():
        start = time.perf_counter()
        scores = score(model, items, with_image, batch_size)
        report[name] = {
            "accuracy": scores.table(),
            "counts": dict(scores.total),
            "overall": overall(scores),
            "seconds": round(time.perf_counter() - start, 1),
            "replies": scores.replies,
        }
    if any(s in AGENT_SUITES for s in suites):
        report["agent"] = evaluate_agent(chat or Chat(model), suites, limit, progress=progress)
    return report


def overall(scores: Scores) -> dict[str, float]:
    """Accuracy over all questions of each suite/language (captions excluded)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    correct = scores.correct
    for group, n in scores.total.items():
        if group.startswith("caption"):
            continue
        key = "/".join(group.split("/")[:2])
        sums[key][0] += correct[group]
        sums[key][1] += n
    return {k: c / n for k, (c, n) in sorted(sums.items())}


BASELINE_NOTE = (
    "Text-only baseline: the same questions without the image, answered by the base language model "
    "(a LoRA adapter is on only for prompts with an image)."
)


def markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    if "model" in report:
        lines += vqa_markdown(report["model"], report.get("text_only"))
    lines += markdown_agent(report.get("agent", {}))
    return "\n".join(lines) + "\n"


def vqa_markdown(model: dict, base: dict | None) -> list[str]:
    """The VQA table; without a baseline (`--no-baseline`) its column says "-"."""

    def baseline(kind: str, key: str) -> str:
        return f"{base[kind][key]:.1%}" if base else "-"

    lines = [BASELINE_NOTE if base else "No text-only baseline (--no-baseline).", ""]
    lines += ["| suite | questions | vlchat | text-only baseline |", "|---|---:|---:|---:|"]
    for key, value in model["overall"].items():
        n = sum(c for g, c in model["counts"].items() if g.startswith(key))
        lines.append(f"| **{key} (all)** | {n} | **{value:.1%}** | {baseline('overall', key)} |")
    for group, value in model["accuracy"].items():
        metric = "attribute recall" if group.startswith("caption") else "accuracy"
        lines.append(f"| {group} ({metric}) | {model['counts'][group]} | {value:.1%} | {baseline('accuracy', group)} |")
    lines.append("")
    base_time = f", {base['seconds']} s (baseline)" if base else ""
    lines.append(f"Time: {model['seconds']} s (model){base_time}.")
    return lines


def write_report(report: dict, out: Path, title: str) -> None:
    """eval.md, eval.json (the scores) and replies.jsonl (every question, its expected answer and
    each side's reply, to read the misses)."""
    out.mkdir(parents=True, exist_ok=True)
    scores = {name: without_replies(side) for name, side in report.items() if name != "agent"}
    if "agent" in report:
        scores["agent"] = {suite: without_replies(part) for suite, part in report["agent"].items()}
    (out / "eval.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False))
    (out / "eval.md").write_text(markdown(report, title))
    rows = [{"side": name, **row} for name, side in report.items() if name != "agent" for row in side["replies"]]
    rows += [row for part in report.get("agent", {}).values() for row in part["replies"]]
    (out / "replies.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def without_replies(part: dict) -> dict:
    return {k: v for k, v in part.items() if k != "replies"}
