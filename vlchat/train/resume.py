"""`--resume`: the newest checkpoint of a run, refused before any compute when another recipe
wrote it, and restored exactly (weights, optimizer, schedule, RNG)."""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from vlchat.errors import VlchatError
from vlchat.train.checkpoint import latest_checkpoint, load_trainable_state
from vlchat.train.recipe import PROJECTOR_KEYS, DataSource, TrainConfig

log = logging.getLogger(__name__)


# Recipe keys a resumed run may change: how often and where it reports (and probes), what it
# started from (the checkpoint's weights replace that start), and how a step's samples are split
# (batch_size x grad_accum x processes: only their product, the global batch, fixes the data
# order), and whether samples are packed by shared prefix (the same loss, in fewer rows). Any
# other change makes it another run.
RESUME_MAY_CHANGE = frozenset(
    {
        "output_dir",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "probe_every",
        "probe_scenes",
        "init_projector",
        "init_adapter",
        "attention",
        "compile",
        "batch_size",
        "grad_accum",
        "pack_shared_prefix",
        "pack_min_prefix",
        "pack_max_tokens",
    }
)
# Checkpoints written before `projector:` was a mapping hold these flat keys (absent: the value).
# Each: (the projector field it was, its value when the checkpoint predates the key).
FLAT_PROJECTOR_KEYS = {
    "projector": ("kind", "linear"),
    "position_tokens": ("position_tokens", 0),
    "projector_position_code": ("position_code", 0.0),
}
# Removed recipe keys, with the value that trains as today's code does.
REMOVED_KEYS = {"projector_output_rms": 0.0, "loss_weighting": "token"}


def resumable_state(out: Path, config: TrainConfig, world) -> dict | None:
    """The newest checkpoint in `out` (None: there is none, the run starts at step 0), refused
    before any compute when it was written by a different recipe."""
    state = latest_checkpoint(out / "checkpoints")
    if state is None:
        if world.main:
            log.warning("no checkpoint in %s; starting from step 0", out / "checkpoints")
        return None
    changes = recipe_changes(state.get("config", {}), state.get("world_size", 1), config, world.size)
    if changes:
        raise VlchatError(
            f"{out} holds step {state['step']} of another recipe ({'; '.join(changes)}): --resume "
            f"continues the same run only; to train on from it, use a new output_dir with "
            f"init_projector (and init_adapter)"
        )
    return state


def recipe_changes(saved: dict, saved_world_size: int, config: TrainConfig, world_size: int) -> list[str]:
    """'key old -> new' for each recipe key (outside RESUME_MAY_CHANGE) that differs from a
    checkpoint's recipe, and for the global batch; keys the checkpoint predates count as their
    defaults."""

    def normal(recipe: dict) -> dict:
        recipe = {**defaults(TrainConfig), **recipe}
        recipe["data"] = [{**defaults(DataSource), **source} for source in recipe.get("data") or ()]
        recipe |= {f"projector.{key}": value for key, value in projector_fields(recipe).items()}
        recipe.pop("projector", None)
        return json.loads(json.dumps(recipe))  # tuples and lists alike

    before, now = normal(saved), normal(config.to_dict())
    changes = [
        ("data sources differ" if key == "data" else f"{key} {before.get(key)!r} -> {now[key]!r}")
        for key in now
        if key not in RESUME_MAY_CHANGE and before.get(key) != now[key]
    ]
    changes += [
        f"{key} {saved[key]!r}, no longer supported"
        for key, same in REMOVED_KEYS.items()
        if saved.get(key, same) != same
    ]
    batch_before = before["batch_size"] * before["grad_accum"] * saved_world_size
    batch_now = now["batch_size"] * now["grad_accum"] * world_size
    if batch_before != batch_now:
        changes.append(f"global batch (batch_size x grad_accum x processes) {batch_before} -> {batch_now}")
    return changes


def projector_fields(recipe: dict) -> dict:
    """The recipe's PROJECTOR_KEYS (in_dim and out_dim follow from `model`), from a nested
    `projector` or from the flat keys of older checkpoints."""
    projector = recipe.get("projector")
    if not isinstance(projector, dict):
        projector = {field: recipe.get(key, absent) for key, (field, absent) in FLAT_PROJECTOR_KEYS.items()}
    return {key: projector.get(key) for key in PROJECTOR_KEYS}


def defaults(kind) -> dict:
    return {f.name: f.default for f in fields(kind) if f.default is not MISSING}


def restore(state: dict, module, optimizer, scheduler, world) -> int:
    load_trainable_state(module, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if world.main:
        log.warning("resuming from step %d", state["step"])
    return state["step"]
