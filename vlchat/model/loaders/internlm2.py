"""InternLM2 chat checkpoints (e.g. internlm/internlm2-chat-7b) without remote code.

transformers has no InternLM2 class, and the checkpoint's own modeling code (trust_remote_code) does
not run on transformers 5. InternLM2 is LLaMA's architecture under other names, with the query, key
and value projections packed into one matrix, so vlchat converts the weights once into a LLaMA
checkpoint directory (cached under $VLCHAT_HOME/converted/internlm2/, keyed by the source's config and
weight files) and loads that with transformers' LlamaForCausalLM. Remote code is never run.

Key mapping (InternLM2 -> LLaMA), per layer `model.layers.N.`:
    attention.wqkv       -> self_attn.q_proj, k_proj, v_proj (split below)
    attention.wo         -> self_attn.o_proj
    feed_forward.w1/w3/w2 -> mlp.gate_proj / up_proj / down_proj   (w2(silu(w1 x) * w3 x))
    attention_norm, ffn_norm -> input_layernorm, post_attention_layernorm
and `model.tok_embeddings` -> `model.embed_tokens`, `output` -> `lm_head`, `model.norm` unchanged.
`wqkv` rows are grouped per key-value head h: [q for each of the `groups` query heads of h, k, v],
each head_dim rows ("(h gs d)" with gs = groups + 2, InternLM2Attention.forward). Rotary embedding
is LLaMA's (rotate_half), so no permutation is needed. Template: vlchat's `internlm2`.
Reference: modeling_internlm2.py in the InternLM repositories (read, not run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from vlchat.config import LMConfig, ModelConfig
from vlchat.errors import VlchatError

RENAMES = (  # InternLM2 key part -> LLaMA key part (wqkv is split separately)
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
WQKV = re.compile(r"(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)")
KEPT = re.compile(r"model\.layers\.\d+\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\.|model\.norm\.")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
CONVERTED_MARK = "vlchat-converted.json"


def model_config(directory: Path, raw: dict) -> ModelConfig:
    return ModelConfig(
        name=directory.name,
        vision=None,
        projector=None,
        lm=LMConfig(source=str(directory), sha256=None),
        template="internlm2",
        projector_weights=None,
        checkpoint=str(directory),
    )


def load(config: ModelConfig, directory: Path):
    """Convert once (cached), then load the LLaMA form like any causal LM directory."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from vlchat.model.language import LanguageModel, merge_adapter
    from vlchat.model.loaders.checkpoint import pretrained_strict
    from vlchat.model.loaders.text import load_tokenizer
    from vlchat.model.placement import lm_placement
    from vlchat.model.vlm import VisionLanguageModel

    if config.vision is not None:
        raise VlchatError(f"{directory} is a text-only InternLM2 model; its config cannot have a vision encoder")
    converted = converted_directory(directory)
    dtype, placed = lm_placement(config)
    model = pretrained_strict(LlamaForCausalLM, converted, dtype, "language model", **placed)
    if config.lm.adapter:
        model = merge_adapter(model, config.lm.adapter).eval().requires_grad_(False)
    lm = LanguageModel(model, load_tokenizer(converted), config.lm.context_window)
    return VisionLanguageModel(replace(config, projector=None), None, None, lm).eval()


