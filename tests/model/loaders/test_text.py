"""Any Hugging Face causal LM directory as a text-only model with its own chat template; --model DIR
on the CLI; `vlchat models`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_tiny import CHATML_DEFAULT_SYSTEM_TEMPLATE, photo, save_tiny_causal_lm
from vlchat.chat.engine import Chat
from vlchat.chat.template_lookup import get_template
from vlchat.config import GenerationConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import load_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "tiny-chat-lm"
    save_tiny_causal_lm(out)
    return out


@pytest.fixture(scope="module")
def text_model(lm_dir):
    config = model_config(str(lm_dir))
    return load_model(replace(config, lm=replace(config.lm, dtype="float32")))


def test_config_is_text_only_with_the_checkpoints_template(lm_dir):
    config = model_config(str(lm_dir))
    assert config.vision is None and config.projector is None and config.template == f"hf:{lm_dir.resolve()}"
    template = get_template(config.template)
    assert (template.user_prefix, template.assistant_prefix) == ("<|im_start|>user\n", "<|im_start|>assistant\n")
    assert (template.assistant_end, template.assistant_tail, template.default_system) == ("<|im_end|>", "\n", "")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_prompt_ids_equal_the_tokenizers_chat_template(text_model):
    session = Chat(text_model).session(system="Be brief.")
    session.ask("Hello! How are you today?")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"}]
    tokenizer = text_model.lm.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert session.position_keys(session.conversation()) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generation_matches_transformers_greedy(text_model, lm_dir):
    from transformers import AutoModelForCausalLM

    session = Chat(text_model).session(generation=GenerationConfig(max_new_tokens=8))
    session.ask("What colour is the sky?")
    ids = session.position_keys(session.conversation())
    session.answer()
    reference = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    eos = text_model.lm.tokenizer.eos_token_id
    assert list(session.messages[-1].token_ids) == (out[: out.index(eos)] if eos in out else out)


def test_a_text_only_model_refuses_images(text_model):
    session = Chat(text_model).session()
    with pytest.raises(VlchatError, match="text-only: it cannot take images"):
        session.upload_img(photo())


def test_a_default_system_prompt_is_read_from_the_template(tmp_path):
    save_tiny_causal_lm(tmp_path / "qwenish", CHATML_DEFAULT_SYSTEM_TEMPLATE)
    template = get_template(model_config(str(tmp_path / "qwenish")).template)
    assert template.default_system == "You are a tiny test model."
    assert template.system_prefix == "<|im_start|>system\n"


def test_missing_lm_weights_fail_with_one_line(lm_dir, tmp_path):
    import shutil

    copy = tmp_path / "broken-lm"
    shutil.copytree(lm_dir, copy)
    state = load_file(copy / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VlchatError, match="missing keys such as 'model.layers.1.mlp.up_proj.weight'") as error:
        load_model(model_config(str(copy)))
    assert "\n" not in str(error.value)


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "VLCHAT_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "vlchat.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def test_cli_ask_takes_a_model_directory_and_models_lists_it(lm_dir, tmp_path):
    import shutil

    shutil.copytree(lm_dir, tmp_path / "models" / "tiny-chat")
    result = run_cli("ask", "Hello!", "--model", "tiny-chat", "--max-new-tokens", "3", "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["answer"] is not None
    listed = run_cli("models", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["default", "preset"]
    assert any(line.split()[:2] == ["tiny-chat", "local"] and "KB" in line for line in lines)


@pytest.mark.parametrize("command", ["ask", "chat", "serve", "eval"])
def test_cli_refuses_an_unknown_model_with_exit_2(tmp_path, command):
    args = [command, "hi"] if command == "ask" else [command]
    result = run_cli(*args, "--model", str(tmp_path / "no-such-model"), home=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "unknown model" in result.stderr


# --- a checkpoint with its own modeling code (auto_map) ---------------------------------------------

OWN_CODE = """import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["TINY_OWN_MARKER"]).write_text("the checkpoint's code ran")


class TinyOwnConfig(LlamaConfig):
    model_type = "tiny_own"


class TinyOwnForCausalLM(LlamaForCausalLM):
    config_class = TinyOwnConfig
"""


@pytest.fixture
def own_code_dir(lm_dir, tmp_path) -> Path:
    """The tiny LM as a checkpoint whose model class is its own code (a model type transformers does not know)."""
    import shutil

    out = tmp_path / "tiny-own"
    shutil.copytree(lm_dir, out)
    (out / "modeling_tiny_own.py").write_text(OWN_CODE)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="tiny_own",
        architectures=["TinyOwnForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_tiny_own.TinyOwnConfig",
            "AutoModelForCausalLM": "modeling_tiny_own.TinyOwnForCausalLM",
        },
    )
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_checkpoints_own_code_runs_only_with_trust_remote_code(own_code_dir, tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(VlchatError, match="needs its own Python code .*--trust-remote-code") as error:
        load_model(model_config(str(own_code_dir)))
    assert "\n" not in str(error.value) and not marker.exists()

    env = {"TINY_OWN_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    ask = ("ask", "Hello!", "--model", str(own_code_dir), "--max-new-tokens", "3", "--json")
    refused = run_cli(*ask, home=tmp_path, env=env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--trust-remote-code" in refused.stderr and not marker.exists()
    trusted = run_cli(*ask, "--trust-remote-code", home=tmp_path, env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["answer"] is not None and marker.read_text() == "the checkpoint's code ran"
