"""Training recipes as data: a typed config loaded from YAML, with `key=value` overrides.

Freezing is configuration (`lm: frozen|lora|full`, after torchtune's `*_trainable` fields); the
stage only decides defaults (stage 1: captions, projector only; stage 2: conversations). The
defaults are those the default model was trained with: its preset's projector, its LoRA shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vlchat.config import PRESETS, REMOVED_PROJECTOR_FIELDS, ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config

STAGES = ("stage1", "stage2")
# The projector fields a recipe may set (`projector: {kind: linear, position_code: 0}`); the rest
# of the projector (in_dim, out_dim: the vision and LM widths) comes from the model.
PROJECTOR_KEYS = ("kind", "position_tokens", "position_code")
# Keys of older recipes, refused with what to write instead.
OLD_KEYS = {
    "position_tokens": "is now projector: {position_tokens: N}",
    "projector_position_code": "is now projector: {position_code: X}",
    "projector_output_rms": "was removed (RMS-normalised projector outputs did not help); delete it",
    "deepspeed": "was removed (the DeepSpeed ZeRO-2 path was never run: no GPU and no installable DeepSpeed "
    "wheel where vlchat is built); delete it and use torchrun (DDP)",
    "loss_weighting": "was removed (the loss is the mean over supervised tokens; weighting by answer did not help); "
    "delete it",
}


@dataclass(frozen=True)
class DataSource:
    spec: str  # "synth:qa", "synth:caption", "easy_vqa:train", or a path (see train/data.py)
    samples: int | None = None  # use the first N samples (synthetic sources need it)
    lang: str = "en"  # synthetic sources: en | zh | both
    turns: int = 1  # questions per conversation (synthetic qa, easy_vqa)
    seed_offset: int = 0  # synthetic sources: first seed
    # Turns are separate questions about the first turn's image: train each as if asked alone
    # (shared-prefix packing, train/collate.py). For QA sets, not for real conversations.
    independent_turns: bool = False
    repeat: int = 1  # list the source this many times per epoch (its share of the mix)
    # easy_vqa: half of each image's yes/no questions ask about what it shows (train/data_easyvqa.py)
    balance_yes_no: bool = False
    # easy_vqa, English synth:qa: yes/no answers give their reason first: "It is blue, so no.",
    # "The star is red, so no."
    explain_yes_no: bool = False
    qtypes: tuple[str, ...] | None = None  # synth:qa: ask only these question types (None: all)
    max_objects: int = 4  # synthetic sources: 1 to this many objects per scene (4: the usual scenes)


def _default_projector() -> ProjectorConfig:
    return PRESETS["default"].projector


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "stage1"
    model: str = "default"  # model preset or model config file (vision + LM + template)
    # The projector to train. A recipe's `projector:` sets any of PROJECTOR_KEYS; the rest come from
    # the model's own projector (build_config), so the default is the default preset's.
    projector: ProjectorConfig = field(default_factory=_default_projector)
    init_projector: str | None = None  # start from these weights (stage 2 starts from stage 1)
    # lm: lora: start the adapter from a run's `lora` folder (train on from an earlier run), not zero
    init_adapter: str | None = None
    lm: str = "frozen"  # frozen | lora | full
    # lm: lora: the adapter's shape, as the default model's (vlchat/weights/default-lora)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # The LM's attention kernel while training. "auto": "eager" on CPU (PyTorch's CPU flash kernel
    # made a 2-core training step 1.4x slower here; serving keeps sdpa, faster for decoding),
    # "sdpa" on GPUs.
    attention: str = "auto"
    # bfloat16 autocast around forward and loss (float32 master weights): "auto" on GPUs only,
    # "bf16" also on CPU (1.18x faster stage-2 steps on this 2-core CPU: python -m
    # research.bench_step), "off" never.
    autocast: str = "auto"
    # torch.compile the LM's decoder layers (LanguageModel.compile_layers): same math, fused
    # element-wise work; the first two steps pay the compile (about 35 s on 2 CPU cores). The default
    # model's recipes turn it on (docs/training.md).
    compile: bool = False
    data: tuple[DataSource, ...] = ()
    template: str | None = None  # None: the model's
    system: str | None = None  # None: the template's default system prompt (as at inference)
    max_tokens: int = 512  # longer samples are refused by `vlchat data check` and skipped here
    batch_size: int = 8  # per process
    grad_accum: int = 1
    length_groups: int = 2  # a batch runs as up to this many similar-length groups (collate.length_groups)
    # Merge the samples of a micro-batch that begin with the same tokens (system prompt, offered
    # tools) into one row, the shared prefix once (train/packing.py); before length grouping. The
    # same loss and gradients; fewer tokens through the LM.
    pack_shared_prefix: bool = False
    pack_min_prefix: int = 64  # tokens a sample must share to join a row
    # The longest packed row. A row with branches takes a 4D mask, with which sdpa on CPU keeps
    # (heads, T, T) scores per layer for backward: a row of 3,801 tokens of the default model
    # peaked at 11.3 GB (1 step of configs/train/tool-use.yaml), rows of at most 1,100 at 3.2 GB.
    pack_max_tokens: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_steps: int = 100
    seed: int = 0
    output_dir: str = "runs/stage1"
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 5
    # Every N steps (0 = never) score held-out synthetic questions (train/probe.py): per-type answer
    # loss and exactness in metrics.jsonl, about as costly as one training step per 16 scenes.
    probe_every: int = 0
    probe_scenes: int = 16

    def __post_init__(self) -> None:
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}"),
            (self.lm in ("frozen", "lora", "full"), f"lm must be frozen, lora or full, got {self.lm!r}"),
            (self.init_adapter is None or self.lm == "lora", f"init_adapter needs lm: lora, not {self.lm!r}"),
            (
                isinstance(self.projector, ProjectorConfig),
                f"projector must be a ProjectorConfig, got {self.projector!r}",
            ),
            (len(self.data) > 0, "data: give at least one data source"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (
                self.attention in ("auto", "eager", "sdpa"),
                f"attention must be auto, eager or sdpa, got {self.attention!r}",
            ),
            (self.autocast in ("auto", "bf16", "off"), f"autocast must be auto, bf16 or off, got {self.autocast!r}"),
            (isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}"),
            (1 <= self.length_groups <= 8, f"length_groups must be 1..8, got {self.length_groups}"),
            (
                isinstance(self.pack_shared_prefix, bool),
                f"pack_shared_prefix must be true or false, got {self.pack_shared_prefix!r}",
            ),
            (self.pack_min_prefix >= 1, f"pack_min_prefix must be >= 1, got {self.pack_min_prefix}"),
            (
                not self.pack_shared_prefix or self.pack_max_tokens >= self.max_tokens,
                f"pack_max_tokens ({self.pack_max_tokens}) must be >= max_tokens ({self.max_tokens})",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1"),
            (self.probe_every >= 0 and self.probe_scenes >= 1, "probe_every must be >= 0 and probe_scenes >= 1"),
            (self.max_tokens >= 16, f"max_tokens must be >= 16, got {self.max_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VlchatError(f"bad training config: {message}")

    @property
    def explains_synthetic_yes_no(self) -> bool:
        """Whether the recipe trains "is there ...?" with its reason first (the probe follows)."""
        return any(source.explain_yes_no and source.spec == "synth:qa" for source in self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML ('3' -> 3, 'null' -> None, '[a, b]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], item: str) -> None:
    """'a.b=value' sets data['a']['b'] (data sources by index: 'data.0.samples=100'; projector
    fields by name: 'projector.position_code=0')."""
    if "=" not in item:
        raise VlchatError(f"override {item!r} must look like key=value")
    key, _, value = item.partition("=")
    *parents, last = key.strip().split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = parse_value(value)
    else:
        node[last] = parse_value(value)


def data_source(entry: dict[str, Any] | str) -> DataSource:
    """One `data:` entry: a mapping of DataSource fields, or just a spec."""
    if not isinstance(entry, dict):
        return DataSource(spec=str(entry))
    if isinstance(entry.get("qtypes"), (list, tuple)):  # a YAML list, kept as a tuple (hashable, like the rest)
        entry = {**entry, "qtypes": tuple(entry["qtypes"])}
    return DataSource(**entry)


def projector_mapping(given: Any) -> Any:
    """A recipe's `projector:` as a mapping: none given is {}, a kind name is {kind: NAME}."""
    if given is None:
        return {}
    return {"kind": given} if isinstance(given, str) else given


