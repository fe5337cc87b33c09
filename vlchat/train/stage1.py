"""Stage 1 (MiniGPT-4's alignment): encoder and LM frozen; the projector learns from
image-caption pairs behind MiniGPT-4-style instructions, with loss on the answer tokens only."""

from __future__ import annotations

from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.train.recipe import load_config
from vlchat.train.trainer import train


def run(config_path: str | Path, overrides: list[str] = (), resume: bool = False) -> Path:
    config = load_config(config_path, list(overrides), stage="stage1")
    if config.lm != "frozen":
        raise VlchatError("stage 1 trains the projector only: set lm: frozen (LoRA belongs to stage 2)")
    return train(config, resume)
