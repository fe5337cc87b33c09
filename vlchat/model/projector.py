"""Vision features -> LM input embeddings. A name -> class registry, as data.

- `linear`: MiniGPT-4's single `llama_proj` Linear layer.
- `mlp2x_gelu`: LLaVA-1.5's two-layer MLP with a GELU between.
Weights are stored as `<name>.safetensors` + `<name>.json` (the ProjectorConfig), so a file
says what it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlchat.assets import resolve
from vlchat.config import ProjectorConfig
from vlchat.errors import VlchatError

log = logging.getLogger(__name__)


def _linear(config: ProjectorConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(config.in_dim, config.out_dim))


def _mlp2x_gelu(config: ProjectorConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(config.in_dim, config.out_dim), nn.GELU(), nn.Linear(config.out_dim, config.out_dim))


PROJECTORS = {"linear": _linear, "mlp2x_gelu": _mlp2x_gelu}


def grid_code(config: ProjectorConfig) -> torch.Tensor:
    """(N, 2 * side): row one-hot ++ column one-hot of each row-major grid token, times
    `position_code`; (N, 0) when the code is off."""
    n = config.position_tokens
    if not config.position_code:
        return torch.zeros(n, 0)
    side = math.isqrt(n)  # a square grid: ProjectorConfig checks it
    index = torch.arange(n)
    rows = torch.nn.functional.one_hot(index // side, side)
    cols = torch.nn.functional.one_hot(index % side, side)
    return torch.cat([rows, cols], dim=1).float() * config.position_code


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        if config.kind not in PROJECTORS:
            raise VlchatError(f"unknown projector {config.kind!r}; choose one of: {', '.join(PROJECTORS)}")
        self.config = config
        code = grid_code(config)
        self.register_buffer("grid_code", code, persistent=False)  # (N, 2 * side), or (N, 0)
        self.net = PROJECTORS[config.kind](replace(config, in_dim=config.in_dim + code.shape[1]))
        if config.position_tokens:
            self.position = nn.Parameter(torch.zeros(config.position_tokens, config.out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) vision tokens -> (B, N, D) LM embeddings."""
        if self.config.position_tokens and features.shape[1] != self.config.position_tokens:
            raise VlchatError(
                f"projector has {self.config.position_tokens} position embeddings, "
                f"but the image has {features.shape[1]} tokens (another image_size?)"
            )
        if self.grid_code.shape[1]:
            code = self.grid_code.to(features.dtype).expand(features.shape[0], -1, -1)
            features = torch.cat([features, code], dim=-1)  # (B, N, Dv + 2 * side)
        out = self.net(features)
        if self.config.position_tokens:
            out = out + self.position
        return out


def stem_files(stem: Path) -> tuple[Path, Path]:
    """`<stem>.safetensors`, `<stem>.json` (a dot inside the stem's name is kept)."""
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_projector(projector: Projector, stem: str | Path) -> None:
    """Write `<stem>.safetensors` and `<stem>.json`, each via a temp file + rename (atomic)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, meta = stem_files(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    save_file(tensors, f"{weights}.tmp")
    Path(f"{meta}.tmp").write_text(json.dumps(asdict(projector.config), indent=2))
    os.replace(f"{weights}.tmp", weights)
    os.replace(f"{meta}.tmp", meta)


def read_projector_config(stem: str) -> ProjectorConfig:
    """The ProjectorConfig stored beside a projector's weights."""
    return stored_config(stem_files(resolve(stem))[1])


def stored_config(meta: Path) -> ProjectorConfig:
    """A projector's `.json` as a ProjectorConfig (older files' removed fields: ProjectorConfig.from_dict)."""
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read projector config {meta}: {error}") from None
    return ProjectorConfig.from_dict(data, f"projector config {meta}")


def load_projector(stem: str, expected: ProjectorConfig) -> Projector:
    """Load a saved projector; its stored config must match the model's (dims and kind)."""
    weights, meta = stem_files(resolve(stem))
    if not weights.is_file() or not meta.is_file():
        raise FileNotFoundError(weights)
    stored = stored_config(meta)
    if stored != expected:
        raise VlchatError(f"projector {weights} is {stored}, but the model needs {expected}")
    projector = Projector(stored)
    projector.load_state_dict(load_file(weights))
    return projector


def build_projector(config: ProjectorConfig, stem: str | None, seed: int = 0) -> Projector:
    """The trained projector at `stem`, or a fresh (seeded) one with a loud warning."""
    if stem is None:  # asked for a fresh one (training, tests)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return Projector(config)
    try:
        return load_projector(stem, config)
    except FileNotFoundError:
        pass
    log.warning(
        "WARNING: no trained projector found (%s); using a FRESH, untrained projector. "
        "The model cannot see images until one is trained (vlchat train).",
        stem,
    )
    with torch.random.fork_rng():  # a reproducible init without touching the caller's RNG
        torch.manual_seed(seed)
        return Projector(config)
