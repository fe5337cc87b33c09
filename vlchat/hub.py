"""Getting checkpoints: the Hugging Face cache (huggingface_hub) and, later in this file, `vlchat pull`."""

from __future__ import annotations

from pathlib import Path


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of `org/name` in the Hugging Face cache, without any network; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if (path / "config.json").is_file() else None
