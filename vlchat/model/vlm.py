"""VisionLanguageModel: wires encoder -> projector -> LM, plus the one checked merge function.

After transformers' `modeling_llava.py`: the composite holds three submodules and splices image
embeddings into the text embeddings where the prompt has image slots.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image as PILImage
from torch import nn

from vlchat.assets import verified_file
from vlchat.config import ModelConfig
from vlchat.errors import VlchatError
from vlchat.images import to_tensor
from vlchat.model.language import LanguageModel, load_language_model
from vlchat.model.projector import Projector, build_projector
from vlchat.model.vision import VisionEncoder, load_vision_encoder

# Token id marking one image-embedding slot in an id sequence (LLaVA's IMAGE_TOKEN_INDEX).
IMAGE_TOKEN_ID = -200


def merge_image_embeddings(
    input_ids: torch.Tensor, text_embeds: torch.Tensor, image_embeds: torch.Tensor
) -> torch.Tensor:
    """Put image embeddings into the IMAGE_TOKEN_ID slots, in order.

    input_ids (B, T); text_embeds (B, T, D), whose rows at image slots are ignored;
    image_embeds (n_images, N, D). The prompt must have exactly n_images * N slots.
    """
    slots = input_ids == IMAGE_TOKEN_ID  # (B, T)
    n_images, per_image = image_embeds.shape[0], image_embeds.shape[1]
    if int(slots.sum()) != n_images * per_image:
        raise VlchatError(
            f"image features and image placeholders do not match: the prompt has room for "
            f"{int(slots.sum()) / per_image:g} image(s) of {per_image} tokens, but {n_images} image(s) were given"
        )
    merged = text_embeds.clone()
    merged[slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(merged.dtype)
    return merged


class VisionLanguageModel(nn.Module):
    def __init__(
        self, config: ModelConfig, vision: VisionEncoder | None, projector: Projector | None, lm: LanguageModel
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.lm = lm

    @property
    def tokens_per_image(self) -> int:
        if self.vision is None:  # a text-only model
            return 0
        # a connector with a fixed number of outputs (BLIP-2's Q-Former queries) sets the count
        return getattr(self.projector, "num_output_tokens", None) or self.config.vision.num_tokens

    def pixels(self, image: PILImage.Image) -> torch.Tensor:
        """A loaded RGB image -> (3, S, S) normalised pixels (the checkpoint's preprocessing if it has one)."""
        self._refuse_text_only()
        if hasattr(self.vision, "preprocess"):
            return self.vision.preprocess(image)
        return to_tensor(image, self.config.vision.image_size)

    @property
    def reads_instructions(self) -> bool:
        """Whether an image's embeddings depend on the text asked about it (InstructBLIP's Q-Former)."""
        return bool(getattr(self.projector, "reads_instructions", False))

    def encode_images(self, pixels: torch.Tensor, instructions: list[str] | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D) image embeddings in the LM's input space. A connector that reads
        instructions gets one text per image (`instructions`; none given: empty texts)."""
        self._refuse_text_only()
        device = next(self.vision.parameters()).device
        features = self.vision(pixels.to(device))
        if self.reads_instructions:
            return self.projector(features, instructions or [""] * pixels.shape[0])
        return self.projector(features)

    def _refuse_text_only(self) -> None:
        if self.vision is None:
            raise VlchatError(f"model {self.config.name!r} is text-only: it cannot take images")

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids with IMAGE_TOKEN_ID slots + (n, N, D) image embeddings -> (B, T, D)."""
        device = self.lm.model.get_input_embeddings().weight.device
        text_embeds = self.lm.embed(input_ids.clamp(min=0).to(device))
        input_ids = input_ids.to(device)
        if image_embeds is None:
            image_embeds = text_embeds.new_zeros(0, self.tokens_per_image, text_embeds.shape[-1])
        return merge_image_embeddings(input_ids, text_embeds, image_embeds)


def load_model(config: ModelConfig) -> VisionLanguageModel:
    """Build the model from its config: frozen encoder and LM, trained (or fresh) projector; a
    Hugging Face checkpoint (config.checkpoint) through its family's loader (model/loaders/). The
    placement (device, dtype, quantization, device map) is checked against the machine first."""
    from vlchat.model.placement import check_placement

    device = check_placement(config.device, config.lm.dtype, config.lm.load_in, config.lm.device_map)
    config = replace(config, device=device)  # resolved ("auto" -> "cuda" or "cpu"): the loaders read it
    if config.checkpoint is not None:
        from vlchat.model.loaders import load_checkpoint_model

        return place(load_checkpoint_model(config), config)
    if config.vision is None:  # a text-only preset: the LM alone (images refused)
        return place(VisionLanguageModel(config, None, None, load_language_model(config.lm, device)).eval(), config)
    weights = verified_file(config.vision.weights, config.vision.sha256) if config.vision.weights else None
    vision = load_vision_encoder(config.vision, weights)
    lm = load_language_model(config.lm, device)
    if config.projector.in_dim != vision.hidden_size or config.projector.out_dim != lm.hidden_size:
        raise VlchatError(
            f"projector dims {config.projector.in_dim}->{config.projector.out_dim} do not fit vision "
            f"{vision.hidden_size} -> LM {lm.hidden_size}"
        )
    projector = build_projector(config.projector, config.projector_weights)
    return place(VisionLanguageModel(config, vision, projector, lm).eval(), config)


def place(vlm: VisionLanguageModel, config: ModelConfig) -> VisionLanguageModel:
    """Move the model to `config.device`; an LM that transformers placed itself (quantized, or a
    device map) stays, and the encoder and projector go where its input embeddings are."""
    from vlchat.model.placement import placed_by_transformers

    if not placed_by_transformers(config.lm.load_in, config.lm.device_map):
        return vlm.to(config.device)
    first = vlm.lm.model.get_input_embeddings().weight.device
    for part in (vlm.vision, vlm.projector):
        if part is not None:
            part.to(first)
    return vlm
