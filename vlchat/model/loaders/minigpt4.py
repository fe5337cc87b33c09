"""MiniGPT-4 from its own release files, named by one of its eval configs (`eval_configs/minigpt4_eval.yaml`,
`minigpt4_llama2_eval.yaml`) given as --model. The YAML's `model:` block says:
- `arch: minigpt4`, `model_type: pretrain_vicuna0` (Q-Former, Vicuna v0 prompt) or `pretrain_llama2`
  (no Q-Former, LLaMA-2-chat prompt); `has_qformer` may override the model type's default;
- `ckpt`: the projection, `pretrained_minigpt4*.pth` = {"model": {"llama_proj.weight", "llama_proj.bias"}};
- `llama_model`: the LM, a Hugging Face LLaMA directory (Vicuna v0 or LLaMA-2-chat). MiniGPT-4 itself
  reads it from `minigpt4/configs/models/*.yaml`; vlchat reads the eval YAML only, so it must be set there;
- `q_former_model` (optional): `blip2_pretrained_flant5xxl.pth` = {"model": {"ln_vision.*", "query_tokens",
  "Qformer.bert.*", ...}}; its other parts (the T5 projection, the Q-Former's text-only layers) are unused;
- the EVA ViT-g, `eva_vit_g.pth` (a bare state dict), and a Q-Former file given only as a URL, are
  looked up beside the YAML, beside `ckpt`, and in the cache MiniGPT-4 downloads them to (torch hub
  `checkpoints/`). Relative paths are read from the YAML's folder.
MiniGPT-4 loads the three files in that order into one model, later files overriding earlier keys
(`load_state_dict(strict=False)`); vlchat merges them the same way, then loads each part strictly.
Every file is read with torch.load(weights_only=True). Image preprocessing is its `blip2_image_eval`:
a bicubic resize to image_size x image_size, CLIP's mean and std.
Reference: https://github.com/Vision-CAIR/MiniGPT-4 `minigpt4/models/minigpt4.py`, `minigpt_base.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vlchat.config import LMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vlchat.errors import VlchatError

EVA_FILE = "eva_vit_g.pth"
QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_TYPES = {"pretrain_vicuna0": ("minigpt4_vicuna0", True), "pretrain_llama2": ("minigpt4_llama2", False)}
LM_SIZES = {4096: "7B", 5120: "13B", 8192: "70B"}  # LLaMA hidden width -> model size
BERT_HEAD_DIM = 64  # the Q-Former is BERT-base: 12 heads of 64
# Q-Former parts only its text path uses (MiniGPT-4 deletes them): dropped from the BLIP-2 file
QFORMER_UNUSED = re.compile(
    r"Qformer\.(cls\.|bert\.embeddings\.(word|position)|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)
QFORMER_RENAMES = (
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
)


@dataclass(frozen=True)
class MiniGPT4Files:
    """What one eval YAML names, resolved to local files."""

    yaml: Path
    template: str
    has_qformer: bool
    ckpt: Path
    llama_model: Path
    eva: Path
    qformer: Path | None
    image_size: int


def is_minigpt4_yaml(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and isinstance(_model_block(path, quiet=True), dict)


def _model_block(path: Path, quiet: bool = False) -> dict | None:
    from vlchat.model.loaders.checkpoint import yaml_block

    block = yaml_block(path, "model", quiet)
    return block if isinstance(block, dict) and "arch" in block else None


def read_eval_config(path: Path) -> MiniGPT4Files:
    block = _model_block(path)
    arch, model_type = block.get("arch"), block.get("model_type")
    if arch != "minigpt4":
        raise VlchatError(f"{path}: arch {arch!r} is not supported; vlchat loads MiniGPT-4 (arch minigpt4)")
    if model_type not in MODEL_TYPES:
        raise VlchatError(f"{path}: unknown model_type {model_type!r}; MiniGPT-4's are {', '.join(MODEL_TYPES)}")
    if block.get("vit_model", "eva_clip_g") != "eva_clip_g":
        raise VlchatError(f"{path}: vit_model {block['vit_model']!r} is not supported (MiniGPT-4 uses eva_clip_g)")
    template, has_qformer = MODEL_TYPES[model_type]
    has_qformer = bool(block.get("has_qformer", has_qformer))
    base = path.parent
    ckpt = _local(base, block.get("ckpt"), "ckpt", "the pretrained_minigpt4*.pth projection")
    llama = _local(base, block.get("llama_model"), "llama_model", "the Vicuna / LLaMA-2-chat directory")
    if not (llama / "config.json").is_file():
        raise VlchatError(f"{path}: llama_model {llama} is not a Hugging Face model directory (no config.json)")
    folders = [base, ckpt.parent, Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub/checkpoints"]
    entry = block.get("q_former_model")  # MiniGPT-4's default: LAVIS's URL, downloaded to the cache
    qformer = None
    if has_qformer and (entry is None or "://" in str(entry)):
        qformer = _find(folders, Path(str(entry or QFORMER_FILE)).name, path)
    elif has_qformer:
        qformer = _local(base, entry, "q_former_model", "blip2_pretrained_flant5xxl.pth")
    return MiniGPT4Files(
        yaml=path,
        template=template,
        has_qformer=has_qformer,
        ckpt=ckpt,
        llama_model=llama,
        eva=_find(folders, EVA_FILE, path),
        qformer=qformer,
        image_size=int(block.get("image_size", 224)),
    )


def _local(base: Path, value, key: str, what: str) -> Path:
    if not isinstance(value, str) or not value or value.startswith("please set"):
        raise VlchatError(f"the MiniGPT-4 config sets no model.{key}: give the path of {what}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise VlchatError(f"model.{key} {path} does not exist")
    return path


def _find(folders: list[Path], name: str, yaml: Path) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise VlchatError(f"{name} not found beside {yaml}, beside the ckpt, or in {folders[-1]}: put it in one of them")


def model_config(path: Path) -> ModelConfig:
    """The ModelConfig for a MiniGPT-4 eval YAML: geometry read from the files' tensor shapes
    (memory-mapped), the projection's fit to the LM checked before anything heavy loads."""
    files = read_eval_config(path.resolve())
    state = merged_state(files)
    vit_width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    lm_width = check_projection(files, state)
    return ModelConfig(
        name=files.yaml.stem,
        vision=VisionConfig(
            name="eva_vit_g",
            image_size=files.image_size,
            weights=None,
            sha256=None,
            source=str(files.eva),
            patch_size=patch,
            keep_cls=True,
        ),
        projector=ProjectorConfig(
            kind="qformer" if files.has_qformer else "concat4", in_dim=vit_width, out_dim=lm_width
        ),
        lm=LMConfig(source=str(files.llama_model), sha256=None),
        template=files.template,
        projector_weights=None,
        checkpoint=str(files.yaml),
    )


