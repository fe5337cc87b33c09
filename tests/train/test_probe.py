"""The held-out probe: per-answer scoring, agreement with the training loss of each question asked
alone, no effect on training, and its rows in a run's metrics and loss curve."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from vlchat.chat.messages import Image, Message, Text
from vlchat.chat.template_lookup import get_template
from vlchat.config import ModelConfig
from vlchat.errors import VlchatError
from vlchat.images import image_key
from vlchat.train.collate import IGNORE, collate, encode_sample
from vlchat.train.data import Sample
from vlchat.train.evaluate import synth_items
from vlchat.train.probe import Probe, answer_scores
from vlchat.train.recipe import DataSource, TrainConfig
from vlchat.train.trainer import train


def test_answer_scores_mean_loss_per_answer_and_exact_only_when_every_token_is_the_argmax():
    logits = torch.full((5, 4), -10.0)
    targets = torch.tensor([1, 2, 3, 0, 1])
    answers = torch.tensor([0, 0, 1, 1, 2])
    logits[0, 1] = logits[1, 2] = 10.0  # answer 0: both right
    logits[2, 3] = 10.0
    logits[3, 2] = 10.0  # answer 1: second token wrong
    logits[4, 1] = 0.0  # answer 2: right, but not confident
    losses, exact = answer_scores(logits, targets, answers, 3)
    assert exact == [True, False, True]
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert losses == pytest.approx([per_token[:2].mean().item(), per_token[2:4].mean().item(), per_token[4].item()])


def test_probe_asks_evals_questions_and_restores_modes(tiny_model):
    probe = Probe(tiny_model, scenes=3)
    items = synth_items(3, "en")
    assert [q for scene in probe.scenes for q in scene.qtypes] == [i.group.split("/")[-1] for i in items]
    assert len(probe.scenes) == 3 and all(scene.encoded.branches for scene in probe.scenes)  # packed turns
    tiny_model.projector.train()
    tiny_model.vision.eval()
    result = probe()
    assert tiny_model.projector.training and not tiny_model.vision.training
    qtypes = {i.group.split("/")[-1] for i in items}
    assert set(result["probe_loss"]) == qtypes and set(result["probe_exact"]) == qtypes | {"all"}
    assert all(0.0 <= v <= 1.0 for v in result["probe_exact"].values())
    assert all(v > 0 for v in result["probe_loss"].values())


def test_an_explaining_recipes_probe_targets_give_the_reason_first(tiny_model):
    """Same questions, same order; only "is there ...?" answers change, to "..., so yes/no."."""
    plain, explained = synth_items(6, "en"), synth_items(6, "en", explained=True)
    assert [i.question for i in plain] == [i.question for i in explained]
    exists = [(a, b) for a, b in zip(plain, explained, strict=True) if a.group.endswith("/exists")]
    assert exists and all(b.answer.endswith(f", so {a.answer}.") for a, b in exists)
    assert all(a.answer == b.answer for a, b in zip(plain, explained, strict=True) if not a.group.endswith("/exists"))
    probe = Probe(tiny_model, scenes=2, explained=True)

    def supervised(scenes) -> int:
        return sum(label != IGNORE for scene in scenes for label in scene.encoded.labels)

    assert supervised(probe.scenes) > supervised(Probe(tiny_model, scenes=2).scenes)
    recipe = TrainConfig(data=(DataSource("easy_vqa:train", explain_yes_no=True), DataSource("synth:qa")))
    assert not recipe.explains_synthetic_yes_no  # easy-VQA's reasons leave the probe's targets bare
    assert TrainConfig(data=(DataSource("synth:qa", explain_yes_no=True),)).explains_synthetic_yes_no


def alone(model, item):
    """`item` as a one-question training sample."""
    sample = Sample(
        [
            Message("user", [Image(image_key(item.image)), Text(item.question)]),
            Message.text_message("assistant", item.answer),
        ],
        [item.image],
    )
    return encode_sample(sample, get_template(model.config.template), None, model.lm.tokenize, model.tokens_per_image)


def test_probe_scores_each_question_as_if_asked_alone(tiny_model):
    """Per answer, the packed scene's loss and exactness equal those of the question alone; per
    type, the probe's loss is their mean."""
    probe = Probe(tiny_model, scenes=2, batch_size=2)
    items = synth_items(2, "en")
    packed_loss, packed_exact = probe.score([scene.encoded for scene in probe.scenes])
    single = [probe.score([alone(tiny_model, item)]) for item in items]
    assert packed_loss == pytest.approx([loss[0] for loss, _ in single], abs=1e-4)
    assert packed_exact == [exact[0] for _, exact in single]
    result = probe()
    by_type: dict[str, list[float]] = {}
    pad = tiny_model.lm.tokenizer.pad_token_id or 0
    with torch.no_grad():
        for item in items:
            batch = collate([alone(tiny_model, item)], tiny_model.config.vision.image_size, pad)
            images = tiny_model.projector(tiny_model.vision(batch.pixels))
            loss = tiny_model.lm.loss(tiny_model.embed(batch.ids, images), batch.attention_mask, batch.labels)
            by_type.setdefault(item.group.split("/")[-1], []).append(loss.item())
    for qtype, losses in by_type.items():
        assert result["probe_loss"][qtype] == pytest.approx(sum(losses) / len(losses), abs=2e-4), qtype


def test_probe_keys_are_checked():
    data = (DataSource("synth:qa", samples=4),)
    with pytest.raises(VlchatError, match="probe_every"):
        TrainConfig(data=data, probe_every=-1)
    with pytest.raises(VlchatError, match="probe_scenes"):
        TrainConfig(data=data, probe_every=5, probe_scenes=0)


def tiny_run(tmp_path, model_file, name: str, **fields) -> TrainConfig:
    return TrainConfig(
        stage="stage2",
        model=str(model_file),
        projector=ModelConfig.from_file(str(model_file)).projector,
        data=(DataSource("synth:qa", samples=16),),
        batch_size=2,
        lr=0.01,
        warmup_steps=2,
        max_steps=4,
        log_every=3,
        save_every=100,
        output_dir=str(tmp_path / name),
        **fields,
    )


def test_a_probed_run_trains_the_same_weights_and_logs_the_probe(tiny_lm_dir, tmp_path):
    model_file = tmp_path / "tiny.json"
    model_file.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    # LoRA with dropout: a probe that left the LM in eval mode or drew random numbers would change it
    plain = train(tiny_run(tmp_path, model_file, "plain", lm="lora", lora_dropout=0.5))
    probed = train(tiny_run(tmp_path, model_file, "probed", lm="lora", lora_dropout=0.5, probe_every=2, probe_scenes=2))
    a, b = (load_file(out / "projector.safetensors") for out in (plain, probed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (probed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]  # probe steps 2, 4; log step 3; the last step
    assert [("probe_exact" in r) for r in rows] == [True, False, True]
    assert rows[0]["probe_s"] >= 0 and "all" in rows[0]["probe_exact"]
    assert (probed / "loss.png").stat().st_size > 0
