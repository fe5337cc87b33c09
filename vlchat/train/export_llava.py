"""A vlchat run on a CLIP/SigLIP encoder -> a Hugging Face LLaVA checkpoint directory that
transformers' `LlavaForConditionalGeneration` (and vlchat's own LLaVA loader) load.

What maps onto what (transformers `models/llava/modeling_llava.py`):
- the run's model's vision tower -> `model.vision_tower`, `vision_feature_layer` = its feature_layer,
  `vision_feature_select_strategy` "default" (drop CLIP's CLS) or "full" (CLS kept, or SigLIP, which
  has none: "default" would drop a patch);
- the trained mlp2x_gelu projector (`net.0`, `net.2`) -> `multi_modal_projector.linear_1/2`; a
  projector with position embeddings or a grid code, or of another kind, has no LLaVA equivalent;
- the LM (with the run's LoRA adapter merged in) -> `model.language_model` + `lm_head`; an `<image>`
  token is added to the tokenizer (and a row to the embeddings when the vocabulary is full) as
  `image_token_index`.
The checkpoint's preprocessor_config.json is copied from the vision tower's directory; the
tokenizer keeps its own chat template.

    vlchat export OUT --run runs/stage2 --format hf-llava
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from vlchat.config import ModelConfig
from vlchat.errors import VlchatError

IMAGE_TOKEN = "<image>"


def run_model_config(run: Path) -> tuple[ModelConfig, bool]:
    """The model a run trained (its recipe's `model` with the run's projector), and whether it has a LoRA adapter."""
    from vlchat.model.loaders import model_config

    try:
        recipe = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise VlchatError(f"{run} is not a training run (cannot read its config.json: {error})") from None
    if not (run / "projector.safetensors").is_file():
        raise VlchatError(f"{run} has no trained projector (projector.safetensors); has the run finished?")
    if recipe.get("lm") == "full":
        raise VlchatError(f"{run} trained the whole LM (lm: full), whose weights a run does not save; cannot export")
    base = model_config(recipe.get("model", "default"))
    config = replace(
        base,
        projector=run_projector(run),
        projector_weights=str(run / "projector"),
        lm=replace(base.lm, adapter=None, dtype="float32", load_in=None, device_map=None),
        device="cpu",
    )
    return config, (run / "lora").is_dir()


def run_projector(run: Path):
    from vlchat.model.projector import read_projector_config

    return read_projector_config(str(run / "projector"))


def check_exportable(config: ModelConfig) -> None:
    vision, projector = config.vision, config.projector
    if vision is None or vision.name not in ("clip", "siglip"):
        raise VlchatError(
            f"the HF LLaVA layout needs a CLIP or SigLIP vision tower; this model's is {vision and vision.name!r}"
        )
    if vision.taps:
        raise VlchatError("the HF LLaVA layout reads one vision layer; this model appends extra taps")
    if projector.kind != "mlp2x_gelu" or projector.position_tokens or projector.position_code:
        raise VlchatError(
            f"the HF LLaVA layout has an mlp2x_gelu projector without position embeddings or grid codes; this run's "
            f"is {projector.kind} (position_tokens {projector.position_tokens}, code {projector.position_code})"
        )


def export_llava(run: Path, out: Path) -> Path:
    """Write `out` (config.json, model.safetensors, tokenizer, preprocessor_config.json); returns it."""
    from vlchat.model.language import merge_adapter
    from vlchat.model.vlm import load_model

    config, has_lora = run_model_config(run)
    check_exportable(config)
    vlm = load_model(config)
    lm = merge_adapter(vlm.lm.model, str(run / "lora")) if has_lora else vlm.lm.model
    tokenizer = vlm.lm.tokenizer
    image_token = add_image_token(tokenizer, lm)
    llava = assemble_llava(vlm, lm, image_token)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = Path(config.vision.source).expanduser()
    shutil.copyfile(source / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def add_image_token(tokenizer, lm) -> int:
    """The id of `<image>` (added if missing); the LM's embeddings grow to hold it when needed."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token >= lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(image_token + 1, mean_resizing=False)
    return image_token


def llava_config(vlm, lm, image_token: int):
    from transformers import LlavaConfig

    vision = vlm.config.vision
    strategy = "default" if vision.name == "clip" and not vision.keep_cls else "full"
    return LlavaConfig(
        vision_config=vlm.vision.tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=image_token,
        image_seq_length=vision.num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(lm.config.tie_word_embeddings),
    )


def assemble_llava(vlm, lm, image_token: int):
    """A LlavaForConditionalGeneration holding the run's parts (no copy of a large LM is made:
    empty modules take the parts' tensors)."""
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    config = llava_config(vlm, lm, image_token)
    with init_empty_weights():
        llava = LlavaForConditionalGeneration(config)
    inner, net = llava.model, vlm.projector.net
    inner.vision_tower.load_state_dict(vlm.vision.tower.state_dict(), assign=True)
    inner.multi_modal_projector.linear_1.load_state_dict(net[0].state_dict(), assign=True)
    inner.multi_modal_projector.linear_2.load_state_dict(net[2].state_dict(), assign=True)
    inner.language_model.load_state_dict(lm.get_decoder().state_dict(), assign=True)
    llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), assign=True)
    if config.tie_word_embeddings:
        llava.tie_weights()
    llava.generation_config = lm.generation_config
    return llava.to(torch.float32).eval()