def converted_directory(directory: Path) -> Path:
    """The LLaMA-layout copy of `directory`, converted now unless a matching one is cached."""
    from vlchat.assets import vlchat_home

    target = vlchat_home() / "converted" / "internlm2" / f"{directory.name}-{fingerprint(directory)}"
    if (target / CONVERTED_MARK).is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(directory, tmp)
        (tmp / CONVERTED_MARK).write_text(json.dumps({"source": str(directory), "from": "internlm2"}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint(directory: Path) -> str:
    """Changes when config.json or any weight file (name, size, mtime) changes."""
    from vlchat.model.loaders.checkpoint import weight_files

    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in weight_files(directory):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def convert(source: Path, out: Path) -> None:
    """Write config.json, the renamed and split weights (one output file per input shard, so memory
    stays at one shard), the tokenizer without remote code, and the generation config."""
    from safetensors.torch import save_file

    from vlchat.model.loaders.checkpoint import weight_files

    raw = json.loads((source / "config.json").read_text())
    llama = llama_config(raw)
    llama.save_pretrained(out)
    shards = weight_files(source)
    weight_map = {}
    for i, path in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        state = convert_state(read_shard(path), llama)
        save_file({k: v.contiguous() for k, v in state.items()}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_tokenizer(source, out)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")


def llama_config(raw: dict):
    """InternLM2's config.json -> transformers' LlamaConfig (same fields, LLaMA's names)."""
    from transformers import LlamaConfig

    try:
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        rope = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000))}
        scaling = raw.get("rope_scaling")
        if scaling:
            rope.update(rope_type=scaling.get("type") or scaling["rope_type"], factor=float(scaling["factor"]))
        bias = bool(raw.get("bias", False))
        return LlamaConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=hidden // heads,
            hidden_act=raw.get("hidden_act", "silu"),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_parameters=rope,
            attention_bias=bias,
            mlp_bias=bias,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_id=raw.get("eos_token_id", 2),
            pad_token_id=raw.get("pad_token_id"),
            architectures=["LlamaForCausalLM"],
        )
    except (KeyError, TypeError, ValueError) as error:
        raise VlchatError(f"InternLM2 config.json lacks or has a bad {error} field") from None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VlchatError(f"cannot read weights {path}: {reason} (corrupt or incomplete file?)") from None


def convert_state(state: dict[str, torch.Tensor], llama) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old checkpoints saved; recomputed from the config
        if match := WQKV.fullmatch(key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(key, value, llama)):
                out[f"{match[1]}.self_attn.{name}.{match[2]}"] = part
            continue
        new = "lm_head." + key[len("output.") :] if key.startswith("output.") else key
        for old, replacement in RENAMES:
            new = new.replace(old, replacement)
        if not (new.startswith(("model.embed_tokens.", "lm_head.")) or KEPT.match(new)):
            raise VlchatError(f"unexpected weight {key!r} in an InternLM2 checkpoint: not InternLM2's key layout")
        out[new] = value
    return out


def split_wqkv(key: str, packed: torch.Tensor, llama) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv (kv_heads * (groups + 2) * head_dim[, hidden]) -> q (heads * head_dim[, hidden]), k, v
    (kv_heads * head_dim[, hidden]); query head h * groups + g reads key-value head h (LLaMA's repeat_kv)."""
    heads, kv_heads, head_dim = llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim
    groups = heads // kv_heads
    rows = (heads + 2 * kv_heads) * head_dim
    if packed.shape[0] != rows or (packed.ndim == 2 and packed.shape[1] != llama.hidden_size):
        expected = (rows, llama.hidden_size)[: packed.ndim]
        raise VlchatError(
            f"weight {key!r} is {tuple(packed.shape)} but config.json's {heads} heads and {kv_heads} key-value heads "
            f"of {head_dim} need {expected}: the config and the weights belong to different models"
        )
    grouped = packed.reshape(kv_heads, groups + 2, head_dim, *packed.shape[1:])  # (h, gs, d[, hidden])
    tail = packed.shape[1:]
    q = grouped[:, :groups].reshape(heads * head_dim, *tail)
    k = grouped[:, groups].reshape(kv_heads * head_dim, *tail)
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *tail)
    return q, k, v


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files, with tokenizer_config.json pointing at transformers' own LLaMA tokenizer
    (InternLM2Tokenizer is SentencePiece BPE as LLaMA's; its class is remote code)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    try:
        config = json.loads((source / "tokenizer_config.json").read_text())
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read {source / 'tokenizer_config.json'}: {error}") from None
    config.pop("auto_map", None)
    if str(config.get("tokenizer_class", "")).startswith("InternLM2Tokenizer"):
        config["tokenizer_class"] = "LlamaTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
