"""Stage 2 (instruction tuning): multi-turn conversations rendered by the inference templates;
the projector keeps training (usually from stage 1's weights) and the LM may get LoRA."""

from __future__ import annotations

from pathlib import Path

from vlchat.train.recipe import load_config
from vlchat.train.trainer import train


def run(config_path: str | Path, overrides: list[str] = (), resume: bool = False) -> Path:
    return train(load_config(config_path, list(overrides), stage="stage2"), resume)
