"""LLaVA-1.5 in the Hugging Face layout (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

Parts and where their weights sit in the one state dict (both the hub's layout and the one newer
transformers write are accepted):
- vision tower (CLIP or SigLIP): `vision_tower.[vision_model.]*` / `model.vision_tower.*`, output =
  hidden state `vision_feature_layer` (-2 for LLaVA-1.5), CLS dropped for the "default" strategy;
- connector: `multi_modal_projector.linear_1/2` -> vlchat's mlp2x_gelu projector (`net.0`, `net.2`);
- LM: `language_model.model.*` / `model.language_model.*` and `[language_model.]lm_head`.
Image preprocessing from preprocessor_config.json; chat template from the checkpoint (`hf:<dir>`).
Reference: transformers `models/llava/modeling_llava.py` (`LlavaModel.get_image_features`).
"""

from __future__ import annotations

from pathlib import Path

from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError

VISION_PREFIXES = (
    ("model.vision_tower.vision_model.", ""),
    ("vision_tower.vision_model.", ""),
    ("model.vision_tower.", ""),
    ("vision_tower.", ""),
)
PROJECTOR_PREFIXES = (
    ("model.multi_modal_projector.linear_1.", "net.0."),
    ("model.multi_modal_projector.linear_2.", "net.2."),
    ("multi_modal_projector.linear_1.", "net.0."),
    ("multi_modal_projector.linear_2.", "net.2."),
)
LM_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
# The same renaming as regular expressions for transformers' `from_pretrained(key_mapping=...)`: the
# LM alone is loaded that way when it is quantized or spread over GPUs (model/placement.py).
LM_KEY_MAPPING = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def model_config(directory: Path, raw: dict) -> ModelConfig:
    """The ModelConfig of a LLaVA checkpoint, from its config.json (transformers fills defaults)."""
    from transformers import AutoConfig

    from vlchat.model.hf_vision import VISION_MODEL_TYPES

    hf = AutoConfig.from_pretrained(directory)
    vision, text = hf.vision_config, hf.text_config
    family = VISION_MODEL_TYPES.get(vision.model_type)
    if family is None:
        raise VlchatError(
            f"{directory}: LLaVA with a {vision.model_type!r} vision tower is not supported (CLIP, SigLIP)"
        )
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise VlchatError(f"{directory}: vision_feature_layer {layer!r} (several layers) is not supported; one layer")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise VlchatError(f"{directory}: only the mlp2x_gelu projector (gelu, with bias) is supported")
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise VlchatError(f"{directory}: unknown vision_feature_select_strategy {strategy!r}")
    return ModelConfig(
        name=directory.name,
        vision=VisionConfig(
            name=family,
            image_size=vision.image_size,
            weights=None,
            sha256=None,
            source=str(directory),
            patch_size=vision.patch_size,
            feature_layer=layer,
            keep_cls=strategy == "full" and family == "clip",
        ),
        projector=ProjectorConfig(kind="mlp2x_gelu", in_dim=vision.hidden_size, out_dim=text.hidden_size),
        lm=LMConfig(source=str(directory), sha256=None),
        template=f"hf:{directory}",
        projector_weights=None,
        checkpoint=str(directory),
    )


def load(config: ModelConfig, directory: Path):
    """vlchat's encoder, projector and LM with the checkpoint's weights, frozen."""
    from transformers import AutoConfig

    from vlchat.model.loaders.checkpoint import read_state_dict

    hf = AutoConfig.from_pretrained(directory)
    state = read_state_dict(directory)
    return assemble(config, directory, hf.vision_config, hf.text_config, state)


