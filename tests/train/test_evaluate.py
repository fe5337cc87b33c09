"""Evaluation harness: scoring rules, batched answers equal the chat engine's, and the report."""

from __future__ import annotations

import json

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


def test_batched_answers_equal_the_chat_engine(tiny_model):
    """Left-padded batches give the same greedy answers as one-at-a-time chat sessions."""
    scenes = [synth.make_scene(seed) for seed in synth.HELD_OUT_SEEDS[:3]]
    items = [
        Item(synth.render(s), q, a, "synth")
        for s in scenes
        for q, a, _ in synth.questions(s, __import__("random").Random(0))[:2]
    ]
    batched = Answerer(tiny_model, with_image=True, batch_size=4).answer(items, max_new_tokens=5)
    chat = Chat(tiny_model)
    for item, answer in zip(items, batched):
        session = chat.session(generation=GenerationConfig(max_new_tokens=5))
        session.upload_img(item.image)
        session.ask(item.question)
        assert session.answer() == answer


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
