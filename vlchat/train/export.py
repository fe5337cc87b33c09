"""Ship a finished stage-2 run as the package's default weights, in bfloat16.

Training keeps float32 masters; the shipped copies are bfloat16 because the LM they feed runs in
bfloat16 (float32 CPUs widen them at load), which halves the files: the 2-layer projector plus a
rank-16 q/k/v/o adapter are ~12 MB in float32 and ~6 MB here (the issue's limit is 10 MB).

    python -m vlchat.train.export runs/stage2 vlchat/weights
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlchat.errors import VlchatError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def to_bfloat16(source: Path, target: Path) -> None:
    """Copy a safetensors file with floating tensors cast to bfloat16 (atomic: temp file + rename)."""
    tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in load_file(source).items()}
    save_file(tensors, f"{target}.tmp")
    os.replace(f"{target}.tmp", target)


def export_run(run: Path, weights: Path, name: str = "default") -> list[Path]:
    """`run`'s projector (+ LoRA adapter) -> `<weights>/<name>-projector.*` and `<name>-lora/`."""
    projector = run / "projector.safetensors"
    if not projector.is_file() or not (run / "projector.json").is_file():
        raise VlchatError(f"{run} has no trained projector (projector.safetensors + projector.json)")
    weights.mkdir(parents=True, exist_ok=True)
    written = [weights / f"{name}-projector.safetensors", weights / f"{name}-projector.json"]
    to_bfloat16(projector, written[0])
    shutil.copyfile(run / "projector.json", written[1])
    if (run / "lora").is_dir():
        adapter = weights / f"{name}-lora"
        adapter.mkdir(exist_ok=True)
        shutil.copyfile(run / "lora" / ADAPTER_FILES[0], adapter / ADAPTER_FILES[0])
        to_bfloat16(run / "lora" / ADAPTER_FILES[1], adapter / ADAPTER_FILES[1])
        written += [adapter / f for f in ADAPTER_FILES]
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m vlchat.train.export RUN_DIR WEIGHTS_DIR", file=sys.stderr)
        return 2
    try:
        written = export_run(Path(argv[0]), Path(argv[1]))
    except VlchatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
