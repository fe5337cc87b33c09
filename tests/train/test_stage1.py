"""Stage 1 on a CLIP/SigLIP encoder: batches carry the checkpoint's own image preprocessing (its size,
mean and std, as the model sees images at inference), not EfficientNet's, and a tiny run trains."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.hf_tiny import save_tiny_vision_model
from vlchat.images import load_image, to_tensor
from vlchat.train import distributed
from vlchat.train.recipe import load_config
from vlchat.train.stage1 import run
from vlchat.train.trainer import prepare


@pytest.fixture(scope="module", params=["clip", "siglip"])
def recipe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"stage1-{request.param}")
    recipe = {
        "stage": "stage1",
        "model": str(save_tiny_vision_model(root, request.param)),
        "projector": {"position_tokens": 0, "position_code": 0},
        "data": [{"spec": "synth:caption", "samples": 8}],
        "batch_size": 2,
        "lr": 0.01,
        "warmup_steps": 1,
        "max_steps": 3,
        "log_every": 1,
        "save_every": 100,
        "output_dir": str(root / "out"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def image_of(sample):
    image = sample.images[0]
    return load_image(image) if isinstance(image, str) else image


def test_batches_use_the_checkpoints_preprocessing(recipe):
    samples, module, batches, _, _ = prepare(load_config(recipe, stage="stage1"), distributed.World())
    (batch,) = batches([0])
    vlm = module.vlm
    expected = vlm.pixels(image_of(samples[0]))  # the tower's preprocessor_config.json
    assert batch.pixels.shape == (1, 3, 28, 28)
    assert torch.allclose(batch.pixels[0], expected, atol=1e-6)
    efficientnet = to_tensor(image_of(samples[0]), 28)  # what the collate used to do
    assert (batch.pixels[0] - efficientnet).abs().max() > 1e-3  # SigLIP (x / 255 - 0.5) / 0.5 is close to it


def test_a_tiny_stage1_run_trains_the_projector(recipe):
    out = run(recipe)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in records)
    assert (out / "projector.safetensors").is_file() and (out / "projector.json").is_file()
