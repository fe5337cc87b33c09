"""The recipe-time benchmark (a few timed steps per recipe, projected to whole runs) on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import tiny_config

from vlchat.bench.train import PartTiming, format_part, format_total, main, one_off_steps
from vlchat.train.recipe import DataSource, TrainConfig


@pytest.fixture
def recipes(tiny_lm_dir, tmp_path):
    """Two tiny recipes chained like the default model's (stage 2 starts from stage 1's projector)."""
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(
        yaml.safe_dump(
            {
                "stage": "stage1",
                "model": str(model),
                "batch_size": 2,
                "max_steps": 40,
                "output_dir": str(tmp_path / "runs/first"),
                "data": [{"spec": "synth:caption", "samples": 16}],
            }
        )
    )
    second.write_text(
        yaml.safe_dump(
            {
                "stage": "stage2",
                "model": str(model),
                "batch_size": 2,
                "max_steps": 60,
                "lm": "lora",
                "init_projector": str(tmp_path / "runs/first/projector"),
                "output_dir": str(tmp_path / "runs/second"),
                "data": [{"spec": "synth:qa", "samples": 16, "turns": 2}],
            }
        )
    )
    return first, second


def test_projects_each_part_and_the_total_against_reference_runs(recipes, tmp_path, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    for name, rows in (("first", [(2, 4.0), (40, 80.0)]), ("second", [(2, 6.0), (60, 300.0)])):
        (reference / f"{name}-metrics.jsonl").write_text(
            "".join(json.dumps({"step": step, "elapsed_s": elapsed}) + "\n" for step, elapsed in rows)
        )
    # init_projector points at a run that does not exist yet: the part is timed from a fresh one
    assert main([str(recipes[0]), str(recipes[1]), "--steps", "2", "--reference", str(reference)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    pattern = (
        r"{}: set-up [\d.]+ s, first 2 steps [\d.]+ s \([\d.]+ s/step\) -> {} steps ≈ [\d.]+ min; "
        r"reference {} s for the same steps \([\d.]+x\), its run {} min -> ≈ [\d.]+ min here"
    )
    assert re.fullmatch(pattern.format("first.yaml", 40, "4.0", "1.3"), lines[0])
    assert re.fullmatch(pattern.format("second.yaml", 60, "6.0", "5.0"), lines[1])
    assert re.fullmatch(
        r"total: ≈ [\d.]+ min projected from the timed steps, ≈ [\d.]+ min from the reference "
        r"runs scaled \(6.3 min of training loops there\)",
        lines[2],
    )


def test_projections_are_the_set_up_plus_the_steps_scaled():
    part = PartTiming(
        "a.yaml",
        max_steps=100,
        setup_s=6.0,
        steps_timed=10,
        steps_s=30.0,
        reference_steps_s=10.0,
        reference_run_s=120.0,
    )
    assert part.projected_s == 6.0 + 3.0 * 100
    assert part.ratio == 3.0 and part.scaled_reference_s == 6.0 + 360.0
    unreferenced = PartTiming("b.yaml", max_steps=10, setup_s=0.0, steps_timed=5, steps_s=60.0)
    assert unreferenced.ratio is None and unreferenced.scaled_reference_s is None
    assert format_total([part, unreferenced]) == "total: ≈ 7.1 min projected from the timed steps"  # (306 + 120) s


def test_compiling_steps_count_once_and_the_later_steps_scale_the_rest():
    part = PartTiming(
        "c.yaml", max_steps=100, setup_s=6.0, steps_timed=10, steps_s=60.0, one_off_steps=2, one_off_s=36.0
    )
    assert part.projected_s == 6.0 + 36.0 + 3.0 * 98  # not 6 + 6.0 * 100
    assert "the first 2 compiling 36.0 s, then 3.00 s/step) -> 100 steps ≈ 5.6 min" in format_part(part)
    compiled = TrainConfig(data=(DataSource("synth:qa"),), compile=True)
    assert [one_off_steps(compiled, n) for n in (1, 2, 3, 10)] == [0, 0, 2, 2]  # some steady step is left
    assert one_off_steps(TrainConfig(data=(DataSource("synth:qa"),)), 10) == 0


def test_bad_arguments_are_one_line_errors_before_any_compute(recipes, tmp_path, capsys):
    assert main([str(recipes[0]), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1\n"
    assert main([str(recipes[0]), "--reference", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(recipes[0]), "--set", "batch_size=many"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "first-metrics.jsonl").write_text(json.dumps({"step": 10, "elapsed_s": 1.0}) + "\n")
    assert main([str(recipes[0]), "--steps", "3", "--reference", str(reference)]) == 2
    assert "has no row for step 3; use --steps 10" in capsys.readouterr().err