def recipe_projector(model: str, given: Any) -> ProjectorConfig:
    """The model's own projector with the recipe's `projector:` fields (PROJECTOR_KEYS) over it."""
    given = projector_mapping(given)
    if not isinstance(given, dict):
        raise VlchatError(f"projector must be a mapping of {', '.join(PROJECTOR_KEYS)}, got {given!r}")
    if not isinstance(model, str):
        raise VlchatError(f"model must be a preset name or a model config file, got {model!r}")
    base = model_config(model).projector
    for key in sorted(set(given) - set(PROJECTOR_KEYS)):
        if key in ("in_dim", "out_dim"):
            raise VlchatError(
                f"projector {key} comes from the model (model {model}: {base.in_dim} -> {base.out_dim}); delete it"
            )
        if key in REMOVED_PROJECTOR_FIELDS:
            raise VlchatError(f"projector {key} was removed (RMS-normalised projector outputs did not help); delete it")
        raise VlchatError(f"unknown projector key {key!r}; a recipe may set {', '.join(PROJECTOR_KEYS)}")
    return replace(base, **given)


def build_config(raw: dict[str, Any], where: str) -> TrainConfig:
    old = [key for key in OLD_KEYS if key in raw]
    if old:
        raise VlchatError(f"{where}: {'; '.join(f'{key} {OLD_KEYS[key]}' for key in old)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise VlchatError(f"{where}: unknown training config keys: {', '.join(sorted(unknown))}")
    raw = dict(raw)
    try:
        raw["projector"] = recipe_projector(raw.get("model", TrainConfig.model), raw.get("projector"))
        data = raw.get("data") or ()
        data = [data] if isinstance(data, (str, dict)) else data  # one source without a list around it
        raw["data"] = tuple(data_source(d) for d in data)
        if "lora_targets" in raw:
            raw["lora_targets"] = tuple(raw["lora_targets"])
        floats = {"lr", "weight_decay", "lora_dropout"}  # YAML 1.1 reads `1e-4` (no dot) as a string
        raw.update({k: float(v) for k, v in raw.items() if k in floats and isinstance(v, str)})
        return TrainConfig(**raw)
    except (TypeError, ValueError) as error:  # ValueError: float("abc"); a VlchatError gains the path
        raise VlchatError(f"{where}: {error}") from None


def load_config(path: str | Path, overrides: list[str] = (), stage: str | None = None) -> TrainConfig:
    """Read a YAML recipe, apply overrides, validate. A clear error before any compute is spent."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise VlchatError(f"cannot read training config {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise VlchatError(f"{path}: a training config must be a YAML mapping")
    if "projector" in raw:  # so that 'projector.position_code=0' also applies over `projector: linear`
        raw["projector"] = projector_mapping(raw["projector"])
    for item in overrides:
        try:
            apply_override(raw, item)
        except VlchatError:  # already says what is wrong (a VlchatError is a ValueError)
            raise
        except (IndexError, ValueError, TypeError, AttributeError):
            raise VlchatError(f"override {item!r} does not fit the config in {path}") from None
    if stage is not None:
        if raw.get("stage", stage) != stage:
            raise VlchatError(f"{path} is a {raw['stage']} recipe; run it with `vlchat train {raw['stage']}`")
        raw["stage"] = stage
    return build_config(raw, str(path))
