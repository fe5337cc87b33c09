"""Ziya-BLIP2-14B-Visual-v1 (IDEA-CCNL): BLIP-2's ViT-g and Q-Former (32 queries) with a projection into
Ziya-LLaMA-13B, published as two repositories that vlchat takes from one small YAML given as --model:

    ziya_visual:
      visual_model: Ziya-BLIP2-14B-Visual-v1   # config.json + weights, no language model
      language_model: Ziya-LLaMA-13B-v1        # a LLaMA directory (rebuilt with `weights apply-delta`)

Relative paths are read from the YAML's folder. The published usage loads the LM on its own and hands it
to the visual model (`model.language_model = lm_model`); the YAML names the same two things.

Known from the published usage code and the paper (arXiv 2310.08166):
- config.json has BLIP-2's `vision_config` (its `image_size` sizes the images), `qformer_config`,
  `num_query_tokens` -> transformers' Blip2Config reads it, whatever its model_type;
- images: BlipImageProcessor at image_size x image_size (bicubic resize, no crop), OpenAI CLIP mean/std;
- prompt: `<human>:` / `<bot>:` turns after LLaMA's BOS (the `ziya` template).
Assumed, not verified (its modeling code, `modeling_ziya_blip2.py`, lives only on the model hub):
- the weights carry transformers' Blip2ForConditionalGeneration names without the LM: `vision_model.*`,
  `query_tokens`, `qformer.*`, `language_projection.*` (any other key is refused in one line);
- the image's embeddings lead the prompt, before the BOS, as BLIP-2 generates (`images_first` in `ziya`).
Parts are built as for BLIP-2 (model/loaders/blip2.py): the Q-Former in float32, the rest in the LM's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError

YAML_KEY = "ziya_visual"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as the published usage passes them
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_PREFIXES = ("vision_model.", "qformer.", "language_projection.", "query_tokens")
LM_WIDTHS = {4096: "7B", 5120: "13B"}  # LLaMA hidden width -> size (Ziya-LLaMA-13B: 5120)


@dataclass(frozen=True)
class ZiyaFiles:
    """What one ziya_visual YAML names, resolved."""

    yaml: Path
    visual: Path
    lm: Path


def is_ziya_yaml(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and path.is_file() and isinstance(_block(path, quiet=True), dict)


def _block(path: Path, quiet: bool = False) -> object | None:
    from vlchat.model.loaders.checkpoint import yaml_block

    block = yaml_block(path, YAML_KEY, quiet)
    if block is None and not quiet:
        raise VlchatError(f"{path} has no `{YAML_KEY}:` mapping (visual_model, language_model)")
    return block


def read_files(path: Path) -> ZiyaFiles:
    block = _block(path)
    if not isinstance(block, dict) or set(block) - {"visual_model", "language_model"}:
        extra = sorted(set(block) - {"visual_model", "language_model"}) if isinstance(block, dict) else []
        raise VlchatError(
            f"{path}: `{YAML_KEY}:` takes visual_model and language_model"
            + (f", not {', '.join(map(str, extra))}" if extra else " (a mapping)")
        )
    visual = _directory(path, block.get("visual_model"), "visual_model", "Ziya-BLIP2-14B-Visual-v1's directory")
    lm = _directory(path, block.get("language_model"), "language_model", "the Ziya-LLaMA-13B-v1 directory")
    return ZiyaFiles(yaml=path, visual=visual, lm=lm)


def _directory(yaml: Path, value, key: str, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise VlchatError(f"{yaml}: {YAML_KEY}.{key} is not set: give the path of {what}")
    directory = Path(value).expanduser()
    directory = directory if directory.is_absolute() else yaml.parent / directory
    if not (directory / "config.json").is_file():
        raise VlchatError(f"{YAML_KEY}.{key} {directory} is not a Hugging Face model directory (no config.json)")
    return directory


def visual_config(directory: Path):
    """transformers' Blip2Config from the visual repository's config.json (its own model_type may differ)."""
    from transformers import Blip2Config

    try:  # Blip2Config sets the Q-Former's encoder_hidden_size to the vision tower's width itself
        return Blip2Config.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise VlchatError(f"cannot read BLIP-2's configs from {directory / 'config.json'}: {error}") from None


def lm_width(files: ZiyaFiles) -> int:
    from vlchat.model.loaders import read_config_json

    width = read_config_json(files.lm).get("hidden_size")
    if not isinstance(width, int):
        raise VlchatError(f"{files.lm / 'config.json'} has no hidden_size: not a LLaMA-style causal LM directory")
    return width


def check_visual_layout(files: ZiyaFiles, shapes: dict[str, tuple[int, ...]], width: int) -> None:
    """The visual weights hold BLIP-2's parts and nothing else, and the projection fits the LM; else one line."""
    full = [key for key in shapes if key.startswith(("language_model.", "model.language_model."))]
    if full:
        raise VlchatError(
            f"{files.visual} holds language model weights such as {full[0]!r}: a complete BLIP-2 checkpoint, not "
            f"Ziya-Visual's visual part; give that directory itself as --model (the BLIP-2 loader)"
        )
    foreign = sorted(key for key in shapes if not key.startswith(VISUAL_PREFIXES))
    if foreign:
        raise VlchatError(
            f"{files.visual} has a weight {foreign[0]!r} outside vision_model/qformer/query_tokens/"
            f"language_projection ({len(foreign)} such): not the BLIP-2 key layout vlchat reads for Ziya-Visual"
        )
    projection = shapes.get("language_projection.weight")
    if projection is None:
        raise VlchatError(
            f"{files.visual} lacks the weight 'language_projection.weight': not the BLIP-2 key layout vlchat "
            "reads for Ziya-Visual, or an incomplete download"
        )
    if projection[0] != width:
        want = LM_WIDTHS.get(projection[0], f"a {projection[0]}-wide")
        raise VlchatError(
            f"language_projection in {files.visual.name} makes {projection[0]}-wide embeddings but the language "
            f"model {files.lm.name} is {width}-wide: use the LM it was trained with ({want} LLaMA, Ziya-LLaMA-13B-v1)"
        )


