"""The causal LM behind a small runtime seam: embed, prefill, decode, and a forkable state.

HF transformers is the first runtime. The chat engine and the generation loop only use
`LanguageModel` and `LMState`, so a faster CPU runtime (llama.cpp accepts input embeddings)
can slot in later without touching them.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlchat.assets import lm_directory, resolve
from vlchat.config import LMConfig
from vlchat.errors import VlchatError
from vlchat.model.lora import AdapterGate, attach_adapter
from vlchat.model.placement import cpu_has_native_bf16, pretrained_kwargs, resolve_dtype  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclass
class LMState:
    """The KV cache of a prefix: `length` positions for each of `batch` rows.

    `adapter`: whether this sequence runs with the LM's LoRA adapter on (the caller sets it when
    the conversation has an image; model/lora.py). The cache holds keys and values computed that
    way, so it travels with them: forks, trims and batches keep it, and KV computed with the
    other setting is never reused for it."""

    cache: object | None = None  # transformers DynamicCache
    length: int = 0
    adapter: bool = False

    def fork(self) -> LMState:
        return LMState(copy.deepcopy(self.cache), self.length, self.adapter)

    def trim(self, length: int) -> None:
        """Keep only the first `length` positions (a shared prefix)."""
        if length < self.length:
            if length == 0:
                self.cache, self.length = None, 0
                return
            self.cache.crop(length - self.cache.get_seq_length())  # transformers 5: minus the count to drop
            self.length = length

    def repeat(self, n: int) -> None:
        """Batch 1 -> batch n (one row per beam)."""
        if self.cache is not None:
            self.cache.batch_repeat_interleave(n)

    def select(self, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows, e.g. the surviving beams' parents."""
        if self.cache is not None:
            self.cache.reorder_cache(rows)


