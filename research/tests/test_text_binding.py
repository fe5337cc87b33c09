"""The text-only binding check (research/text_binding.py) on the tiny LM."""

from __future__ import annotations

import json
import re

import torch
from conftest import tiny_config

from research.text_binding import binding_questions, main, measure, reply_log_probs
from vlchat.chat.messages import Message
from vlchat.chat.template_lookup import get_template
from vlchat.model.language import load_language_model
from vlchat.train import synth
from vlchat.train.collate import IGNORE, encode_sample
from vlchat.train.data import Sample


def test_questions_follow_their_caption_and_offer_the_scene_s_answers():
    questions = binding_questions(20)
    assert {q.qtype for q in questions} == {"colour", "size", "shape", "position", "exists"}
    scene = synth.make_scene(synth.HELD_OUT_SEEDS[0])
    first = [q for q in questions if q.prompt.startswith(synth.caption(scene) + " ")]
    assert first, "the first scene's questions come after its caption"
    for question in questions:
        assert question.answer in question.candidates and len(set(question.candidates)) >= 2
    colour = next(q for q in first if q.qtype == "colour")
    assert colour.candidates == sorted({o.colour for o in scene.objects})


def test_a_reply_s_score_is_its_tokens_log_probability_end_marker_included(tiny_lm_dir):
    """Batched and padded as the candidates are, each score equals the candidate scored alone."""
    config = tiny_config(tiny_lm_dir)
    lm = load_language_model(config.lm)
    question = binding_questions(3)[0]
    scores = reply_log_probs(lm, config.template, question)
    renderer = get_template(config.template)
    for candidate, score in zip(question.candidates, scores, strict=True):
        sample = Sample(
            [Message.text_message("user", question.prompt), Message.text_message("assistant", candidate)], []
        )
        encoded = encode_sample(sample, renderer, None, lm.tokenize, 0)
        scored = [t for t, label in enumerate(encoded.labels) if label != IGNORE]
        assert lm.detokenize([encoded.ids[t] for t in scored]) == candidate + renderer.assistant_end
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([encoded.ids])).logits[0].float(), -1)
        expected = sum(logp[t - 1, encoded.ids[t]].item() for t in scored)
        assert abs(score - expected) < 1e-3


def test_measure_counts_every_question_once_beside_chance(tiny_lm_dir):
    config = tiny_config(tiny_lm_dir)
    questions = binding_questions(4)
    results = measure(load_language_model(config.lm), config.template, questions)
    assert results["all"][1] == len(questions)
    assert sum(asked for qtype, (_, asked, _) in results.items() if qtype != "all") == len(questions)
    for right, asked, chance in results.values():
        assert 0 <= right <= asked and 0 < chance <= 0.5


def test_cli_prints_each_type_and_fails_cleanly(tiny_lm_dir, tmp_path, capsys):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    assert main(["--model", str(model), "--scenes", "3", "--no-adapter"]) == 0
    out = capsys.readouterr().out
    assert "adapter: none" in out and re.search(r"all\s+\d+/\d+\s+[\d.]+%  \(chance [\d.]+%\)", out)
    assert main(["--model", str(model), "--scenes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --scenes must be at least 1"
