"""Readers for MiniGPT-4's own data: stage 1 webdataset tar shards (KEY.jpg + KEY.json/.txt)
and stage 2's cc_sbu_align folder (filter_cap.json + image/ID.jpg). Public entry points are
`read_minigpt4_stage1` / `read_minigpt4_stage2` in vlchat.train.data."""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image as PILImage

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.images import image_key, load_image
from vlchat.train.samples import (
    Record,
    Sample,
    build_record,
    existing_path,
    json_field,
    json_object,
    parse_json,
    read_json_file,
)

# MiniGPT-4's stage-2 instructions (prompts/alignment.txt, https://github.com/Vision-CAIR/MiniGPT-4),
# without the leading "<Img><ImageHere></Img> ": the Image part renders that tag itself.
INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tried in this order for a webdataset key
SHARD_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")  # webdataset shard ranges: shards/{00000..00003}.tar


# --- MiniGPT-4 stage 1: webdataset tar shards ----------------------------------------------------


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """A .tar, a folder of .tar files (sorted), or a brace range "shards/{00000..00003}.tar"."""
    text = os.fspath(path)
    found = SHARD_RANGE.search(text)
    if found:
        first, last = found.group(1), found.group(2)
        width = len(first) if first.startswith("0") else 0
        return [
            Path(text[: found.start()] + str(n).zfill(width) + text[found.end() :])
            for n in range(int(first), int(last) + 1)
        ]
    path = existing_path(path)
    if not path.is_dir():
        return [path]
    shards = sorted(path.glob("*.tar"))
    if not shards:
        raise VlchatError(f"no .tar shards (and no filter_cap.json) in {path}")
    return shards


def stage1_records(shards: Sequence[Path]) -> Iterator[Record]:
    for shard in shards:
        yield from _shard_items(shard)


def _shard_items(shard: Path) -> Iterator[Record]:
    """Stream one shard (as webdataset does: a key's files are consecutive members)."""
    try:
        with tarfile.open(shard, "r|*") as tar:
            for key, files in _tar_groups(tar):
                where = f"{shard}: {key}"
                yield build_record(where, _stage1_sample, files, key, where)
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        yield Record(str(shard), error=f"cannot read tar shard ({reason})")


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
        return json_field(json_object(parse_json(files["json"]), "the .json"), "caption", str, " in the .json")
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


def stage2_folder(path: str | os.PathLike) -> Path:
    folder = existing_path(path)
    if not (folder / "filter_cap.json").is_file():
        raise VlchatError(f"no filter_cap.json in {folder} (expected MiniGPT-4's cc_sbu_align layout)")
    return folder


def stage2_records(folder: Path) -> Iterator[Record]:
    captions = folder / "filter_cap.json"
    data, error = read_json_file(captions)
    if error is None and not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        error = Record(str(captions), error='expected {"annotations": [{"image_id", "caption"}, ...]}')
    if error is not None:
        yield error
        return
    for i, record in enumerate(data["annotations"]):
        where = f"{captions}: item {i}"
        yield build_record(where, _stage2_sample, record, folder, where)


def _stage2_sample(record: object, folder: Path, where: str) -> Sample:
    record = json_object(record, "annotation")
    image_id = json_field(record, "image_id", (str, int))
    caption = json_field(record, "caption", str)
    path = str(folder / "image" / f"{image_id}.jpg")
    sample = _caption_sample(path, Image(key=path, source=path), caption, str(image_id), where)
    sample.meta = {"image_id": image_id}
    return sample
