"""Training recipes: every shipped config loads; overrides apply; each mistake is one clear VlchatError."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vlchat.config import ModelConfig, ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.train import stage1
from vlchat.train.recipe import DataSource, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
YAML_CONFIGS = sorted(p for pattern in ("*.yaml", "*.yml") for p in (REPO / "configs").glob(f"**/{pattern}"))
JSON_CONFIGS = sorted((REPO / "configs").glob("**/*.json"))


def recipe(tmp_path: Path, name: str = "recipe.yaml", **fields) -> Path:
    data = {"stage": "stage2", "data": [{"spec": "synth:qa", "samples": 32}], "max_steps": 20}
    data.update(fields)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- the shipped configs (house rule: every config is loaded by a test) --------------------------


def test_configs_exist():
    assert YAML_CONFIGS, "no YAML recipes under configs/"


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.stage in ("stage1", "stage2") and config.data
    assert load_config(path, stage=config.stage) == config  # and under its own `vlchat train` command


def test_every_json_config_parses():
    for path in JSON_CONFIGS:  # none may be there
        assert isinstance(json.loads(path.read_text()), dict), path


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_apply(tmp_path):
    path = recipe(tmp_path, init_projector="runs/stage1/projector")
    config = load_config(
        path,
        [
            "max_steps=3",
            "data.0.samples=10",
            "lr=1e-4",
            "init_projector=null",
            "lora_targets=[q_proj, k_proj]",
            "output_dir=runs/x",
            "data.0.lang=both",
        ],
    )
    assert config.max_steps == 3
    assert config.data == (DataSource("synth:qa", samples=10, lang="both"),)
    assert config.lr == pytest.approx(1e-4) and isinstance(config.lr, float)
    assert config.init_projector is None
    assert config.lora_targets == ("q_proj", "k_proj")
    assert config.output_dir == "runs/x"
    assert load_config(path).max_steps == 20  # the file itself is untouched


def test_float_fields_written_without_a_dot(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; the recipe still means a number."""
    path = tmp_path / "r.yaml"
    path.write_text("stage: stage2\nlr: 1e-4\nweight_decay: 1e-2\ndata: [{spec: 'synth:qa', samples: 4}]\n")
    config = load_config(path)
    assert config.lr == pytest.approx(1e-4) and config.weight_decay == pytest.approx(1e-2)


def test_plain_string_data_source(tmp_path):
    path = recipe(tmp_path, data=["synth:caption"])
    assert load_config(path).data == (DataSource("synth:caption"),)
    path = recipe(tmp_path, data="synth:caption")  # one source, no list: not 13 one-letter sources
    assert load_config(path).data == (DataSource("synth:caption"),)
    path = recipe(tmp_path, data={"spec": "synth:qa", "samples": 4})
    assert load_config(path).data == (DataSource("synth:qa", samples=4),)


# --- errors: VlchatError with a message that says what is wrong ----------------------------------


