"""Safe weight reading and strict loading for Hugging Face checkpoint directories.

Weights are read as safetensors (single file or sharded with an index) or, for old `.bin` files,
with `torch.load(weights_only=True)`: no pickled code runs. Every key or shape problem is one
VlchatError line that names the key and the likely cause.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from vlchat.errors import VlchatError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def yaml_block(path: Path, key: str, quiet: bool = False) -> object | None:
    """The value under `key` of a YAML file's top-level mapping (None if absent); an unreadable
    file is None when `quiet` (a loader probing whether the file is its kind), else one line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        if quiet:
            return None
        raise VlchatError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    return data.get(key) if isinstance(data, dict) else None


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred; VlchatError when there are none."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as error:
                raise VlchatError(f"cannot read the weight index {index}: {error}") from None
            missing = [name for name in shards if not (directory / name).is_file()]
            if missing:
                raise VlchatError(
                    f"{directory} lacks the weight shard {missing[0]} named in {index_name} (incomplete download?)"
                )
            return [directory / name for name in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise VlchatError(f"{directory} has no weights (model.safetensors, its shards, or pytorch_model.bin)")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, as stored (dtype kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise VlchatError(f"cannot read weights {path}: {reason} (corrupt or incomplete file?)") from None
    return state


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape, read from the files' headers (safetensors) or memory-mapped
    (`.bin`): cheap enough to check a checkpoint's layout before anything loads."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(directory):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
            else:
                shapes.update({key: tuple(value.shape) for key, value in _load_weights_only(path).items()})
        except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise VlchatError(f"cannot read weights {path}: {reason} (corrupt or incomplete file?)") from None
    return shapes


def torch_load_tensors(path: Path, what: str) -> dict:
    """A `.pth`/`.bin` file read with `torch.load(weights_only=True)`: tensors and plain containers
    only. A file that pickles other Python objects (which could run code) is refused in one line."""
    if not path.is_file():
        raise VlchatError(f"the {what} file {path} does not exist")
    try:
        data = _load_weights_only(path)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise VlchatError(
            f"refused to load {path}: it pickles Python objects{f' ({found[1]})' if found else ''}, not only "
            "tensors; vlchat reads weights with torch.load(weights_only=True) and runs no code from a checkpoint"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VlchatError(f"cannot read the {what} file {path}: {reason} (corrupt or incomplete file?)") from None
    if not isinstance(data, dict):
        raise VlchatError(f"the {what} file {path} holds a {type(data).__name__}, not a dict of weights")
    return data


def _load_weights_only(path: Path):
    """Memory-mapped where the file allows it (zip format), else read whole (the legacy format)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def rename_keys(state: dict[str, torch.Tensor], prefixes: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Keys starting with one of the old prefixes get its new prefix (first match wins); others are dropped."""
    out = {}
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
    return out


def load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, tied: Iterable[str] = (), assign: bool = False
) -> None:
    """Load `state` into `module` exactly: every expected key present (`tied` ones may be absent),
    none extra, every shape equal; else one VlchatError line naming the first offending key."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state and key not in set(tied)]
    if missing:
        raise VlchatError(
            f"the checkpoint lacks the {what} weight {missing[0]!r} ({len(missing)} missing): "
            "not this model family's layout, or an incomplete download"
        )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise VlchatError(
            f"the checkpoint has a {what} weight {extra[0]!r} the model does not ({len(extra)} extra): "
            "config.json describes a different architecture than the weights"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise VlchatError(
                f"{what} weight {key!r} is {tuple(value.shape)} in the checkpoint but {tuple(expected[key].shape)} "
                "in the model built from config.json: the config and the weights belong to different models"
            )
    module.load_state_dict(state, strict=False, assign=assign)


def build_frozen(
    factory: Callable[[], nn.Module],
    state: dict[str, torch.Tensor],
    what: str,
    dtype: torch.dtype,
    tied: Iterable[str] = (),
) -> nn.Module:
    """Build a module with empty (meta) parameters, put the checkpoint's tensors in place, cast to
    `dtype`, and freeze it (eval, no grad). Buffers stay real (rotary tables are computed at init)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    load_strict(module, state, what, tied, assign=True)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    left = [name for name, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise VlchatError(f"the {what} weight {left[0]!r} was not loaded (tied to nothing in the checkpoint)")
    return module.to(dtype).eval().requires_grad_(False)


def pretrained_strict(cls: type, directory: Path, dtype: torch.dtype, what: str, **kwargs) -> nn.Module:
    """`cls.from_pretrained(directory, **kwargs)` that refuses missing or mismatched weights instead of
    initialising them randomly (transformers only warns). `kwargs`: placement (model/placement.py) etc."""
    try:
        model, info = cls.from_pretrained(directory, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        raise VlchatError(f"cannot load the {what} from {directory}: {str(error).splitlines()[0]}") from None
    for kind in ("missing_keys", "mismatched_keys"):
        problems = sorted(info.get(kind) or [])
        if problems:
            raise VlchatError(
                f"the {what} in {directory} has {kind.replace('_', ' ')} such as {problems[0]!r}: "
                "the weights do not fit its config.json (another model, or an incomplete download)"
            )
    return model.eval().requires_grad_(False)
