"""Evaluation harness: scoring rules, batched answers equal the chat engine's, and the report."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import pytest
import torch

from vlchat.chat.engine import Chat
from vlchat.config import GenerationConfig
from vlchat.train import synth
from vlchat.train.evaluate import Answerer, Item, caption_recall, evaluate, markdown, normalise, verdict, write_report


def test_normalise_ignores_case_space_and_punctuation():
    assert normalise(" Red. ") == "red" == normalise("RED!")
    assert normalise("红色。") == "红色"


def test_a_reasoned_yes_no_reply_is_scored_by_its_verdict():
    assert verdict("It is blue, so no.") == "no"
    assert verdict("It is a circle, so Yes") == "Yes"
    assert verdict("no") == "no" and verdict("blue") == "blue"
    assert verdict("so no, it is blue") == "so no, it is blue"  # the verdict must come last
    assert verdict("also no.") == "also no."  # a whole word "so"


def test_caption_recall_counts_named_attributes():
    scene = synth.Scene((synth.SceneObject("circle", "red", "large", "left"),), "white", "CAT", 1)
    assert caption_recall("A red circle with the word CAT.", scene, "en") == 1.0
    assert caption_recall("A red square.", scene, "en") == 1 / 3
    assert caption_recall("一个红色的圆形", scene, "zh") == 2 / 3


@pytest.fixture(scope="module")
def lively_model(tiny_model):
    """The tiny model with decoder weights large enough that its answers vary (the tiny LM's own
    small init repeats the prompt's last token, "\\n", so every answer strips to "")."""
    model, generator = copy.deepcopy(tiny_model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.lm.model.get_decoder().layers.parameters():
            if weight.ndim == 2:  # (out, in) projections: std 3 / sqrt(in)
                weight.copy_(torch.randn(weight.shape, generator=generator) * 3 / weight.shape[1] ** 0.5)
    return model


def engine_answer(tiny_model, item: Item, max_new_tokens: int, with_image: bool = True, template=None):
    """What a chat session (the CLI's path: `generate()`) answers, why it stopped, and its ids."""
    session = Chat(tiny_model).session(generation=GenerationConfig(max_new_tokens=max_new_tokens))
    session.template = template or session.template
    if with_image:
        session.upload_img(item.image)
    session.ask(item.question)
    result = list(session.stream())[-1].result
    return session.messages[-1].content, result.finish_reason, result.token_ids


def scene_items(count: int) -> list[Item]:
    scenes = [synth.make_scene(seed) for seed in synth.HELD_OUT_SEEDS[:count]]
    return [
        Item(synth.render(s), q, a, "synth") for s in scenes for q, a, _ in synth.questions(s, random.Random(0))[:2]
    ]


def test_eval_answers_equal_the_chat_engine_that_hits_max_new_tokens(lively_model):
    """Continuous batching (5 questions, 2 rows: rows join as others leave) answers as sessions do."""
    items = scene_items(3)[:5]
    answers = Answerer(lively_model, with_image=True, batch_size=2).answer(items, max_new_tokens=5)
    assert all(answers)
    for item, answer in zip(items, answers):
        expected, finish, _ = engine_answer(lively_model, item, 5)
        assert finish == "length" and answer == expected


def test_eval_stops_at_eos_as_the_chat_engine_does(lively_model, monkeypatch):
    """An EOS token that is not a stop string (as `<|endoftext|>` for a ChatML model) ends the
    answer where the decoder ends it; HF generate's text cut kept it and the padding after it."""
    items = scene_items(2)[:3]
    _, _, ids = engine_answer(lively_model, items[0], 12)
    eos = next(t for k, t in enumerate(ids) if k >= 2 and t not in ids[:k])  # a token first seen mid-answer
    monkeypatch.setattr(lively_model.lm.model.generation_config, "eos_token_id", eos)
    answers = Answerer(lively_model, with_image=True, batch_size=3).answer(items, max_new_tokens=12)
    expected = [engine_answer(lively_model, item, 12) for item in items]
    assert expected[0][1] == "stop" and len(expected[0][2]) == ids.index(eos)  # the case is real
    assert answers == [text for text, _, _ in expected]


def test_eval_stops_at_the_templates_stop_string_as_the_chat_engine_does(lively_model):
    items = scene_items(2)[:3]
    full, _, ids = engine_answer(lively_model, items[0], 12)
    piece = lively_model.lm.detokenize(ids[3:4]).strip() or lively_model.lm.detokenize(ids[4:5]).strip()
    answerer = Answerer(lively_model, with_image=True, batch_size=2)
    answerer.template = replace(answerer.template, stop=(*answerer.template.stop, piece))
    answers = answerer.answer(items, max_new_tokens=12)
    expected = [engine_answer(lively_model, item, 12, template=answerer.template) for item in items]
    assert expected[0][1] == "stop" and len(expected[0][0]) < len(full)  # the stop string cut it
    assert answers == [text for text, _, _ in expected]


def test_the_text_only_baseline_sends_no_image(lively_model, monkeypatch):
    items = scene_items(2)[:3]
    expected = [engine_answer(lively_model, item, 5, with_image=False)[0] for item in items]
    assert all(expected)

    def no_image(*args):
        raise AssertionError("the text-only baseline encoded an image")

    monkeypatch.setattr(lively_model, "encode_images", no_image)
    assert Answerer(lively_model, with_image=False, batch_size=2).answer(items, max_new_tokens=5) == expected


def test_evaluate_writes_markdown_and_json(tiny_model, tmp_path):
    report = evaluate(tiny_model, ["easy_vqa", "synth"], limit=4, scenes=2, langs=["en", "zh"], batch_size=4)
    assert set(report) == {"model", "text_only"}
    assert report["model"]["counts"]["easy_vqa"] == 4
    assert any(g.startswith("synth/zh/") for g in report["model"]["accuracy"])
    assert "caption/en" in report["model"]["accuracy"]
    write_report(report, tmp_path, "tiny")
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["overall"]
    text = (tmp_path / "eval.md").read_text()
    assert "| **easy_vqa (all)** | 4 |" in text and "text-only baseline" in text
    assert markdown(report, "tiny") == text
    assert "replies" not in json.loads((tmp_path / "eval.json").read_text())["model"]


def test_no_baseline_asks_only_with_the_image(tiny_model, tmp_path):
    report = evaluate(tiny_model, ["easy_vqa"], limit=2, scenes=1, langs=["en"], batch_size=2, baseline=False)
    assert set(report) == {"model"}
    text = markdown(report, "tiny")
    assert "| **easy_vqa (all)** | 2 |" in text and text.count(" | - |") == 2 and "(baseline)" not in text


def test_replies_file_holds_every_answer_and_its_score(tiny_model, tmp_path):
    report = evaluate(tiny_model, ["easy_vqa", "synth"], limit=4, scenes=2, langs=["en"], batch_size=4)
    write_report(report, tmp_path, "tiny")
    rows = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    for side in ("model", "text_only"):
        mine = [r for r in rows if r["side"] == side]
        assert len(mine) == sum(report[side]["counts"].values())
        for group, accuracy in report[side]["accuracy"].items():
            scored = [r["score"] for r in mine if r["group"] == group]
            assert abs(sum(scored) / len(scored) - accuracy) < 1e-3
    easy = next(r for r in rows if r["group"] == "easy_vqa")
    assert easy["question"] and easy["answer"] and isinstance(easy["reply"], str)