@pytest.mark.parametrize(
    "fields, overrides, match",
    [
        ({"learning_rate": 0.1}, [], r"unknown training config keys: learning_rate"),
        ({"stage": "stage3"}, [], r"stage must be one of"),
        ({"data": []}, [], r"data: give at least one data source"),
        ({"lm": "qlora"}, [], r"lm must be frozen, lora or full, got 'qlora'"),
        ({"lr": 0}, [], r"lr must be > 0"),
        ({"projector": {"position_tokens": 0}}, [], r"position_code needs a square token grid"),
        ({"projector": {"position_code": -1}}, [], r"projector position_code must be a number >= 0"),
        ({"projector": {"size": 3}}, [], r"unknown projector key 'size'; a recipe may set kind, position_tokens"),
        ({"projector": [1, 2]}, [], r"projector must be a mapping of kind, position_tokens, position_code"),
        ({}, ["projector.in_dim=1280"], r"projector in_dim comes from the model \(model default: 1472 -> 576\)"),
        ({"projector": {"out_dim": 64}}, [], r"projector out_dim comes from the model"),
        ({"model": "no-such-model"}, [], r"unknown model 'no-such-model'"),
        ({"model": 5}, [], r"model must be a preset name or a model config file, got 5"),
        ({"lr": "fast"}, [], r"recipe.yaml: .*fast"),
        ({"batch_size": 0}, [], r"batch_size and grad_accum must be >= 1"),
        ({"data": [{"spec": "synth:qa", "sample": 3}]}, [], r"recipe.yaml: .*sample"),
        ({}, ["max_steps"], r"override 'max_steps' must look like key=value"),
        ({}, ["data.3.samples=10"], r"override 'data.3.samples=10' does not fit"),
        ({}, ["max_steps.x=1"], r"override 'max_steps.x=1' does not fit"),
        ({}, ["warmup=5"], r"unknown training config keys: warmup"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, fields, overrides, match):
    with pytest.raises(VlchatError, match=match) as info:
        load_config(recipe(tmp_path, **fields), overrides)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(VlchatError, match=r"cannot read training config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: stage2\ndata: [unclosed\n")
    with pytest.raises(VlchatError, match=r"cannot read training config .*bad.yaml"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- stage2\n")
    with pytest.raises(VlchatError, match=r"must be a YAML mapping"):
        load_config(listing)


def test_stage_mismatch(tmp_path):
    path = recipe(tmp_path)  # a stage2 recipe
    with pytest.raises(VlchatError, match=r"is a stage2 recipe; run it with `vlchat train stage2`"):
        load_config(path, stage="stage1")
    assert load_config(path, stage="stage2").stage == "stage2"
    with pytest.raises(VlchatError, match=r"is a stage2 recipe"):
        load_config(path, ["max_steps=3"], stage="stage1")


def test_stage_defaults_to_the_command(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: [{spec: 'synth:caption', samples: 4}]\n")
    assert load_config(path, stage="stage2").stage == "stage2"
    assert load_config(path, stage="stage1").stage == "stage1"


def test_stage1_refuses_lora(tmp_path):
    path = recipe(tmp_path, stage="stage1", lm="lora")
    with pytest.raises(VlchatError, match=r"stage 1 trains the projector only"):
        stage1.run(path)


def test_cli_stage_mismatch_is_one_error_line(tmp_path):
    path = recipe(tmp_path)
    script = Path(sys.executable).with_name("vlchat")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlchat.cli"]
    result = subprocess.run(
        command + ["train", "stage1", "--config", str(path)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path} is a stage2 recipe; run it with `vlchat train stage2`"
    ]


def test_independent_turns_reach_the_collator_from_the_recipe():
    """The data source's key marks its samples; other sources' samples stay ordinary conversations."""
    from vlchat.train.datasets import build_samples

    samples = build_samples(
        [
            DataSource("synth:qa", samples=2, turns=3, independent_turns=True),
            DataSource("synth:qa", samples=2, turns=3, seed_offset=10),
        ]
    )
    assert [bool(samples[i].meta.get("independent_turns")) for i in range(4)] == [True, True, False, False]
    assert load_config(REPO / "configs/train/stage2.yaml").data[0].independent_turns


def test_repeat_lists_a_source_several_times_and_refuses_less_than_once():
    from vlchat.train.datasets import build_samples

    samples = build_samples(
        [DataSource("synth:qa", samples=2), DataSource("synth:qa", samples=3, repeat=2, seed_offset=10)]
    )
    assert len(samples) == 2 + 3 * 2
    assert [samples[i].source for i in range(2, 8)] == [samples[i].source for i in (2, 3, 4)] * 2
    with pytest.raises(VlchatError, match="repeat must be at least 1"):
        build_samples([DataSource("synth:qa", samples=2, repeat=0)])


def test_qtypes_reach_the_synthetic_source_and_refuse_other_sources(tmp_path):
    from vlchat.train.datasets import build_samples

    path = tmp_path / "recipe.yaml"
    path.write_text("stage: stage2\ndata:\n  - {spec: 'synth:qa', samples: 4, turns: 3, qtypes: [exists]}\n")
    source = load_config(path).data[0]
    assert source.qtypes == ("exists",)
    assert all(s.meta["qtypes"] == ["exists"] * 3 for s in build_samples([source]))
    for refused, message in (
        (DataSource("easy_vqa:train", samples=2, qtypes=("exists",)), "synth:qa sources only"),
        (DataSource("synth:caption", samples=2, qtypes=("exists",)), "synth:qa sources only"),
        (DataSource("synth:qa", samples=2, qtypes=("smell",)), "unknown question types"),
    ):
        with pytest.raises(VlchatError, match=message):
            build_samples([refused])


def test_max_objects_reaches_synthetic_sources_and_refuses_other_sources(tmp_path):
    from vlchat.train.datasets import build_samples

    path = tmp_path / "recipe.yaml"
    path.write_text("stage: stage1\ndata:\n  - {spec: 'synth:caption', samples: 6, max_objects: 1}\n")
    source = load_config(path).data[0]
    assert source.max_objects == 1
    assert all(len(s.meta["scene"].objects) == 1 for s in build_samples([source]))
    assert {len(s.meta["scene"].objects) for s in build_samples([DataSource("synth:qa", samples=20)])} == {1, 2, 3, 4}
    for refused, message in (
        (DataSource("easy_vqa:train", samples=2, max_objects=1), "synth sources only"),
        (DataSource("synth:qa", samples=2, max_objects=0), "max_objects must be 1 to 4"),
        (DataSource("synth:caption", samples=2, max_objects=5), "max_objects must be 1 to 4"),
    ):
        with pytest.raises(VlchatError, match=message):
            build_samples([refused])


def test_yes_no_options_reach_the_easy_vqa_reader_and_refuse_other_sources():
    from vlchat.train.datasets import build_samples

    plain = build_samples([DataSource("easy_vqa:train", samples=20, turns=6)])
    balanced = build_samples([DataSource("easy_vqa:train", samples=20, turns=6, balance_yes_no=True)])
    assert [s.meta["answers"] for s in plain] != [s.meta["answers"] for s in balanced]
    assert [s.meta["image_id"] for s in plain] == [s.meta["image_id"] for s in balanced]
    with pytest.raises(VlchatError, match="balance_yes_no applies to easy_vqa sources only"):
        build_samples([DataSource("synth:qa", samples=2, balance_yes_no=True)])
    for refused in (
        DataSource("synth:qa", samples=2, lang="zh", explain_yes_no=True),
        DataSource("synth:caption", samples=2, explain_yes_no=True),
    ):
        with pytest.raises(VlchatError, match="explain_yes_no applies to easy_vqa and English synth:qa"):
            build_samples([refused])
    synthetic = build_samples([DataSource("synth:qa", samples=20, turns=6, explain_yes_no=True)])
    assert any(a.endswith(", so yes.") for s in synthetic for a in s.meta["answers"])
    explained = build_samples([DataSource("easy_vqa:train", samples=20, turns=6, explain_yes_no=True)])
    assert any(a.endswith(", so no.") for s in explained for a in s.meta["answers"])
    easy = [d for d in load_config(REPO / "configs/train/stage2.yaml").data if d.spec.startswith("easy_vqa")]
    assert easy and all(d.balance_yes_no and not d.explain_yes_no for d in easy)
    reasons = load_config(REPO / "configs/train/stage2-reasons.yaml").data
    assert [d.explain_yes_no for d in reasons if d.spec.startswith("easy_vqa")] == [True]


def test_recipes_that_start_from_stage1_build_its_projector():
    """A projector loads only into the same projector config (load_projector), so the recipes that
    train on from stage1.yaml's run build the projector it trained: the default preset's, so that
    the exported weights load by default."""
    first = load_config(REPO / "configs/train/stage1.yaml")
    chained = [load_config(REPO / f"configs/train/{name}.yaml") for name in ("stage2", "stage2-reasons")]
    assert chained[0].init_projector == f"{first.output_dir}/projector"
    assert chained[1].init_projector == f"{chained[0].output_dir}/projector"
    assert all(config.projector == first.projector for config in chained)
    assert first.projector == ModelConfig.from_name("default").projector


# --- the projector: the model's, with the recipe's fields over it ------------------------------------


def test_projector_defaults_are_the_default_presets():
    preset = ModelConfig.from_name("default").projector
    assert TrainConfig(data=(DataSource("synth:qa"),)).projector == preset
    assert (preset.kind, preset.position_tokens, preset.position_code) == ("mlp2x_gelu", 49, 50.0)


def test_a_recipe_without_projector_trains_the_models_projector(tmp_path):
    assert load_config(recipe(tmp_path)).projector == ModelConfig.from_name("default").projector
    tiny = tmp_path / "tiny.json"  # another model: its own projector, dims included
    projector = ProjectorConfig(kind="linear", in_dim=1280, out_dim=64)
    tiny.write_text(json.dumps(replace(ModelConfig(), projector=projector).to_dict()))
    assert load_config(recipe(tmp_path, model=str(tiny))).projector == projector
    assert load_config(recipe(tmp_path), [f"model={tiny}"]).projector == projector  # the model chosen last


def test_projector_fields_override_the_models(tmp_path):
    preset = ModelConfig.from_name("default").projector
    config = load_config(recipe(tmp_path, projector={"kind": "linear"}))
    assert config.projector == replace(preset, kind="linear")  # the rest (grid, code, dims) stays the model's
    config = load_config(recipe(tmp_path, projector={"position_tokens": 49, "position_code": 0}))
    assert config.projector == replace(preset, position_code=0.0)
    assert load_config(recipe(tmp_path, projector="linear")).projector == replace(preset, kind="linear")  # shorthand
    assert load_config(recipe(tmp_path, projector=None)).projector == preset


def test_projector_fields_override_on_the_command_line(tmp_path):
    preset = ModelConfig.from_name("default").projector
    path = recipe(tmp_path, projector={"kind": "linear"})
    config = load_config(path, ["projector.position_code=0", "projector.position_tokens=0"])
    assert config.projector == replace(preset, kind="linear", position_tokens=0, position_code=0.0)
    assert load_config(recipe(tmp_path), ["projector.kind=linear"]).projector == replace(preset, kind="linear")
    shorthand = recipe(tmp_path, projector="linear")  # a dotted override applies over the shorthand too
    assert load_config(shorthand, ["projector.position_code=0"]).projector == replace(
        preset, kind="linear", position_code=0.0
    )
    assert load_config(path, ["projector=mlp2x_gelu"]).projector == preset  # the whole mapping replaced


@pytest.mark.parametrize(
    "fields, replacement",
    [
        ({"position_tokens": 49}, r"position_tokens is now projector: \{position_tokens: N\}"),
        ({"projector_position_code": 50}, r"projector_position_code is now projector: \{position_code: X\}"),
        ({"projector_output_rms": 0.133}, r"projector_output_rms was removed \(.*did not help\); delete it"),
        ({"projector_output_rms": 0.0}, r"projector_output_rms was removed"),
        ({"loss_weighting": "answer"}, r"loss_weighting was removed \(.*\); delete it"),
        ({"loss_weighting": "token"}, r"loss_weighting was removed"),
        ({"projector": {"output_rms": 0.133}}, r"projector output_rms was removed .*; delete it"),
    ],
)
def test_old_and_removed_keys_name_what_to_write_instead(tmp_path, fields, replacement):
    with pytest.raises(VlchatError, match=replacement) as info:
        load_config(recipe(tmp_path, **fields))
    assert "\n" not in str(info.value) and str(info.value).startswith(str(tmp_path))
    key, value = next(iter(fields.items()))
    if key != "projector":  # the same on the command line
        with pytest.raises(VlchatError, match=replacement):
            load_config(recipe(tmp_path), [f"{key}={value}"])


def test_lora_defaults_are_the_shipped_adapters():
    adapter = json.loads((REPO / "vlchat/weights/default-lora/adapter_config.json").read_text())
    config = TrainConfig(data=(DataSource("synth:qa"),))
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (
        adapter["r"],
        adapter["lora_alpha"],
        adapter["lora_dropout"],
    )
    assert sorted(config.lora_targets) == sorted(adapter["target_modules"])


def test_the_default_models_second_part_trains_on_from_stage2():
    """`make train-default` chains stage2.yaml into stage2-reasons.yaml through its output folder."""
    first = load_config(REPO / "configs/train/stage2.yaml")
    second = load_config(REPO / "configs/train/stage2-reasons.yaml")
    assert second.init_projector == f"{first.output_dir}/projector"
    assert second.init_adapter == f"{first.output_dir}/lora"
    assert (second.lora_r, second.lora_alpha, second.lora_targets) == (
        first.lora_r,
        first.lora_alpha,
        first.lora_targets,
    )
    easy = [d for d in second.data if d.spec.startswith("easy_vqa")]
    assert easy and all(d.explain_yes_no and d.balance_yes_no for d in easy)
    target = (REPO / "Makefile").read_text().split("\ntrain-default:", 1)[1].split("\n\n", 1)[0]
    parts = [line.split() for line in target.splitlines() if " train stage" in line]
    assert [part[4] for part in parts] == [
        "configs/train/stage1.yaml",
        "configs/train/stage2.yaml",
        "configs/train/stage2-reasons.yaml",
    ]
    assert all(part[-1] == "--resume" for part in parts)  # an interrupted chain continues


def test_the_removed_deepspeed_key_is_refused_with_what_to_do(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: stage2\ndata: [synth:qa]\ndeepspeed: configs/deepspeed/zero2.json\n")
    with pytest.raises(VlchatError, match="deepspeed was removed .* use torchrun"):
        load_config(recipe)
