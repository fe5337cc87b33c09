"""InstructBLIP in the Hugging Face layout (`InstructBlipForConditionalGeneration`, e.g.
Salesforce/instructblip-vicuna-7b) with a decoder-only LM (Vicuna/LLaMA); the Flan-T5 variants
(encoder-decoder) are refused.

BLIP-2's parts under the same keys (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`,
`language_model.*`), with one difference: the Q-Former also reads the instruction, tokenized by the
checkpoint's second tokenizer (`qformer_tokenizer/`, BERT's WordPiece), so an image's embeddings depend
on the text asked about it (model/qformer.py `InstructQFormerProjector`). The chat engine gives the
connector the text of the user message that holds the image, once: a conversation keeps that encoding
for its follow-up turns (chat/prompt.py `image_instructions`).
The prompt is what InstructBlipProcessor writes: the query embeddings first, then the text tokenized with
the LM's BOS (the `instructblip` template). Image preprocessing from preprocessor_config.json.
Reference: transformers `models/instructblip/modeling_instructblip.py`, `processing_instructblip.py`.
"""

from __future__ import annotations

from pathlib import Path

from vlchat.config import ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders.blip2 import CONNECTOR_PREFIXES, VISION_PREFIXES, blip_hf_config, qformer_model_config
from vlchat.model.loaders.llava import LM_PREFIXES

QFORMER_TOKENIZER = "qformer_tokenizer"  # the folder InstructBlipProcessor.save_pretrained writes it to


def model_config(directory: Path, raw: dict) -> ModelConfig:
    """The ModelConfig of an InstructBLIP checkpoint, from its config.json (transformers fills defaults)."""
    return qformer_model_config(directory, _hf_config(directory), "instructblip")


def _hf_config(directory: Path):
    return blip_hf_config(directory, "InstructBLIP", "the Vicuna variants")


def qformer_tokenizer(directory: Path, qformer_config):
    """The checkpoint's Q-Former tokenizer; its ids must fit the Q-Former's word embeddings."""
    from transformers import AutoTokenizer

    folder = directory / QFORMER_TOKENIZER
    if not folder.is_dir():
        raise VlchatError(
            f"{directory} has no {QFORMER_TOKENIZER}/ folder: InstructBLIP's Q-Former reads the question with its "
            "own tokenizer (an incomplete download?)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot load the Q-Former tokenizer from {folder}: {str(error).splitlines()[0]}") from None
    if len(tokenizer) > qformer_config.vocab_size:
        raise VlchatError(
            f"{folder} has {len(tokenizer)} tokens but the Q-Former embeds {qformer_config.vocab_size}: "
            "the tokenizer belongs to another model"
        )
    return tokenizer


def load(config: ModelConfig, directory: Path):
    """vlchat's encoder, instruction-reading Q-Former connector and LM with the checkpoint's weights, frozen."""
    import torch

    from vlchat.model.language import resolve_dtype
    from vlchat.model.loaders.checkpoint import build_frozen, read_state_dict, rename_keys
    from vlchat.model.loaders.llava import build_lm, build_vision
    from vlchat.model.qformer import InstructQFormerProjector
    from vlchat.model.vlm import VisionLanguageModel

    if config.projector is None or config.projector.kind != "qformer":
        raise VlchatError(f"{directory} is an InstructBLIP checkpoint; its projector must be the Q-Former ('qformer')")
    hf = _hf_config(directory)
    tokenizer = qformer_tokenizer(directory, hf.qformer_config)
    dtype = resolve_dtype(config.lm.dtype, config.device)
    state = read_state_dict(directory)
    vision = build_vision(config, directory, hf.vision_config, rename_keys(state, VISION_PREFIXES), dtype)
    connector = build_frozen(  # float32, as transformers keeps the Q-Former; the projection in the LM's dtype
        lambda: InstructQFormerProjector(hf.qformer_config, hf.num_query_tokens, hf.text_config.hidden_size, tokenizer),
        rename_keys(state, CONNECTOR_PREFIXES),
        "Q-Former",
        torch.float32,
    )
    connector.language_projection.to(dtype)
    lm = build_lm(config.lm, directory, hf.text_config, rename_keys(state, LM_PREFIXES), dtype, config.device)
    if config.projector.out_dim != lm.hidden_size:
        raise VlchatError(f"projector out_dim {config.projector.out_dim} does not fit the LM's {lm.hidden_size}")
    del state
    with torch.no_grad():
        return VisionLanguageModel(config, vision, connector, lm).eval()
