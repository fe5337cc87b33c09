"""`vlchat weights apply-delta`: rebuild a model released as a weight delta against LLaMA (Vicuna v0,
Ziya-LLaMA) from the base and the delta, as FastChat's `apply_delta` does.

Every tensor of the output is delta + base. The delta may have more vocabulary rows than the base
(Vicuna v0 added a pad token: 32001 against LLaMA's 32000): for `embed_tokens` and `lm_head` the base
is added to the delta's first rows and the new rows are the delta's as they are (`embeddings="add"`).
Ziya-LLaMA's delta (Fengshenbang-LM `fengshen/utils/apply_delta.py`) instead holds these two whole,
for its enlarged Chinese vocabulary: `embeddings="delta"` takes them from the delta unchanged. Other
shapes must be equal. The sum is computed in float32 and stored in the delta's dtype. The output takes the
delta's config.json, generation config and tokenizer (its vocabulary is the delta's), and the
delta's shard layout, written as safetensors. Weights are read as safetensors or with
torch.load(weights_only=True); every problem is one VlchatError line naming the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlchat.errors import VlchatError

VOCAB_KEYS = ("embed_tokens.weight", "lm_head.weight")  # rows = vocabulary: the delta may have more
SKIPPED = ("rotary_emb.inv_freq",)  # buffers old checkpoints saved; recomputed at load


EMBEDDINGS = ("add", "delta")


def apply_delta(base: Path, delta: Path, out: Path, embeddings: str = "add") -> Path:
    """Write base + delta to `out` (a new or empty directory); returns `out`."""
    from vlchat.model.loaders.checkpoint import weight_files

    if embeddings not in EMBEDDINGS:
        raise VlchatError(f"--embeddings must be add (Vicuna, FastChat) or delta (Ziya-LLaMA), got {embeddings!r}")
    for flag, directory in (("--base", base), ("--delta", delta)):
        if not directory.is_dir():
            raise VlchatError(f"{flag} {directory}: no such directory")
        if not (directory / "config.json").is_file():
            raise VlchatError(f"{flag} {directory} is not a Hugging Face model directory (no config.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlchatError(f"--out {out} exists and is not an empty directory; give a new one")
    reader = ShardReader(weight_files(base))
    delta_shards = weight_files(delta)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    weight_map: dict[str, str] = {}
    for i, path in enumerate(delta_shards, 1):
        name = (
            "model.safetensors" if len(delta_shards) == 1 else f"model-{i:05d}-of-{len(delta_shards):05d}.safetensors"
        )
        summed = {}
        for key, value in read_tensors(path).items():
            if key.endswith(SKIPPED):
                continue
            whole = embeddings == "delta" and key.endswith(VOCAB_KEYS)
            summed[key] = add_base(key, reader.get(key), value) if key in reader and not whole else value
            seen.add(key)
        save(summed, out / name)
        weight_map.update(dict.fromkeys(summed, name))
    missing = sorted(k for k in reader.keys if k not in seen and not k.endswith(SKIPPED))
    if missing:
        shutil.rmtree(out)
        raise VlchatError(
            f"the delta lacks the base weight {missing[0]!r} ({len(missing)} missing): not a delta of this base model"
        )
    if len(delta_shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_metadata(delta, out)
    return out


def add_base(key: str, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """delta + base; for vocabulary matrices the base fills the delta's first rows."""
    if key.endswith(VOCAB_KEYS) and base.ndim == 2 and delta.ndim == 2:
        if delta.shape[1] != base.shape[1] or delta.shape[0] < base.shape[0]:
            raise VlchatError(
                f"weight {key!r} is {tuple(delta.shape)} in the delta but {tuple(base.shape)} in the base: the delta "
                "must have the base's width and at least its vocabulary (a different model size or base)"
            )
        out = delta.float().clone()  # (V_delta, D)
        out[: base.shape[0]] += base.float()
        return out.to(delta.dtype)
    if base.shape != delta.shape:
        raise VlchatError(
            f"weight {key!r} is {tuple(delta.shape)} in the delta but {tuple(base.shape)} in the base: "
            "the delta was made against another base model (size)"
        )
    return (delta.float() + base.float()).to(delta.dtype)


class ShardReader:
    """The base's tensors by key, one shard in memory at a time (safetensors ones read lazily)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.file_of: dict[str, Path] = {}
        for path in files:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as handle:
                    keys = list(handle.keys())
            else:
                keys = list(read_tensors(path))
            self.file_of.update(dict.fromkeys(keys, path))
        self.keys = list(self.file_of)
        self._path: Path | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        path = self.file_of[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as handle:
                return handle.get_tensor(key)
        if path != self._path:
            self._path, self._tensors = path, read_tensors(path)
        return self._tensors[key]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlchat.model.loaders.checkpoint import torch_load_tensors

    if path.suffix != ".safetensors":
        return torch_load_tensors(path, "weights")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise VlchatError(f"cannot read weights {path}: {str(error).splitlines()[0]}") from None


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def copy_metadata(delta: Path, out: Path) -> None:
    """Everything in the delta directory but its weights: config, generation config, tokenizer files."""
    for path in delta.iterdir():
        weights = path.suffix in (".safetensors", ".bin", ".pth", ".pt") or path.name.endswith(".index.json")
        if path.is_file() and not weights:
            shutil.copy(path, out / path.name)
