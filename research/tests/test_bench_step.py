"""The training-step benchmark (autocast off vs bf16 on the same batches) on the tiny model."""

from __future__ import annotations

import json
import re

import torch
import yaml
from conftest import tiny_config

from research.bench_step import main
from vlchat.train.recipe import DataSource, TrainConfig
from vlchat.train.trainer import autocast_context, autocast_enabled


def test_autocast_is_on_for_gpus_and_on_cpu_only_when_asked():
    data = (DataSource("synth:qa", samples=4),)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not autocast_enabled(TrainConfig(data=data), cpu)
    assert autocast_enabled(TrainConfig(data=data, autocast="bf16"), cpu)
    assert autocast_enabled(TrainConfig(data=data), gpu)
    assert not autocast_enabled(TrainConfig(data=data, autocast="off"), gpu)
    assert autocast_context(TrainConfig(data=data, autocast="bf16"), cpu).fast_dtype == torch.bfloat16


def test_bench_step_prints_both_modes_and_their_ratio(tiny_lm_dir, tmp_path, capsys):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "stage2",
                "model": str(model),
                "batch_size": 2,
                "data": [{"spec": "synth:qa", "samples": 16, "turns": 2}],
            }
        )
    )
    assert main(["--config", str(recipe), "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"autocast off : [\d.]+ s/step", out) and re.search(r"autocast bf16: [\d.]+ s/step", out)
    assert re.search(r"bf16 autocast speed-up: [\d.]+x \(1 x 1 steps per mode, batch 2\)", out)
    assert main(["--config", str(recipe), "autocast=sometimes"]) == 2
    assert "autocast must be auto, bf16 or off" in capsys.readouterr().err