def assemble(config: ModelConfig, directory: Path, vision_config, text_config, state: dict):
    """Shared with other families that pair a HF vision tower, a vlchat projector and a causal LM."""
    import torch

    from vlchat.model.language import resolve_dtype
    from vlchat.model.loaders.checkpoint import load_strict, rename_keys
    from vlchat.model.projector import Projector
    from vlchat.model.vlm import VisionLanguageModel

    dtype = resolve_dtype(config.lm.dtype, config.device)
    vision = build_vision(config, directory, vision_config, rename_keys(state, VISION_PREFIXES), dtype)
    if config.projector.in_dim != vision.hidden_size:
        raise VlchatError(
            f"projector in_dim {config.projector.in_dim} does not fit the vision tower's {vision.hidden_size}"
        )
    projector = Projector(config.projector)
    load_strict(projector, rename_keys(state, PROJECTOR_PREFIXES), "projector")
    projector = projector.to(dtype).eval().requires_grad_(False)
    lm = build_lm(config.lm, directory, text_config, rename_keys(state, LM_PREFIXES), dtype, config.device)
    if config.projector.out_dim != lm.hidden_size:
        raise VlchatError(f"projector out_dim {config.projector.out_dim} does not fit the LM's {lm.hidden_size}")
    del state
    with torch.no_grad():
        return VisionLanguageModel(config, vision, projector, lm).eval()


def build_vision(config: ModelConfig, directory: Path, vision_config, state: dict, dtype, preprocess=None):
    """The HF vision tower of a VLM checkpoint (its weights already renamed to the tower's keys),
    frozen, with the checkpoint's image preprocessing (or `preprocess`, an ImagePreprocess, if given)."""
    from vlchat.model.hf_vision import HFVisionEncoder, check_family, check_geometry, read_preprocess, tower_class
    from vlchat.model.loaders.checkpoint import build_frozen

    check_family(config.vision)
    check_geometry(vision_config, config.vision, directory)
    tower = build_frozen(lambda: tower_class(config.vision.name)(vision_config), state, "vision tower", dtype)
    preprocess = preprocess if preprocess is not None else read_preprocess(directory, config.vision)
    return HFVisionEncoder(config.vision, tower, preprocess).eval()


def build_lm(config: LMConfig, directory: Path, text_config, state: dict, dtype, device: str = "cpu"):
    """The causal LM part of a VLM checkpoint, with the checkpoint's tokenizer and generation config:
    built from `state` (the checkpoint's LM weights, renamed), or, quantized or device-mapped, read
    again by transformers' from_pretrained (which does both) with the keys renamed as it loads."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from vlchat.model.language import LanguageModel
    from vlchat.model.loaders.checkpoint import build_frozen
    from vlchat.model.loaders.text import load_tokenizer
    from vlchat.model.lora import attach_adapter
    from vlchat.model.placement import placed_by_transformers, pretrained_kwargs

    if placed_by_transformers(config.load_in, config.device_map):
        placed = pretrained_kwargs(dtype, device, config.load_in, config.device_map)
        model = pretrained_lm(directory, text_config, dtype, placed)
    else:
        tied = ("lm_head.weight",) if getattr(text_config, "tie_word_embeddings", False) else ()
        factory = lambda: AutoModelForCausalLM.from_config(text_config)  # noqa: E731
        model = build_frozen(factory, state, "language model", dtype, tied)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    gate = attach_adapter(model, config.adapter) if config.adapter else None  # on for image conversations
    model.eval().requires_grad_(False)
    return LanguageModel(model, load_tokenizer(directory), config.context_window, gate)


def pretrained_lm(directory: Path, text_config, dtype, placed: dict):
    """The checkpoint's LM through `AutoModelForCausalLM.from_pretrained` (keys renamed by
    LM_KEY_MAPPING; the vision and projector weights are left out as unexpected keys), with the
    placement keywords `placed` (quantization_config, device_map)."""
    from transformers import AutoModelForCausalLM

    from vlchat.model.loaders.checkpoint import pretrained_strict

    return pretrained_strict(
        AutoModelForCausalLM,
        directory,
        dtype,
        "language model",
        config=text_config,
        key_mapping=LM_KEY_MAPPING,
        **placed,
    )
