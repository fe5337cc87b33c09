"""Finding checkpoints: the Hugging Face cache (huggingface_hub) and $VLCHAT_HOME/models, where
`vlchat pull` (pull.py) puts what it downloads; `vlchat models` lists them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Written by `vlchat pull` into a model folder it downloaded (pull.py); `vlchat models` reads it.
MANIFEST = ".vlchat-pull.json"


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of `org/name` in the Hugging Face cache, without any network; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what --model takes
    kind: str  # "preset" | "local" | "pulled" (by vlchat pull) | "hf-cache"
    size_bytes: int | None
    path: str


def directory_size(path: Path) -> int:
    """Bytes of the files under `path` (links followed: the HF cache links snapshots to blobs)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def local_models(root: Path) -> list[ModelEntry]:
    """Model directories (with config.json) at $VLCHAT_HOME/models/<name> or .../<org>/<name>."""

    found = []
    for config in sorted(list(root.glob("*/config.json")) + list(root.glob("*/*/config.json"))):
        directory = config.parent
        kind = "pulled" if (directory / MANIFEST).is_file() else "local"
        found.append(
            ModelEntry(directory.relative_to(root).as_posix(), kind, directory_size(directory), str(directory))
        )
    return found


def hf_cache_models() -> list[ModelEntry]:
    """Model repositories in the Hugging Face cache that have a config.json snapshot."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        snapshots = [r.snapshot_path for r in repo.revisions if (r.snapshot_path / "config.json").is_file()]
        if snapshots:
            found.append(ModelEntry(repo.repo_id, "hf-cache", repo.size_on_disk, str(snapshots[0])))
    return found


def list_models() -> list[ModelEntry]:
    from vlchat.assets import lm_state, vlchat_home
    from vlchat.config import PRESETS

    presets = [ModelEntry(name, "preset", None, lm_state(PRESETS[name].lm.source)) for name in sorted(PRESETS)]
    return presets + local_models(vlchat_home() / "models") + hf_cache_models()


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