def merged_state(files: MiniGPT4Files) -> dict[str, torch.Tensor]:
    """MiniGPT-4's module names -> tensors, the three files merged in its order (later wins)."""
    from vlchat.model.loaders.checkpoint import torch_load_tensors

    state = {f"visual_encoder.{k}": v for k, v in torch_load_tensors(files.eva, "EVA ViT-g").items()}
    if files.qformer is not None:
        state.update(_model_dict(torch_load_tensors(files.qformer, "BLIP-2 Q-Former"), files.qformer))
    state.update(_model_dict(torch_load_tensors(files.ckpt, "MiniGPT-4 projection"), files.ckpt))
    for key, where in (("visual_encoder.cls_token", files.eva), ("llama_proj.weight", files.ckpt)):
        if key not in state:
            raise VlchatError(f"{where} lacks the weight {key.split('.', 1)[-1]!r}: not MiniGPT-4's release layout")
    lm_keys = [k for k in state if k.startswith("llama_model.")]
    if lm_keys:
        raise VlchatError(
            f"{files.ckpt} holds LM weights such as {lm_keys[0]!r} (LoRA, MiniGPT-v2?): only MiniGPT-4's projection "
            "checkpoints are supported"
        )
    return state


def _model_dict(data: dict, path: Path) -> dict[str, torch.Tensor]:
    state = data.get("model")
    if not isinstance(state, dict):
        raise VlchatError(f"{path} has no 'model' dict of weights (keys: {', '.join(map(str, list(data)[:5]))})")
    return state