def model_config(path: Path) -> ModelConfig:
    """The ModelConfig for a ziya_visual YAML: geometry from the visual config.json, the projection's
    fit to the LM checked from the weights' headers before anything heavy loads."""
    from vlchat.model.loaders.checkpoint import checkpoint_shapes

    files = read_files(path.resolve())
    hf = visual_config(files.visual)
    width = lm_width(files)
    check_visual_layout(files, checkpoint_shapes(files.visual), width)
    vision = hf.vision_config
    return ModelConfig(
        name=files.yaml.stem,
        vision=VisionConfig(
            name="blip2",
            image_size=vision.image_size,
            weights=None,
            sha256=None,
            source=str(files.visual),
            patch_size=vision.patch_size,
            feature_layer=-1,
            keep_cls=True,
        ),
        projector=ProjectorConfig(kind="qformer", in_dim=vision.hidden_size, out_dim=width),
        lm=LMConfig(source=str(files.lm), sha256=None),
        template="ziya",
        projector_weights=None,
        checkpoint=str(files.yaml),
    )


def blip_preprocess(image_size: int):
    """BlipImageProcessor(size={height, width: image_size}, image_mean/std=OpenAI CLIP's), its other
    settings at their defaults: RGB, bicubic resize to a square, x 1/255, normalise; no crop."""
    from vlchat.model.hf_vision import ImagePreprocess

    return ImagePreprocess(
        shortest_edge=None,
        size=(image_size, image_size),
        crop=None,
        resample=3,
        rescale=1 / 255,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )


def load(config: ModelConfig, path: Path):
    """vlchat's BLIP-2 vision tower and Q-Former connector with the visual weights, and the separate LM
    placed as the device/dtype/load-in/device-map options ask (model/placement.py), all frozen."""
    import torch

    from vlchat.model.loaders.blip2 import VISION_PREFIXES, build_connector
    from vlchat.model.loaders.checkpoint import read_state_dict, rename_keys
    from vlchat.model.loaders.llava import build_vision
    from vlchat.model.loaders.text import load_causal_lm
    from vlchat.model.placement import lm_placement
    from vlchat.model.vlm import VisionLanguageModel

    if config.projector is None or config.projector.kind != "qformer":
        raise VlchatError(f"{path} is a Ziya-Visual model; its projector must be the Q-Former (kind 'qformer')")
    if config.lm.adapter:
        raise VlchatError("a LoRA adapter on a Ziya-Visual model is not supported")
    files = read_files(path)
    hf = visual_config(files.visual)
    width = lm_width(files)
    state = read_state_dict(files.visual)
    check_visual_layout(files, {key: tuple(value.shape) for key, value in state.items()}, width)
    dtype, _ = lm_placement(config)
    preprocess = blip_preprocess(hf.vision_config.image_size)
    vision_state = rename_keys(state, VISION_PREFIXES)
    vision = build_vision(config, files.visual, hf.vision_config, vision_state, dtype, preprocess)
    connector = build_connector(hf, state, width, dtype)
    del state
    lm = load_causal_lm(config, files.lm)  # last: the visual weights' problems show before the large LM loads
    with torch.no_grad():
        return VisionLanguageModel(config, vision, connector, lm).eval()
