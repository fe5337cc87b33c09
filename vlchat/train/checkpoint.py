"""Training checkpoints, written atomically: a killed run never leaves a file that loads wrong.

Each checkpoint is `checkpoints/step-NNNNNNN.pt`, written to a temporary file, fsync-ed and
renamed into place, so every `step-*.pt` present is complete. It holds the trainable weights,
optimizer, scheduler, RNG state and step: enough for `--resume` to continue exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PATTERN = "step-*.pt"


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:07d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in sorted(directory.glob(PATTERN))[:-keep]:
        old.unlink(missing_ok=True)
    return final


def latest_checkpoint(directory: Path) -> dict | None:
    """The newest checkpoint that loads (older ones are tried if the newest is unreadable)."""
    for tmp in directory.glob("*.tmp"):  # left by a killed write
        tmp.unlink(missing_ok=True)
    for path in sorted(directory.glob(PATTERN), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file: fall back to the one before
            continue
    return None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
