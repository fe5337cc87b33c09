"""Tests for vlchat.assets: checksum checks with a fix in the message, atomic cache directories,
and a GGUF conversion that survives being killed (SIGKILL in a subprocess) and is done only once.
Locating packaged files: tests/test_packages.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vlchat.assets as assets
from vlchat.assets import (
    COMPLETE_MARKER,
    atomic_directory,
    commit_directory,
    is_complete,
    lm_directory,
    verified_file,
)
from vlchat.config import SMOLLM2_GGUF, SMOLLM2_SHA256
from vlchat.errors import VlchatError

CACHE_NAME = f"{Path(SMOLLM2_GGUF).stem}-{SMOLLM2_SHA256[:16]}"
CONVERT = "import vlchat.assets as a, vlchat.config as c; print(a.lm_directory(c.SMOLLM2_GGUF, c.SMOLLM2_SHA256))"


def tmp_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.tmp-*")) if parent.exists() else []


# --- checksums ----------------------------------------------------------------------------------


def test_verified_file_checks_sha256(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"some weights")
    good = hashlib.sha256(b"some weights").hexdigest()
    assert verified_file(str(path), good) == path
    assert verified_file(str(path), None) == path
    with pytest.raises(VlchatError, match="checksum mismatch") as err:
        verified_file(str(path), "0" * 64)
    message = str(err.value)
    assert str(path) in message and "reinstall" in message  # names the file and the fix


def test_verified_file_missing_file(tmp_path):
    with pytest.raises(VlchatError, match="not found"):
        verified_file(str(tmp_path / "nope.bin"), None)
    with pytest.raises(VlchatError, match="not found"):
        verified_file(str(tmp_path), None)  # a directory is not a weights file


# --- atomic directories -------------------------------------------------------------------------


def test_atomic_directory_then_commit(tmp_path):
    final = tmp_path / "cache" / "model"
    tmp = atomic_directory(final)
    assert tmp.parent == final.parent and tmp.name.startswith(".model.tmp-") and not final.exists()
    (tmp / "weights.bin").write_bytes(b"x")
    commit_directory(tmp, final, {"source": "test"})

    assert is_complete(final) and (final / "weights.bin").read_bytes() == b"x"
    assert json.loads((final / COMPLETE_MARKER).read_text()) == {"source": "test"}
    assert not tmp.exists() and tmp_dirs(final.parent) == []


def test_commit_keeps_a_complete_concurrent_winner(tmp_path):
    final = tmp_path / "model"
    first, second = atomic_directory(final), atomic_directory(final)
    (first / "who").write_text("first")
    (second / "who").write_text("second")
    commit_directory(first, final, {})
    commit_directory(second, final, {})
    assert (final / "who").read_text() == "first" and is_complete(final)
    assert tmp_dirs(tmp_path) == []


def test_commit_replaces_an_incomplete_final_directory(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "half-written").write_bytes(b"")
    tmp = atomic_directory(final)
    (tmp / "weights.bin").write_bytes(b"x")
    commit_directory(tmp, final, {})
    assert is_complete(final)


def test_is_complete_needs_the_marker(tmp_path):
    assert not is_complete(tmp_path)
    (tmp_path / COMPLETE_MARKER).write_text("{}")
    assert is_complete(tmp_path)


# --- lm_directory -------------------------------------------------------------------------------


def test_lm_directory_passes_hub_ids_and_local_dirs(tmp_path):
    assert lm_directory("hub:org/name", None) == "org/name"
    assert lm_directory(str(tmp_path), None) == str(tmp_path)


def test_lm_directory_refuses_other_files(tmp_path):
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(VlchatError, match="language model not found"):
        lm_directory(str(other), None)
    with pytest.raises(VlchatError, match="language model not found"):
        lm_directory(str(tmp_path / "missing"), None)


def test_lm_directory_checks_the_gguf_before_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(assets, "convert_gguf", lambda *a: pytest.fail("converted an unverified file"))
    with pytest.raises(VlchatError, match="checksum mismatch"):
        lm_directory(SMOLLM2_GGUF, "0" * 64)


def test_existing_cache_is_not_converted_again(monkeypatch):
    monkeypatch.delenv("VLCHAT_HOME", raising=False)
    first = lm_directory(SMOLLM2_GGUF, SMOLLM2_SHA256)  # converts once if this machine has no cache
    assert is_complete(Path(first)) and Path(first).name == CACHE_NAME

    def refuse(*args):
        raise AssertionError("converted again although a complete cache exists")

    monkeypatch.setattr(assets, "convert_gguf", refuse)
    assert lm_directory(SMOLLM2_GGUF, SMOLLM2_SHA256) == first


def test_killed_conversion_leaves_no_cache_and_a_rerun_completes(tmp_path):
    """SIGKILL while the cache is being written must not leave a cache that later loads; the
    next run cleans up and completes. The child is killed the moment anything appears under
    $VLCHAT_HOME/lm (the weights are written ~15 s in, after reading the GGUF, and take ~1 s)."""
    home = tmp_path / "home"
    env = {**os.environ, "VLCHAT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    lm_dir = home / "lm"
    log_path = tmp_path / "killed.log"

    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not (lm_dir.exists() and any(lm_dir.iterdir())):
            assert proc.poll() is None, f"conversion ended before writing:\n{log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert b"converting" in log_path.read_bytes()

    cache = lm_dir / CACHE_NAME
    assert not cache.exists()
    if lm_dir.exists():
        for entry in lm_dir.iterdir():  # at most the killed run's temporary directory
            assert entry.name.startswith(f".{CACHE_NAME}.tmp-"), entry
            assert not is_complete(entry)

    # One more half-written temporary directory, as an earlier killed run would leave.
    stale = lm_dir / f".{CACHE_NAME}.tmp-stale"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)

    rerun = subprocess.run([sys.executable, "-c", CONVERT], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.strip().splitlines()[-1] == str(cache)
    assert is_complete(cache)
    assert tmp_dirs(lm_dir) == []
    assert sorted(p.name for p in lm_dir.iterdir()) == [CACHE_NAME]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cache)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    del model
    shutil.rmtree(home)  # 0.5 GB; pytest keeps the last few tmp_path trees