class LanguageModel(nn.Module):
    def __init__(
        self, model: nn.Module, tokenizer, context_window: int | None = None, adapter_gate: AdapterGate | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.context_window = context_window or model.config.max_position_embeddings
        self.adapter_gate = adapter_gate  # set when a LoRA adapter is attached (model/lora.py)
        self.onnx = None  # an OnnxDecoder (model/onnx_lm.py) when LMConfig.runtime is "onnx"

    @property
    def has_adapter(self) -> bool:
        return self.adapter_gate is not None

    def adapter_on(self, has_images: bool, has_tools: bool = False) -> bool:
        """The gate of a sequence: the adapter (trained on image conversations and on tool use) is
        on only when the sequence has an image or offers tools; a plain text chat is the base LM.
        False when there is no adapter, so KV caches of all sequences stay shareable then."""
        return self.has_adapter and (has_images or has_tools)

    def gated(self, rows: bool | Sequence[bool]):
        """Context for one forward: the adapter on for `rows` (one flag, or one per batch row)."""
        return self.adapter_gate.on(rows) if self.adapter_gate is not None else nullcontext()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, (list, tuple)) else {ids} if ids is not None else set()

    @property
    def vocab_size(self) -> int:
        """The number of logits per position (token ids 0..vocab_size-1)."""
        return self.model.get_output_embeddings().weight.shape[0]

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters in the longest vocabulary piece (SmolLM2: 81). No text of n characters can
        tokenize to fewer than n / this tokens, so a prompt can be refused before tokenizing it."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max((len(piece) for piece in pieces if piece), default=1)

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (e.g. `<|im_start|>`) are recognised."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it tokenizes inside a longer prompt. Tokenizers that prepend "▁" to the
        start of a text (LLaMA's SentencePiece, Metaspace prepend_scheme "first") would add one to
        every piece tokenized alone; tokenized after a special token (which splits the text as it
        does inside a prompt) they do not. Other tokenizers: the same as `tokenize`."""
        if not prepends_space(self.tokenizer):
            return self.tokenize(text)
        anchor = self.tokenizer.eos_token or self.tokenizer.bos_token
        ids = self.tokenize(anchor + text)
        return ids[1:]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., T) ids -> (..., T, D) input embeddings."""
        return self.model.get_input_embeddings()(ids)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """Run (B, T, D) embeddings after `state`'s prefix; returns last-position logits (B, V)."""
        state = state or LMState()
        logits, cache = self.forward_cached(embeds, state.cache, gate_rows=state.adapter)
        return logits, LMState(cache, state.length + embeds.shape[1], state.adapter)

    @torch.inference_mode()
    def forward_cached(
        self,
        embeds: torch.Tensor,
        cache: object | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        gate_rows: bool | Sequence[bool] = False,
    ) -> tuple[torch.Tensor, object]:
        """The runtime seam: (B, T, D) embeddings after `cache` (a DynamicCache of P positions, or
        None) -> (last-position logits (B, V) float32, the cache grown to P + T). attention_mask
        (B, P + T) (0 = padding) and position_ids (B, T) for left-padded batches (model/batching.py);
        None: every position is real and positions continue from P. gate_rows: the adapter gate,
        one flag or one per row."""
        if self.onnx is not None:
            return self.onnx.forward(embeds, cache, attention_mask, position_ids, gate_rows)
        # The decoder body, then the LM head on the last position only, as a 2-D (B, D) input:
        # HF's logits_to_keep slice has strides that send bf16 matmuls down a path ~20x slower.
        with self.gated(gate_rows):
            out = self.model.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1, :])  # (B, V)
        return logits.float(), out.past_key_values

    def decode(self, token_ids: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """One step: (B,) token ids -> next logits (B, V), state advanced by one."""
        return self.prefill(self.embed(token_ids[:, None]), state)

    def loss(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is not -100.

        embeds (B, T, D), attention_mask (B, T), labels (B, T) aligned with the inputs (position
        t's logits predict labels[t + 1]). The LM head runs only on supervised positions: most of
        a VLM sample is prompt and image, and the 49152-wide head is ~20% of the model's FLOPs.
        attention_mask may instead be (B, 1, T, T) bool (True = may attend) with position_ids
        (B, T): packed independent turns (train/collate.py).
        """
        logits, targets, _ = self.supervised_logits(embeds, attention_mask, labels, position_ids)
        return F.cross_entropy(logits.float(), targets)

    def supervised_logits(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        adapter: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LM head's logits at the supervised positions only: (logits (n, V), their targets
        (n,), the (B, T-1) bool mask of where they are), inputs as for `loss`; `adapter`: run
        with an attached (gated) LoRA adapter on. (Training wraps the LM with peft instead.)"""
        with self.gated(adapter):
            hidden = self.model.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=self._mask(attention_mask, embeds.dtype),
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state  # (B, T, D)
        targets = labels[:, 1:]  # (B, T-1)
        supervised = targets != -100
        return self.model.get_output_embeddings()(hidden[:, :-1][supervised]), targets[supervised], supervised

    def compile_layers(self) -> None:
        """torch.compile each decoder layer in place (`nn.Module.compile`: parameter names, and so
        checkpoints and LoRA adapters, stay as they are). The layers share one graph (dynamic
        shapes: every batch has its own length), compiled on the first steps; inductor fuses the
        norms, rotary embedding, activations and dtype casts between the matrix products, about
        45% of a CPU training step in eager mode (python -m vlchat.bench.train --set compile=true).
        Inductor builds its kernels with a C++ compiler ($CXX, else g++), checked here, before any step."""
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise VlchatError(
                f"compile: true needs a C++ compiler for torch.compile and {compiler!r} is not on "
                "PATH; install g++ (or set CXX) or set compile: false"
            )
        for layer in self.model.get_decoder().layers:
            layer.compile(dynamic=True)

    def _mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A 4D bool mask as the attention kernel takes it: sdpa takes bool as is; eager adds the
        mask to the scores, so it becomes 0 / the most negative `dtype` value (as HF's own masks)."""
        if attention_mask.ndim != 4 or self.model.config._attn_implementation != "eager":
            return attention_mask
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return additive.masked_fill(~attention_mask, torch.finfo(dtype).min)


def prepends_space(tokenizer) -> bool:
    """Whether the tokenizer prepends "▁" to the first word of a text (Metaspace or Prepend normaliser)."""
    cached = getattr(tokenizer, "_vlchat_prepends_space", None)
    if cached is None:
        import json

        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
        cached = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
        cached = cached and bool(tokenizer.eos_token or tokenizer.bos_token)
        tokenizer._vlchat_prepends_space = cached
    return cached


def load_language_model(config: LMConfig, device: str = "cpu") -> LanguageModel:
    """Load the LM (frozen, eval mode) from a package GGUF, a local directory or the hub; quantized
    or spread over GPUs as `config` asks (model/placement.py), else on the CPU for the caller to move."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    where = lm_directory(config.source, config.sha256)
    try:
        trust = {"trust_remote_code": config.trust_remote_code}  # explicit False: transformers never prompts
        tokenizer = AutoTokenizer.from_pretrained(where, **trust)
        # runtime onnx: the graph is built from float32 weights (the torch model then only embeds)
        dtype = torch.float32 if config.runtime == "onnx" else resolve_dtype(config.dtype, device)
        placed = pretrained_kwargs(dtype, device, config.load_in, config.device_map)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placed, **trust)
    except OSError as error:  # hub unreachable, missing files
        raise VlchatError(f"cannot load language model {config.source!r}: {str(error).splitlines()[0]}") from None
    gate = attach_adapter(model, config.adapter) if config.adapter else None
    model.eval().requires_grad_(False)
    lm = LanguageModel(model, tokenizer, config.context_window, gate)
    if config.runtime == "onnx":
        if device != "cpu":
            raise VlchatError(f"lm runtime onnx runs on the CPU only, not {device!r}: use --device cpu")
        lm.onnx = onnx_decoder(lm, config, where)
    return lm


def onnx_decoder(lm: LanguageModel, config: LMConfig, where: str):
    """The ONNX Runtime decoder of `lm`, its graph cached under the LM cache (vlchat_home()/lm),
    keyed by the weights' and the adapter's files, the quantisation and the builder version."""
    from vlchat.assets import resolve, vlchat_home
    from vlchat.model.onnx_lm import OnnxDecoder, files_identity

    weights = Path(where) if Path(where).is_dir() else None  # a hub id: the HF cache's snapshot otherwise
    identity = {
        "source": config.source,
        "weights": files_identity(weights) if weights else where,
        "adapter": files_identity(resolve(config.adapter)) if config.adapter else None,
        "positions": lm.context_window,
    }
    return OnnxDecoder(lm.model, config.onnx_weights, lm.context_window, vlchat_home() / "lm", identity)


def merge_adapter(model: nn.Module, spec: str) -> nn.Module:
    """Fold a peft LoRA adapter into the weights (W + B·A·alpha/r), returning a plain HF model: for
    text-only models, which have no images to switch a gated adapter (`attach_adapter`) on."""
    from peft import PeftModel

    path = resolve(spec)
    if not (path / "adapter_config.json").is_file():
        raise VlchatError(f"LoRA adapter {spec!r} not found (expected a peft directory with adapter_config.json)")
    with warnings.catch_warnings():  # peft calls a transformers API that warns of its own rename
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
