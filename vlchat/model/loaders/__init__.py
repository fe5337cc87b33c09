"""Hugging Face checkpoint directories as vlchat models: each family's loader is data (where each
part's weights sit in the checkpoint's one state dict, which template, which preprocessing).

`model_config_from_checkpoint(dir)` reads config.json and writes the ModelConfig (serialisable, no
weights); `load_checkpoint_model(config)` builds vlchat's own parts and puts the checkpoint's weights
in them, so the model runs through vlchat's engine (merge, KV cache, generation), not transformers'
VLM classes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlchat.config import PRESETS, ModelConfig
from vlchat.errors import VlchatError

# config.json model_type -> loader module in this package (imported on use)
FAMILIES = {"llava": "llava", "blip-2": "blip2", "instructblip": "instructblip", "internlm2": "internlm2"}


def read_config_json(directory: Path) -> dict:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read {directory / 'config.json'}: {error}") from None
    if not isinstance(data, dict):
        raise VlchatError(f"{directory / 'config.json'} is not a JSON object")
    return data


def family_module(directory: Path):
    """The loader module for the checkpoint's family: a VLM family, or `text` for any causal LM."""
    import importlib

    raw = read_config_json(directory)
    model_type = raw.get("model_type", "")
    if model_type in FAMILIES:
        return importlib.import_module(f"vlchat.model.loaders.{FAMILIES[model_type]}")
    architectures = raw.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures) or (model_type and not architectures):
        return importlib.import_module("vlchat.model.loaders.text")
    ziya = any("ziya" in str(a).lower() for a in architectures)  # its visual part: named with its LM in a YAML
    raise VlchatError(
        f"{directory} holds a {model_type or 'unknown'} model ({', '.join(architectures) or 'no architectures'}); "
        + (
            "for Ziya-Visual's visual part write a YAML `ziya_visual: {visual_model: DIR, language_model: LM_DIR}`"
            " and give that as --model"
            if ziya
            else "vlchat loads LLaVA, BLIP-2, InstructBLIP, InternLM2 and causal LM checkpoints"
        )
    )


def model_config_from_checkpoint(directory: Path) -> ModelConfig:
    return family_module(directory).model_config(directory.resolve(), read_config_json(directory))


def load_checkpoint_model(config: ModelConfig):
    """The VisionLanguageModel for a ModelConfig whose `checkpoint` names a directory (or a YAML that
    names a model's separate files: MiniGPT-4's eval YAML, a ziya_visual YAML)."""
    directory = Path(config.checkpoint).expanduser()
    if directory.suffix in (".yaml", ".yml") and directory.is_file():
        return yaml_module(directory).load(config, directory)
    if not (directory / "config.json").is_file():
        raise VlchatError(f"model checkpoint {directory} not found (expected a directory with config.json)")
    return family_module(directory).load(config, directory)


def yaml_module(path: Path):
    """The loader of a YAML that names a model's separate files (imported on use, as the families are):
    MiniGPT-4's eval YAML (`model: {arch: minigpt4, ...}`) or a `ziya_visual:` one; None for others
    (vlchat's own model config files)."""
    import importlib

    for name, claims in (("minigpt4", "is_minigpt4_yaml"), ("ziya", "is_ziya_yaml")):
        module = importlib.import_module(f"vlchat.model.loaders.{name}")
        if getattr(module, claims)(path):
            return module
    return None


def find_checkpoint(name: str) -> Path | None:
    """A model directory for `name`: a path; a folder under $VLCHAT_HOME/models; an org/name snapshot
    in the Hugging Face cache (no network). None when nothing matches."""
    from vlchat.assets import vlchat_home

    candidates = [Path(name).expanduser(), vlchat_home() / "models" / name]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from vlchat.hub import cached_snapshot

        return cached_snapshot(name)
    return None


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, a model config file (JSON or YAML) by path, a MiniGPT-4 eval YAML or ziya_visual
    YAML, or a Hugging Face checkpoint directory (a path, a folder name under $VLCHAT_HOME/models, or an
    org/name in the HF cache)."""
    if name not in PRESETS and name.endswith((".yaml", ".yml")):
        if (module := yaml_module(Path(name).expanduser())) is not None:
            return replace(module.model_config(Path(name).expanduser()), **overrides)
    if name not in PRESETS and not name.endswith((".json", ".yaml", ".yml")):
        if (directory := find_checkpoint(name)) is not None:
            return replace(model_config_from_checkpoint(directory), **overrides)
    return ModelConfig.from_name(name, **overrides)
