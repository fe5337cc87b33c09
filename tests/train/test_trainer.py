"""The training loop end to end, on the tiny model through the real CLI: artifacts, stage 1 -> stage 2,
LoRA, kill -9 and `--resume` (exactly the uninterrupted run), torchrun DDP, and clear early errors.

The tiny model (random 64-px EfficientNet, 4 image tokens; a 2-layer 64-wide LLaMA with the SmolLM2
tokenizer) trains a step in well under a second; each CLI run costs a few seconds of start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image as PILImage
from safetensors.torch import load_file

from vlchat.config import ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.model.projector import Projector
from vlchat.train import distributed
from vlchat.train.checkpoint import latest_checkpoint, save_checkpoint
from vlchat.train.recipe import DataSource, TrainConfig, load_config
from vlchat.train.trainer import build_model, epoch_permutation, sample_indices

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # generous: a busy machine; an idle one needs a few seconds a run


# --- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny model as a model-config JSON: a recipe's `model:` value."""
    path = tmp_path_factory.mktemp("tiny-model") / "tiny.json"
    path.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    return path


def write_recipe(folder: Path, model_file: Path, name: str = "recipe.yaml", **fields) -> Path:
    """A tiny recipe: batches of 2 synthetic samples, metrics every step, output in folder/out."""
    recipe = {
        "stage": "stage2",
        "model": str(model_file),
        "data": [{"spec": "synth:qa", "samples": 32}],
        "batch_size": 2,
        "lr": 0.01,
        "warmup_steps": 2,
        "max_steps": 6,
        "log_every": 1,
        "save_every": 100,
        "output_dir": str(folder / "out"),
    }
    recipe.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli() -> list[str]:
    return [sys.executable, "-m", "vlchat.cli"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def vlchat(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli() + list(args),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT,
        cwd=REPO,
        env={**env(), **(extra_env or {})},
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def projector_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "projector.safetensors")


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.pt"))


def check_run(out: Path, stage: str, steps: int) -> None:
    """Every artifact of a finished run, consistent with each other."""
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert set(record) >= {"step", "loss", "lr", "samples_per_s", "elapsed_s"}
        assert 0 < record["loss"] < 100 and record["lr"] > 0
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with PILImage.open(out / "loss.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["final_loss"] == records[-1]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == stage and config["max_steps"] == steps
    stored = ProjectorConfig(**json.loads((out / "projector.json").read_text()))
    assert (stored.in_dim, stored.out_dim) == (1280, 64)
    weights = projector_weights(out)
    final = checkpoints(out)[-1]
    assert final.name == f"step-{steps:07d}.pt"
    state = torch.load(final, map_location="cpu", weights_only=False)
    assert state["step"] == steps and state["config"]["stage"] == stage
    for name, value in weights.items():  # the checkpoint holds the same (trained) projector
        assert torch.equal(state["trainable"][f"vlm.projector.{name}"], value), name


# --- data order ------------------------------------------------------------------------------------


def order(config: TrainConfig, world_size: int, steps: int, total: int) -> list[int]:
    """Indices in global order (step, micro-batch, rank) as the processes of a run see them."""
    out = []
    for step in range(steps):
        for micro in range(config.grad_accum):
            for rank in range(world_size):
                out += sample_indices(step, micro, config, distributed.World(rank, world_size), total)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_sample_once_per_epoch(world_size):
    total = 10
    config = TrainConfig(data=(DataSource("synth:qa", samples=total),), batch_size=2, grad_accum=2, seed=3)
    per_step = config.batch_size * config.grad_accum * world_size
    steps = 5 * total // per_step + 1
    seen = order(config, world_size, steps, total)
    epochs = [seen[i : i + total] for i in range(0, len(seen) - total + 1, total)]
    assert len(epochs) >= 4
    for epoch in epochs:
        assert sorted(epoch) == list(range(total))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert seen[:total] != list(range(total))


def test_data_order_is_a_function_of_seed_and_step():
    total = 12
    config = TrainConfig(data=(DataSource("synth:qa", samples=total),), batch_size=3, seed=5)
    world = distributed.World(0, 1)
    first = [sample_indices(step, 0, config, world, total) for step in range(9)]
    torch.manual_seed(1234)  # global RNG state, call order and cache do not matter
    epoch_permutation(99, 0, total)
    assert [sample_indices(step, 0, config, world, total) for step in reversed(range(9))][::-1] == first
    other = TrainConfig(data=config.data, batch_size=3, seed=6)
    assert [sample_indices(step, 0, other, world, total) for step in range(9)] != first


def test_same_global_batch_on_one_or_two_processes():
    """A run can resume on another number of processes that keeps the global batch."""
    total = 16
    data = (DataSource("synth:qa", samples=total),)
    one = TrainConfig(data=data, batch_size=4)
    two = TrainConfig(data=data, batch_size=2)
    for step in range(10):
        single = sample_indices(step, 0, one, distributed.World(0, 1), total)
        ranks = [sample_indices(step, 0, two, distributed.World(r, 2), total) for r in range(2)]
        assert ranks[0] + ranks[1] == single
        assert not set(ranks[0]) & set(ranks[1])


# --- checkpoints (in process) ----------------------------------------------------------------------


def test_latest_checkpoint_skips_damaged_and_temporary_files(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(folder, step, {"step": step}, keep=5)
    (folder / "step-0000006.pt").write_bytes(b"half a checkpoint")  # damaged
    (folder / "step-0000008.pt.tmp").write_bytes(b"killed while writing")
    assert latest_checkpoint(folder)["step"] == 4
    assert not list(folder.glob("*.tmp"))
    save_checkpoint(folder, 10, {"step": 10}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000006.pt", "step-0000010.pt"]
    assert latest_checkpoint(folder)["step"] == 10


# --- stage 1, then stage 2 from its projector ------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_model_file) -> Path:
    folder = tmp_path_factory.mktemp("stage1")
    recipe = write_recipe(
        folder, tiny_model_file, stage="stage1", save_every=3, data=[{"spec": "synth:caption", "samples": 32}]
    )
    result = vlchat("train", "stage1", "--config", str(recipe))
    assert_ok(result)
    assert result.stdout.strip().endswith(f"done: {folder / 'out'}")
    return folder / "out"


def test_stage1_run_writes_every_artifact(stage1_run):
    check_run(stage1_run, "stage1", 6)
    assert [p.name for p in checkpoints(stage1_run)] == ["step-0000003.pt", "step-0000006.pt"]
    assert not list((stage1_run / "checkpoints").glob("*.tmp"))


def test_stage2_starts_from_stage1_projector(stage1_run, tiny_model_file, tmp_path):
    """With a vanishing learning rate, stage 2 ends where stage 1's projector began it."""
    trained = projector_weights(stage1_run)
    with torch.random.fork_rng():  # what a fresh start would use (build_model seeds with config.seed)
        torch.manual_seed(0)
        fresh = Projector(ProjectorConfig(in_dim=1280, out_dim=64)).state_dict()
    assert max((trained[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-3  # stage 1 trained it
    recipe = write_recipe(tmp_path, tiny_model_file, init_projector=str(stage1_run / "projector"), lr=1e-9, max_steps=3)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    out = tmp_path / "out"
    check_run(out, "stage2", 3)
    final = projector_weights(out)
    assert final.keys() == trained.keys()
    for name in trained:
        assert torch.allclose(final[name], trained[name], rtol=0, atol=1e-6), name


def test_missing_init_projector_is_an_error(tiny_model_file, tmp_path):
    config = load_config(write_recipe(tmp_path, tiny_model_file, init_projector=str(tmp_path / "no-such-projector")))
    with pytest.raises(VlchatError, match="no-such-projector"):
        build_model(config, torch.device("cpu"))


def test_lora_run_writes_the_adapter(tiny_model_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_file, lm="lora", max_steps=3)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    out = tmp_path / "out"
    check_run(out, "stage2", 3)
    adapter = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert list((out / "lora").glob("adapter_model.*"))
    trained = torch.load(checkpoints(out)[-1], map_location="cpu", weights_only=False)["trainable"]
    assert any("lora_A" in name for name in trained) and any("lora_B" in name for name in trained)
    assert not any("embed_tokens" in name or name.endswith("q_proj.base_layer.weight") for name in trained)


def test_stage2_trains_on_from_an_adapter(tiny_model_file, tmp_path):
    """init_adapter starts LoRA from a run's adapter: with a vanishing learning rate the new run
    ends with the same adapter (a fresh one would start with lora_B at zero)."""
    first = write_recipe(
        tmp_path / "first", tiny_model_file, lm="lora", max_steps=3, lr=0.05, autocast="bf16"
    )  # the loop under CPU autocast, too
    assert_ok(vlchat("train", "stage2", "--config", str(first)))
    start = load_file(tmp_path / "first" / "out" / "lora" / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().max() > 1e-3 for name, tensor in start.items())
    second = write_recipe(
        tmp_path / "second",
        tiny_model_file,
        lm="lora",
        max_steps=2,
        lr=1e-9,
        init_adapter=str(tmp_path / "first" / "out" / "lora"),
    )
    assert_ok(vlchat("train", "stage2", "--config", str(second)))
    check_run(tmp_path / "second" / "out", "stage2", 2)
    end = load_file(tmp_path / "second" / "out" / "lora" / "adapter_model.safetensors")
    assert end.keys() == start.keys()
    for name in start:
        assert torch.allclose(end[name], start[name], rtol=0, atol=1e-6), name


def test_compiled_layers_train_the_same_run(tiny_model_file, tmp_path):
    """`compile: true` (torch.compile on each decoder layer) computes the same training: the same
    losses at each step (each after the previous steps' updates, so forward and gradients both
    count) and the same held-out probe (no_grad through the compiled layers), under the same
    parameter names (checkpoints and adapters of compiled and eager runs are interchangeable).
    The weights themselves are not compared entry by entry: Adam's early steps
    move an entry by about the learning rate whatever its gradient's size, so rounding-sized
    gradient differences flip whole steps of tiny entries (README, Training: compiled layers)."""
    fields = dict(lm="lora", max_steps=3, lr=0.05, save_every=3, probe_every=2, probe_scenes=2)
    eager = write_recipe(tmp_path / "eager", tiny_model_file, **fields)
    compiled = write_recipe(tmp_path / "compiled", tiny_model_file, compile=True, **fields)
    for recipe in (eager, compiled):
        assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    runs = [tmp_path / name / "out" for name in ("eager", "compiled")]
    check_run(runs[1], "stage2", 3)
    losses = [[record["loss"] for record in metrics(out)] for out in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    probed = [[record["probe_loss"] for record in metrics(out) if "probe_loss" in record] for out in runs]
    assert len(probed[0]) == 1 and probed[1][0] == pytest.approx(probed[0][0], rel=1e-3)
    states = [torch.load(checkpoints(out)[-1], map_location="cpu", weights_only=False)["trainable"] for out in runs]
    assert states[1].keys() == states[0].keys() and not any("_orig_mod" in name for name in states[1])
    adapters = [load_file(out / "lora" / "adapter_model.safetensors") for out in runs]
    assert adapters[1].keys() == adapters[0].keys()


def test_compile_must_be_a_boolean():
    with pytest.raises(VlchatError, match="compile must be true or false"):
        TrainConfig(data=(DataSource("synth:qa", samples=4),), compile="yes")


def test_init_adapter_needs_lora():
    with pytest.raises(VlchatError, match="init_adapter needs lm: lora"):
        TrainConfig(data=(DataSource("synth:qa", samples=4),), lm="frozen", init_adapter="runs/x/lora")


# --- kill -9 and --resume ---------------------------------------------------------------------------


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_model_file, tmp_path):
    fields = dict(max_steps=12, save_every=2, keep_checkpoints=3)
    reference = write_recipe(tmp_path / "reference", tiny_model_file, **fields)
    assert_ok(vlchat("train", "stage2", "--config", str(reference)))
    recipe = write_recipe(tmp_path / "killed", tiny_model_file, **fields)
    out = tmp_path / "killed" / "out"

    log = tmp_path / "killed" / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            cli() + ["train", "stage2", "--config", str(recipe)],
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not any(int(p.stem[5:]) >= 4 for p in checkpoints(out)) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint at step 4"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for this test?)")
    assert process.returncode == -signal.SIGKILL, log.read_text()[-4000:]
    left = checkpoints(out)
    assert left, "no checkpoint survived"
    for path in left:  # written atomically: whatever is there loads
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["step"] == int(path.stem[5:])
    killed_at = int(left[-1].stem[5:])
    assert 4 <= killed_at < 12
    print(f"killed after the checkpoint at step {killed_at}")
    (out / "checkpoints" / "step-0000099.pt.tmp").write_bytes(b"a write cut short")  # not a checkpoint

    result = vlchat("train", "stage2", "--config", str(recipe), "--resume")
    assert_ok(result)
    assert f"resuming from step {killed_at}" in result.stderr
    assert not list((out / "checkpoints").glob("*.tmp"))
    check_run(out, "stage2", 12)  # metrics: each step exactly once
    expected = tmp_path / "reference" / "out"
    after = [r["loss"] for r in metrics(out)][killed_at:]
    assert after == [r["loss"] for r in metrics(expected)][killed_at:]  # same data, same weights
    final, wanted = projector_weights(out), projector_weights(expected)
    for name in wanted:
        assert torch.allclose(final[name], wanted[name], rtol=0, atol=1e-6), name


def test_resume_refuses_another_recipe_and_a_finished_run_resumes_to_itself(tiny_model_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_file, max_steps=4, save_every=2)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    out = tmp_path / "out"
    trained, newest = projector_weights(out), checkpoints(out)[-1].read_bytes()

    changed = vlchat("train", "stage2", "--config", str(recipe), "--resume", "lr=0.02", "max_steps=6")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-4000:]
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds step 4 of another recipe" in errors[0], changed.stderr
    assert "lr 0.01 -> 0.02" in errors[0] and "max_steps 4 -> 6" in errors[0]
    assert checkpoints(out)[-1].read_bytes() == newest  # refused before anything was written

    # how often it logs may change; a finished run resumes to the same weights (make train-default re-runs)
    again = vlchat("train", "stage2", "--config", str(recipe), "--resume", "log_every=2")
    assert_ok(again)
    assert "resuming from step 4" in again.stderr
    check_run(out, "stage2", 4)
    for name, value in projector_weights(out).items():
        assert torch.equal(value, trained[name]), name


# --- shared-prefix packing ------------------------------------------------------------------------


def test_an_unpacked_run_resumed_packed_trains_the_same_steps(tiny_model_file, tmp_path):
    """Tool-use samples (the same system prompt in front of each) packed by shared prefix train the
    same run: a run resumed packed after step 2 gets the same losses at steps 3 and 4 (each after
    the previous steps' updates) and the same projector as the run unpacked throughout, through
    fewer LM tokens. Switching packing on is no other recipe for --resume."""
    tools = [{"spec": "tools:labels", "samples": 8}, {"spec": "tools:python", "samples": 8}]
    fields = dict(lm="lora", batch_size=4, max_tokens=1600, length_groups=4, max_steps=4, save_every=2)
    recipe = write_recipe(tmp_path, tiny_model_file, data=tools, pack_min_prefix=32, **fields)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    out = tmp_path / "out"
    plain, plain_weights = metrics(out), projector_weights(out)

    checkpoints(out)[-1].unlink()  # as if the run had stopped after step 2
    result = vlchat("train", "stage2", "--config", str(recipe), "--resume", "pack_shared_prefix=true")
    assert_ok(result)
    assert "resuming from step 2" in result.stderr
    packed = metrics(out)
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    assert all(p["tokens"] < r["tokens"] for p, r in zip(packed[2:], plain[2:]))
    assert [p["tokens"] for p in packed[:2]] == [r["tokens"] for r in plain[:2]]
    for name, value in projector_weights(out).items():
        assert torch.allclose(value, plain_weights[name], rtol=1e-3, atol=1e-5), name


def test_a_frozen_lm_trains_past_a_group_without_images(tiny_model_file, tmp_path):
    """With the LM frozen only the projector trains, and a length group of text-only samples (tool
    use: arithmetic -> python) has no loss gradient: it contributes nothing and the run goes on
    (it crashed in backward: "element 0 of tensors does not require grad")."""
    data = [{"spec": "tools:python", "samples": 4}, {"spec": "synth:qa", "samples": 4}]
    recipe = write_recipe(
        tmp_path, tiny_model_file, data=data, lm="frozen", batch_size=4, max_tokens=1600, length_groups=4, max_steps=2
    )
    result = vlchat("train", "stage2", "--config", str(recipe))
    assert_ok(result)
    check_run(tmp_path / "out", "stage2", 2)


def test_packing_settings_are_checked():
    data = (DataSource("synth:qa", samples=4),)
    with pytest.raises(VlchatError, match="pack_shared_prefix must be true or false"):
        TrainConfig(data=data, pack_shared_prefix="yes")
    with pytest.raises(VlchatError, match=r"pack_max_tokens \(1000\) must be >= max_tokens \(1600\)"):
        TrainConfig(data=data, pack_shared_prefix=True, max_tokens=1600, pack_max_tokens=1000)
    TrainConfig(data=data, max_tokens=8000)  # the cap matters only when packing


# --- torchrun (DDP, gloo on CPU) ----------------------------------------------------------------------


def test_torchrun_two_processes(tiny_model_file, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_file, max_steps=4, save_every=2)
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vlchat.cli",
        "train",
        "stage2",
        "--config",
        str(recipe),
        f"output_dir={out}",
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO, env=env())  # a hang
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Traceback" not in result.stderr
    print(f"torchrun run: {time.monotonic() - started:.1f} s")
    check_run(out, "stage2", 4)
    assert [p.name for p in checkpoints(out)] == ["step-0000002.pt", "step-0000004.pt"]
    assert result.stdout.count("done:") == 2  # both ranks finished
    assert not (tmp_path / "out").exists()  # the override was honoured


# --- clear errors before any compute ------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "missing data file",
        "unknown model",
        "bad yaml",
        "missing adapter",
        "adapter of another shape",
        "compile without a C++ compiler",
    ],
)
def test_clear_error_before_compute(case, tiny_model_file, tmp_path):
    extra_env = None
    if case == "compile without a C++ compiler":
        recipe = write_recipe(tmp_path, tiny_model_file, compile=True)
        extra_env = {"CXX": "no-such-c++"}
        words = ["compile: true needs a C++ compiler", "'no-such-c++'", "compile: false"]
    elif case == "missing adapter":
        recipe = write_recipe(tmp_path, tiny_model_file, lm="lora", init_adapter=str(tmp_path / "no-lora"))
        words = ["init_adapter", "no-lora", "adapter_config.json"]
    elif case == "adapter of another shape":
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / "adapter_config.json").write_text(
            json.dumps({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
        )
        recipe = write_recipe(tmp_path, tiny_model_file, lm="lora", init_adapter=str(tmp_path / "lora"))
        words = ["init_adapter", "'r': 4", "'r': 16"]
    elif case == "missing data file":
        recipe = write_recipe(tmp_path, tiny_model_file, data=[{"spec": "/no/such.json"}])
        words = ["dataset not found", "/no/such.json"]
    elif case == "unknown model":
        recipe = write_recipe(tmp_path, tiny_model_file, model="no-such-model")
        words = ["unknown model 'no-such-model'", "default"]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"stage: stage2\nmodel: {tiny_model_file}\ndata: [{{spec: synth:qa\n")
        words = ["cannot read training config", str(recipe)]
    result = vlchat("train", "stage2", "--config", str(recipe), f"output_dir={tmp_path / 'out'}", extra_env=extra_env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # nothing was written: it stopped before training


def test_a_trained_lora_adapter_is_attached_at_load_and_on_only_for_image_sequences(
    tiny_lm_dir, tiny_model_file, tmp_path
):
    from dataclasses import replace

    from peft import PeftModel

    from vlchat.model.language import LMState
    from vlchat.model.vlm import load_model

    recipe = write_recipe(tmp_path, tiny_model_file, lm="lora", max_steps=3, lr=0.05)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    base = tiny_config(tiny_lm_dir)
    adapted = replace(base, lm=replace(base.lm, adapter=str(tmp_path / "out" / "lora")))
    plain, gated = load_model(base).lm, load_model(adapted).lm
    ids = torch.tensor([[5, 6, 7, 8]])
    with_image = LMState(adapter=True)  # a sequence with an image: the adapter is on
    # text-only sequences run the base LM exactly; image sequences the adapted one
    torch.testing.assert_close(gated.prefill(gated.embed(ids))[0], plain.prefill(plain.embed(ids))[0])
    adapted_logits = gated.prefill(gated.embed(ids), with_image)[0]
    assert not torch.allclose(plain.prefill(plain.embed(ids))[0], adapted_logits)
    reference = PeftModel.from_pretrained(load_model(base).lm.model, str(tmp_path / "out" / "lora"))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[:, -1].float()
    torch.testing.assert_close(adapted_logits, expected, atol=1e-4, rtol=1e-4)
    missing = replace(base, lm=replace(base.lm, adapter=str(tmp_path / "nothing")))
    with pytest.raises(VlchatError, match="LoRA adapter"):
        load_model(missing)


def test_export_ships_the_run_in_bfloat16_and_it_loads(tiny_lm_dir, tiny_model_file, tmp_path):
    """`make train-default`'s export: half-size bfloat16 files that load and answer like the run."""
    from dataclasses import replace

    from vlchat.model.vlm import load_model

    recipe = write_recipe(tmp_path, tiny_model_file, lm="lora", max_steps=3, lr=0.05)
    assert_ok(vlchat("train", "stage2", "--config", str(recipe)))
    out, shipped = tmp_path / "out", tmp_path / "weights"
    result = subprocess.run(
        [sys.executable, "-m", "vlchat.train.export", str(out), str(shipped)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    exported = load_file(shipped / "default-projector.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert set(exported) == set(projector_weights(out))
    adapter = load_file(shipped / "default-lora" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    base = replace(tiny_config(tiny_lm_dir), lm=replace(tiny_config(tiny_lm_dir).lm, dtype="float32"))
    run = replace(base, projector_weights=str(out / "projector"), lm=replace(base.lm, adapter=str(out / "lora")))
    ship = replace(
        base,
        projector_weights=str(shipped / "default-projector"),
        lm=replace(base.lm, adapter=str(shipped / "default-lora")),
    )
    image = PILImage.new("RGB", (64, 64), (200, 30, 30))
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = []
    for config in (run, ship):
        vlm = load_model(config)
        with torch.no_grad():
            images = vlm.encode_images(vlm.pixels(image).unsqueeze(0))
            logits.append(vlm.lm.prefill(torch.cat([images, vlm.lm.embed(ids)], dim=1))[0])
    torch.testing.assert_close(logits[0], logits[1], atol=0.05, rtol=0.02)  # bfloat16 keeps ~3 digits
    missing = subprocess.run(
        [sys.executable, "-m", "vlchat.train.export", str(tmp_path / "none"), str(shipped)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=TIMEOUT,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr


def test_training_attention_is_eager_on_cpu_unless_asked(tiny_model_file, tmp_path):
    """CPU training uses the eager kernel (1.4x faster steps here); the loaded model stays sdpa."""
    data = (DataSource("synth:qa", samples=4),)
    for asked, expected in (("auto", "eager"), ("sdpa", "sdpa"), ("eager", "eager")):
        config = load_config(write_recipe(tmp_path, tiny_model_file, attention=asked))
        vlm = build_model(config, torch.device("cpu"))
        assert vlm.lm.model.config._attn_implementation == expected
    with pytest.raises(VlchatError, match="attention must be auto, eager or sdpa"):
        TrainConfig(stage="stage2", data=data, attention="flash")


def test_the_recipes_projector_is_the_one_trained(tiny_model_file, tmp_path):
    """`projector:` fields over the model's projector reach the trained projector; dims the model's."""
    recipe = write_recipe(tmp_path, tiny_model_file, projector={"kind": "mlp2x_gelu", "position_tokens": 4})
    config = load_config(recipe, ["projector.position_code=50"])
    vlm = build_model(config, torch.device("cpu"))
    assert vlm.projector.config == ProjectorConfig(
        kind="mlp2x_gelu", in_dim=1280, out_dim=64, position_tokens=4, position_code=50.0
    )
    assert vlm.projector.grid_code.shape == (4, 4) and vlm.projector.grid_code.max() == 50.0
    assert vlm.projector.position.requires_grad and vlm.projector.training
    # A projector of other dims than the model's (only possible from Python) is refused in one line.
    with pytest.raises(VlchatError, match="projector dims 1472->576 do not fit vision 1280 -> LM 64"):
        build_model(TrainConfig(model=str(tiny_model_file), data=config.data), torch.device("cpu"))
