"""BLIP-2 in the Hugging Face layout (`Blip2ForConditionalGeneration`, e.g. Salesforce/blip2-opt-2.7b)
with a decoder-only LM (OPT); the Flan-T5 variants (encoder-decoder) are refused.

Parts and where their weights sit in the one state dict:
- vision tower: `vision_model.*` -> transformers' Blip2VisionModel; output = its final post-layernormed
  hidden state, CLS included (all 1 + P tokens go to the Q-Former);
- connector: `query_tokens`, `qformer.*`, `language_projection.*` -> vlchat's QFormerProjector
  (model/qformer.py): `num_query_tokens` image embeddings per image;
- LM: `language_model.model.*`, `language_model.lm_head.*` (absent when tied to the input embeddings).
The image embeddings lead the prompt, before the BOS token, as Blip2Processor writes them: the
`blip2` template (chat/templates.py) sets `images_first`. Image preprocessing from preprocessor_config.json.
Reference: transformers `models/blip_2/modeling_blip_2.py`, `processing_blip_2.py`.
"""

from __future__ import annotations

from pathlib import Path

from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders.llava import LM_PREFIXES

VISION_PREFIXES = (("vision_model.", ""),)
CONNECTOR_PREFIXES = (
    ("query_tokens", "query_tokens"),
    ("qformer.", "qformer."),
    ("language_projection.", "language_projection."),
)


def model_config(directory: Path, raw: dict) -> ModelConfig:
    """The ModelConfig of a BLIP-2 checkpoint, from its config.json (transformers fills defaults)."""
    hf = blip_hf_config(directory)
    refuse_visual_only(directory)
    return qformer_model_config(directory, hf, "blip2")


def qformer_model_config(directory: Path, hf, family: str) -> ModelConfig:
    """BLIP-2 and InstructBLIP (`family`, also the template's name): the ViT's final output, CLS kept,
    read by the Q-Former connector."""
    vision = hf.vision_config
    return ModelConfig(
        name=directory.name,
        vision=VisionConfig(
            name=family,
            image_size=vision.image_size,
            weights=None,
            sha256=None,
            source=str(directory),
            patch_size=vision.patch_size,
            feature_layer=-1,
            keep_cls=True,
        ),
        projector=ProjectorConfig(kind="qformer", in_dim=vision.hidden_size, out_dim=hf.text_config.hidden_size),
        lm=LMConfig(source=str(directory), sha256=None),
        template=family,
        projector_weights=None,
        checkpoint=str(directory),
    )


def refuse_visual_only(directory: Path) -> None:
    """A BLIP-2 layout without `language_model.*` weights is a visual part released apart from its LM
    (Ziya-BLIP2-14B-Visual-v1): say how to name both instead of failing on the first missing LM key."""
    from vlchat.model.loaders.checkpoint import checkpoint_shapes

    if not any(key.startswith(("language_model.", "model.language_model.")) for key in checkpoint_shapes(directory)):
        raise VlchatError(
            f"{directory} holds BLIP-2's visual parts without a language model (Ziya-Visual's layout): name it "
            "with its LM in a YAML `ziya_visual: {visual_model: DIR, language_model: LM_DIR}` and give that as --model"
        )


def blip_hf_config(directory: Path, family: str = "BLIP-2", variants: str = "the OPT variants"):
    """The checkpoint's config.json (BLIP-2 or InstructBLIP: the same parts), refusing an encoder-decoder
    LM and a Q-Former that does not fit the vision tower."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(directory)
    if not hf.use_decoder_only_language_model:
        raise VlchatError(
            f"{directory}: {family} with a {hf.text_config.model_type} (encoder-decoder) language model is not "
            f"supported; vlchat runs decoder-only LMs ({variants})"
        )
    if hf.qformer_config.encoder_hidden_size != hf.vision_config.hidden_size:
        raise VlchatError(
            f"{directory}: the Q-Former reads {hf.qformer_config.encoder_hidden_size}-wide vision tokens but the "
            f"vision tower makes {hf.vision_config.hidden_size}-wide ones: config.json is inconsistent"
        )
    return hf


def load(config: ModelConfig, directory: Path):
    """vlchat's encoder, Q-Former connector and LM with the checkpoint's weights, frozen."""
    import torch

    from vlchat.model.language import resolve_dtype
    from vlchat.model.loaders.checkpoint import read_state_dict, rename_keys
    from vlchat.model.loaders.llava import build_lm, build_vision
    from vlchat.model.vlm import VisionLanguageModel

    if config.projector is None or config.projector.kind != "qformer":
        raise VlchatError(f"{directory} is a BLIP-2 checkpoint; its projector must be the Q-Former (kind 'qformer')")
    hf = blip_hf_config(directory)
    dtype = resolve_dtype(config.lm.dtype, config.device)
    state = read_state_dict(directory)
    vision = build_vision(config, directory, hf.vision_config, rename_keys(state, VISION_PREFIXES), dtype)
    connector = build_connector(hf, state, hf.text_config.hidden_size, dtype)
    lm = build_lm(config.lm, directory, hf.text_config, rename_keys(state, LM_PREFIXES), dtype, config.device)
    if config.projector.out_dim != lm.hidden_size:
        raise VlchatError(f"projector out_dim {config.projector.out_dim} does not fit the LM's {lm.hidden_size}")
    del state
    with torch.no_grad():
        return VisionLanguageModel(config, vision, connector, lm).eval()


def build_connector(hf, state: dict, out_dim: int, dtype):
    """BLIP-2's `query_tokens`, `qformer.*` and `language_projection.*` from a checkpoint's state dict as
    vlchat's QFormerProjector: float32, as transformers keeps the Q-Former; the projection in `dtype`.
    Shared with Ziya-Visual (model/loaders/ziya.py), whose visual repository holds the same parts."""
    import torch

    from vlchat.model.loaders.checkpoint import build_frozen, rename_keys
    from vlchat.model.qformer import QFormerProjector

    connector = build_frozen(
        lambda: QFormerProjector(hf.qformer_config, hf.num_query_tokens, out_dim),
        rename_keys(state, CONNECTOR_PREFIXES),
        "Q-Former",
        torch.float32,
    )
    connector.language_projection.to(dtype)
    return connector
