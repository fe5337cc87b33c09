"""Any Hugging Face causal LM directory as a text-only vlchat model, with its own chat template."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlchat.config import LMConfig, ModelConfig
from vlchat.errors import VlchatError


def model_config(directory: Path, raw: dict) -> ModelConfig:
    return ModelConfig(
        name=directory.name,
        vision=None,
        projector=None,
        lm=LMConfig(source=str(directory), sha256=None),
        template=f"hf:{directory}",
        projector_weights=None,
        checkpoint=str(directory),
    )


def load(config: ModelConfig, directory: Path):
    from vlchat.model.language import LanguageModel, merge_adapter
    from vlchat.model.loaders.checkpoint import pretrained_strict
    from vlchat.model.placement import lm_placement
    from vlchat.model.vlm import VisionLanguageModel

    if config.vision is not None:
        raise VlchatError(f"{directory} is a text-only model; its config cannot have a vision encoder")
    from transformers import AutoModelForCausalLM

    refuse_remote_code(directory, config.lm.trust_remote_code)
    dtype, placed = lm_placement(config)
    trust = {"trust_remote_code": config.lm.trust_remote_code}  # explicit: transformers never prompts
    model = pretrained_strict(AutoModelForCausalLM, directory, dtype, "language model", **placed, **trust)
    if config.lm.adapter:
        model = merge_adapter(model, config.lm.adapter).eval().requires_grad_(False)
    lm = LanguageModel(model, load_tokenizer(directory, **trust), config.lm.context_window)
    return VisionLanguageModel(replace(config, projector=None), None, None, lm).eval()


def refuse_remote_code(directory: Path, trusted: bool) -> None:
    """A checkpoint whose model class is its own Python code (config.json's auto_map, a model type
    transformers does not know) loads only with --trust-remote-code: one line saying so."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    own_code = (raw.get("auto_map") or {}).get("AutoModelForCausalLM")
    if own_code and not trusted and raw.get("model_type") not in CONFIG_MAPPING:
        raise VlchatError(
            f"{directory} needs its own Python code ({own_code}); vlchat does not run a checkpoint's code "
            "unless asked: pass --trust-remote-code if you trust it"
        )


def load_tokenizer(directory: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot load the tokenizer of {directory}: {str(error).splitlines()[0]}") from None


def load_causal_lm(config: ModelConfig, directory: Path):
    """The causal LM of a model whose LM is released apart from its vision side (MiniGPT-4's
    `llama_model`, Ziya-Visual's Ziya-LLaMA) as a LanguageModel: `from_pretrained` with the config's
    placement (dtype on its device, 8-/4-bit, device map: model/placement.py), and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from vlchat.model.language import LanguageModel
    from vlchat.model.loaders.checkpoint import pretrained_strict
    from vlchat.model.placement import lm_placement

    dtype, placed = lm_placement(config)
    model = pretrained_strict(AutoModelForCausalLM, directory, dtype, "language model", **placed)
    return LanguageModel(model, load_tokenizer(directory), config.lm.context_window)
