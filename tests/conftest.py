"""Shared fixtures: the real default model (loaded once) and a tiny random model for fast tests.

The tiny model is a 2-layer LLaMA built from a config and saved locally with the default LM's
tokenizer, so hub-style `from_pretrained(dir)` code paths are exercised without any download.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "vlchat" / "examples"

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs the suite in parallel processes (pytest -n)
    # Share the cores: each worker (and the servers and CLIs it starts, through the environment)
    # gets cores / workers threads, else the workers' OpenMP threads spin-wait against each other.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def default_model():
    from vlchat.model.vlm import load_model

    return load_model(ModelConfig())


@pytest.fixture(scope="session")
def default_chat(default_model):
    from vlchat.chat.engine import Chat

    return Chat(default_model)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, default_model) -> Path:
    """A 2-layer, 64-wide LLaMA with the SmolLM2 tokenizer, saved as an HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = default_model.lm.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_config(lm_dir: Path, context_window: int | None = None, projector: str = "linear") -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(image_size=64, weights=None, sha256=None),
        projector=ProjectorConfig(kind=projector, in_dim=1280, out_dim=64),
        lm=LMConfig(source=str(lm_dir), sha256=None, context_window=context_window, dtype="float32"),
        projector_weights=None,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_lm_dir):
    from vlchat.model.vlm import load_model

    torch.manual_seed(0)
    return load_model(tiny_config(tiny_lm_dir))


@pytest.fixture
def tiny_chat(tiny_model):
    from vlchat.chat.engine import Chat

    return Chat(tiny_model)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_lm_dir) -> Path:
    """A random rank-4 peft LoRA adapter on the tiny LM's q/k/v/o, saved as stage 2 saves one. B is
    drawn non-zero (peft starts it at zero), so the adapter changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_lm_dir), lora)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    out = tmp_path_factory.mktemp("tiny-lora")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapted_model(tiny_lm_dir, tiny_adapter_dir):
    """The tiny model (same random parts as `tiny_model`) with the random adapter attached."""
    from dataclasses import replace

    from vlchat.model.vlm import load_model

    config = tiny_config(tiny_lm_dir)
    torch.manual_seed(0)
    return load_model(replace(config, lm=replace(config.lm, adapter=str(tiny_adapter_dir))))