def check_projection(files: MiniGPT4Files, state: dict[str, torch.Tensor]) -> int:
    """The LM's width, once the projection is known to fit it and the vision side; else one line."""
    try:
        lm_width = int(json.loads((files.llama_model / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VlchatError(f"cannot read hidden_size from {files.llama_model / 'config.json'}: {error}") from None
    out_dim, in_dim = state["llama_proj.weight"].shape
    if out_dim != lm_width:
        want = LM_SIZES.get(lm_width, f"{lm_width}-wide")
        raise VlchatError(
            f"llama_proj in {files.ckpt.name} is {out_dim}-wide but the LM {files.llama_model.name} is {lm_width}: "
            f"use the {want} checkpoint (MiniGPT-4 publishes one per LM size)"
        )
    vit_width = state["visual_encoder.cls_token"].shape[-1]
    expected = state["query_tokens"].shape[-1] if files.has_qformer and "query_tokens" in state else 4 * vit_width
    if in_dim != expected:
        source = "the Q-Former" if files.has_qformer else "4 concatenated ViT tokens"
        other = "pretrain_llama2 (no Q-Former)" if files.has_qformer else "pretrain_vicuna0 (Q-Former)"
        raise VlchatError(
            f"llama_proj in {files.ckpt.name} reads {in_dim}-wide inputs but {source} give {expected}: "
            f"the checkpoint belongs to the other variant, model_type {other}"
        )
    return lm_width


def load(config: ModelConfig, path: Path):
    """vlchat's EVA encoder, connector and LM with MiniGPT-4's weights, frozen; the parts in the config's
    dtype on its device, the LM also quantized or device-mapped as asked (model/placement.py)."""
    from vlchat.model.eva_vit import EvaVisionEncoder, EvaVit, EvaVitConfig
    from vlchat.model.hf_vision import ImagePreprocess
    from vlchat.model.loaders.checkpoint import build_frozen, rename_keys
    from vlchat.model.loaders.text import load_causal_lm
    from vlchat.model.placement import lm_placement
    from vlchat.model.vlm import VisionLanguageModel

    if config.lm.adapter:
        raise VlchatError("a LoRA adapter on a MiniGPT-4 model is not supported")
    files = read_eval_config(path)
    state = merged_state(files)
    check_projection(files, state)
    dtype, _ = lm_placement(config)  # the model's dtype on its (resolved) device, as the other loaders
    vit_state = rename_keys(state, (("visual_encoder.", ""),))
    vit_config = EvaVitConfig.from_state(vit_state, str(files.eva))
    if vit_config.image_size != files.image_size:
        raise VlchatError(
            f"{files.eva.name} has position embeddings for {vit_config.image_size} px images but {path.name} "
            f"says image_size {files.image_size}"
        )
    unused = f"blocks.{vit_config.depth}."  # the file's last block: BLIP-2 and MiniGPT-4 build one fewer
    vit_state = {k: v for k, v in vit_state.items() if not k.startswith(unused)}
    vit = build_frozen(lambda: EvaVit(vit_config), vit_state, f"EVA ViT ({files.eva.name})", dtype)
    preprocess = ImagePreprocess(
        shortest_edge=None,
        size=(files.image_size, files.image_size),
        crop=None,
        resample=3,  # bicubic
        rescale=1 / 255,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )
    vision = EvaVisionEncoder(vit, preprocess)
    ln_state = rename_keys(state, (("ln_vision.", ""),))
    if ln_state or files.has_qformer:  # the LLaMA-2 variant trains none: LayerNorm's init (1, 0)
        _load_into(vision.ln_vision, ln_state, "ln_vision", files)
    vision = vision.eval().requires_grad_(False)
    connector = build_connector(files, state, vit_config, dtype)
    lm = load_causal_lm(config, files.llama_model)  # quantized or device-mapped as the options ask
    del state
    with torch.no_grad():
        return VisionLanguageModel(config, vision, connector, lm).eval()


def _load_into(module, state: dict, what: str, files: MiniGPT4Files) -> None:
    from vlchat.model.loaders.checkpoint import load_strict

    load_strict(module, state, f"{what} ({files.qformer.name if files.qformer else files.ckpt.name})")


def build_connector(files: MiniGPT4Files, state: dict, vit_config, dtype):
    """The Q-Former + llama_proj (as vlchat's QFormerProjector), or the 4-token concatenation + llama_proj."""
    from vlchat.model.concat_projector import ConcatProjector
    from vlchat.model.loaders.checkpoint import build_frozen, load_strict, rename_keys

    proj = rename_keys(state, (("llama_proj.", "llama_proj."),))
    if not files.has_qformer:
        connector = ConcatProjector(vit_config.width, proj["llama_proj.weight"].shape[0], vit_config.grid**2)
        load_strict(connector, proj, f"projection ({files.ckpt.name})")
        return connector.to(dtype).eval().requires_grad_(False)
    from vlchat.model.qformer import QFormerProjector

    qstate = {"language_projection." + k[len("llama_proj.") :]: v for k, v in proj.items()}
    for key, value in state.items():
        if key == "query_tokens":
            qstate[key] = value
        elif key.startswith("Qformer.bert.") and not QFORMER_UNUSED.match(key):
            new = "qformer." + key[len("Qformer.bert.") :].replace("embeddings.LayerNorm.", "layernorm.")
            for old, replacement in QFORMER_RENAMES:
                new = new.replace(old, replacement)
            qstate[new] = value
    qconfig = qformer_config(qstate, vit_config.width, files)
    out_dim = proj["llama_proj.weight"].shape[0]
    connector = build_frozen(
        lambda: QFormerProjector(qconfig, qstate["query_tokens"].shape[1], out_dim),
        qstate,
        f"Q-Former ({files.qformer.name} + {files.ckpt.name})",
        torch.float32,  # as transformers and LAVIS keep it; the projection in the LM's dtype
    )
    connector.language_projection.to(dtype)
    return connector


def qformer_config(qstate: dict, vision_width: int, files: MiniGPT4Files):
    """BERT-base's Q-Former as MiniGPT-4 builds it (cross-attention every 2nd layer), sizes from the shapes."""
    from transformers import Blip2QFormerConfig

    if "query_tokens" not in qstate or "qformer.encoder.layer.0.intermediate_query.dense.weight" not in qstate:
        missing = "query_tokens" if "query_tokens" not in qstate else "Qformer.bert.encoder.layer.0.intermediate_query"
        raise VlchatError(
            f"{files.qformer} lacks the Q-Former weight {missing!r}: not LAVIS's BLIP-2 checkpoint layout"
        )
    hidden = qstate["query_tokens"].shape[-1]
    layers = {int(m[1]) for k in qstate if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    return Blip2QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // BERT_HEAD_DIM),
        intermediate_size=qstate["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        encoder_hidden_size=vision_width,
        cross_attention_frequency=2,
        layer_norm_eps=1e-12,
    )
