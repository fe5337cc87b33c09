"""Readers for MiniGPT-4's own data: stage 1 webdataset tar shards (KEY.jpg + KEY.json/.txt)
and stage 2's cc_sbu_align folder (filter_cap.json + image/ID.jpg). Public entry points are
`read_minigpt4_stage1` / `read_minigpt4_stage2` in vlchat.train.data."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image as PILImage

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.images import image_key, load_image
from vlchat.train.data import (
    _BRACES,
    IMAGE_EXTENSIONS,
    INSTRUCTIONS,
    Sample,
    _build,
    _existing,
    _field,
    _Item,
    _json_file,
    _object,
    _parse_json,
)

# --- MiniGPT-4 stage 1: webdataset tar shards ----------------------------------------------------


def _shard_paths(path: str | os.PathLike) -> list[Path]:
    """A .tar, a folder of .tar files (sorted), or a brace range "shards/{00000..00003}.tar"."""
    text = os.fspath(path)
    found = _BRACES.search(text)
    if found:
        first, last = found.group(1), found.group(2)
        width = len(first) if first.startswith("0") else 0
        return [
            Path(text[: found.start()] + str(n).zfill(width) + text[found.end() :])
            for n in range(int(first), int(last) + 1)
        ]
    path = _existing(path)
    if not path.is_dir():
        return [path]
    shards = sorted(path.glob("*.tar"))
    if not shards:
        raise VlchatError(f"no .tar shards (and no filter_cap.json) in {path}")
    return shards


def _stage1_items(shards: Sequence[Path]) -> Iterator[_Item]:
    for shard in shards:
        yield from _shard_items(shard)


def _shard_items(shard: Path) -> Iterator[_Item]:
    """Stream one shard (as webdataset does: a key's files are consecutive members)."""
    try:
        with tarfile.open(shard, "r|*") as tar:
            for key, files in _tar_groups(tar):
                where = f"{shard}: {key}"
                yield _build(where, _stage1_sample, files, key, where)
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        yield _Item(str(shard), error=f"cannot read tar shard ({reason})")


def _tar_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for runs of members named KEY.EXT (EXT after the basename's first dot)."""
    key, files = None, {}
    for member in tar:
        folder, _, base = member.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not member.isfile() or not dot or not stem:
            continue
        name = f"{folder}/{stem}" if folder else stem
        if name != key and files:
            yield key, files
            files = {}
        key = name
        files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


def _stage1_sample(files: dict[str, bytes], key: str, where: str) -> Sample:
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if ext is None:
        expected = ", .".join(IMAGE_EXTENSIONS)
        raise VlchatError(f"no image (.{expected}) with this key; found .{', .'.join(files)}")
    caption = _tar_caption(files)
    image = load_image(files[ext], name=f"{key}.{ext}")
    return _caption_sample(image, Image(image_key(image)), caption, key, where)


def _tar_caption(files: dict[str, bytes]) -> str:
    if "json" in files:
        return _field(_object(_parse_json(files["json"]), "the .json"), "caption", str, " in the .json")
    if "txt" in files:
        try:
            return files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise VlchatError("the .txt caption is not UTF-8 text") from None
    raise VlchatError(f"no caption (.json or .txt) with this key; found .{', .'.join(files)}")


def _caption_sample(image: PILImage.Image | str, part: Image, caption: str, key: str, where: str) -> Sample:
    """user [Image, instruction] -> assistant caption; the instruction is chosen by `key`."""
    instruction = INSTRUCTIONS[zlib.crc32(key.encode()) % len(INSTRUCTIONS)]
    user = Message("user", [part, Text(instruction)])
    answer = Message.text_message("assistant", caption.strip())
    return Sample([user, answer], [image], where, {"key": key})


# --- MiniGPT-4 stage 2: cc_sbu_align ------------------------------------------------------------


def _stage2_folder(path: str | os.PathLike) -> Path:
    folder = _existing(path)
    if not (folder / "filter_cap.json").is_file():
        raise VlchatError(f"no filter_cap.json in {folder} (expected MiniGPT-4's cc_sbu_align layout)")
    return folder


def _stage2_items(folder: Path) -> Iterator[_Item]:
    captions = folder / "filter_cap.json"
    data, error = _json_file(captions)
    if error is None and not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        error = _Item(str(captions), error='expected {"annotations": [{"image_id", "caption"}, ...]}')
    if error is not None:
        yield error
        return
    for i, record in enumerate(data["annotations"]):
        where = f"{captions}: item {i}"
        yield _build(where, _stage2_sample, record, folder, where)


def _stage2_sample(record: object, folder: Path, where: str) -> Sample:
    record = _object(record, "annotation")
    image_id = _field(record, "image_id", (str, int))
    caption = _field(record, "caption", str)
    path = str(folder / "image" / f"{image_id}.jpg")
    sample = _caption_sample(path, Image(key=path, source=path), caption, str(image_id), where)
    sample.meta = {"image_id": image_id}
    return sample
