"""Training data: one `Sample` type and readers for the formats people already have.

A sample is a conversation (chat Messages, images as Image parts) plus the images themselves,
so training renders it with the same Template objects as inference.

Formats (`open_dataset(spec)` picks one from the spec):

    data.json                  LLaVA: [{"id", "image", "conversations": [{"from", "value"}]}]
    data.jsonl                 one {"image", "question", "answer"} or {"image", "messages"} a line
    shards/ | x.tar | {0..3}   MiniGPT-4 stage 1: webdataset tars of KEY.jpg + KEY.json/.txt
    cc_sbu_align/              MiniGPT-4 stage 2: filter_cap.json + image/{image_id}.jpg
    easy_vqa:train|test        the easy-VQA package (4,000/1,000 images of shapes)
    synth:caption|qa           generated scenes (vlchat.train.synth)

Every record has a location used in errors and in `Sample.source`: "data.jsonl:line 7" (lines
count from 1), "data.json: item 12" (the list index, from 0), "shard-0001.tar: 000123" (the
webdataset key). Readers raise a one-line VlchatError at the first malformed record (bad JSON,
missing keys, `<image>` markers that do not match the images, roles out of turn, empty answers);
they do not open image files, so a missing one shows when the trainer loads it.
`vlchat.train.datacheck.check_dataset` walks a whole dataset and returns every problem it finds.

Images from files stay paths (str) and are loaded lazily by the trainer; their Image parts carry
the path as key and source (`Image(key=path, source=path)`): training only needs each image's
place in the prompt. Images inside tar shards are decoded while reading (the shard is streamed
once) and keyed by content hash.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError

IMAGE_MARKER = "<image>"  # LLaVA's placeholder for an image inside a human turn
# MiniGPT-4's stage-2 instructions (prompts/alignment.txt, https://github.com/Vision-CAIR/MiniGPT-4),
# without the leading "<Img><ImageHere></Img> ": the Image part renders that tag itself.
INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
TOKENS_PER_IMAGE = 49  # the default vision tower's 7x7 feature grid at 224 px
DEFAULT_TEMPLATE = "chatml"  # the default language model's format, for length checks
SYNTH_SAMPLES = 1000  # seeds 0..999 for "synth:KIND"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tried in this order for a webdataset key
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
EASY_VQA_SPLITS = ("train", "test")

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")  # webdataset shard ranges: shards/{00000..00003}.tar


@dataclass
class Sample:
    """One training example.

    `messages`: user/assistant turns (no system message; the recipe's template adds its system
    prompt); user messages hold `Image(key=...)` parts in the order of `images`.
    `images`: the loaded RGB images, or paths to load lazily (str), in order of appearance.
    `source`: where it came from, for error messages ("data/llava.json:item 12", "shard-0001.tar:000123").
    `meta`: free-form facts for evaluation (e.g. {"qtype": "colour", "lang": "en", "answer": "red"}).
    """

    messages: list[Message]
    images: list[PILImage.Image | str] = field(default_factory=list)
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class _Item:
    """One record of a dataset: the sample built from it, or why none could be built."""

    where: str
    sample: Sample | None = None
    error: str | None = None


# --- public readers -----------------------------------------------------------------------------


def read_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Iterator[Sample]:
    """LLaVA's JSON list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}.

    "image" is a path (or a list of paths) relative to `image_folder` (default: the JSON's folder),
    or absent for a text-only sample; each `<image>` in a human turn becomes that image's part, in
    place ("<image>\nQ" -> [Image, Text(Q)], "Q\n<image>" -> [Text(Q), Image]).
    """
    from vlchat.train.data_llava import _llava_items

    return _checked(_llava_items(_existing(path), image_folder))


def read_jsonl(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Iterator[Sample]:
    """One JSON object a line: {"image", "question", "answer"} or {"image", "messages"}.

    "image" (or "images") is a path or a list of paths relative to `image_folder` (default: the
    file's folder), or absent for text only. In "messages" ({"role": "user"|"assistant",
    "content"}) an `<image>` marks where each image goes; a question without markers gets its
    images in front (MiniGPT-4's order). Other keys ("answer", "id", "qtype", ...) go to `meta`.
    """
    from vlchat.train.data_llava import _jsonl_items

    return _checked(_jsonl_items(_existing(path), image_folder))


def read_minigpt4_stage1(path: str | os.PathLike) -> Iterator[Sample]:
    """Webdataset tar shards (a .tar, a folder of them, or "shards/{00000..00003}.tar").

    Each KEY.jpg/.jpeg/.png/.webp + KEY.json ({"caption"}) or KEY.txt pair becomes
    user [Image, Text(instruction)] -> assistant caption; the instruction is one of
    `INSTRUCTIONS`, chosen by the key (the same every run).
    """
    from vlchat.train.data_minigpt4 import _shard_paths, _stage1_items

    return _checked(_stage1_items(_shard_paths(path)))


def read_minigpt4_stage2(path: str | os.PathLike) -> Iterator[Sample]:
    """MiniGPT-4's cc_sbu_align folder: filter_cap.json and image/ID.jpg, captions as answers.

    filter_cap.json is {"annotations": [{"image_id": "2", "caption": "..."}, ...]}; the user turn
    is [Image, Text(instruction)] as in stage 1.
    """
    from vlchat.train.data_minigpt4 import _stage2_folder, _stage2_items

    return _checked(_stage2_items(_stage2_folder(path)))


def read_easy_vqa(
    split: str = "train", turns: int = 1, balance_yes_no: bool = False, explain_yes_no: bool = False
) -> Iterator[Sample]:
    """easy-VQA from its package: one question (or up to `turns` questions about one image) a sample.

    Questions keep the package's order (grouped by image); with `turns` > 1 each image's questions
    are cut into consecutive groups of `turns`. meta: "answer"/"qtype" of the last turn,
    "answers"/"qtypes" of all turns, "image_id", "split", "lang". `balance_yes_no` (training):
    half of each image's yes/no questions ask about what it shows (data_easyvqa.YesNoBalancer).
    `explain_yes_no` (training): yes/no answers name the image's colour or shape before the
    verdict, "It is blue, so no." (data_easyvqa.YesNoBalancer.explain).
    """
    from vlchat.train.data_easyvqa import _easy_vqa_items, _easy_vqa_split

    _easy_vqa_split(split)
    if turns < 1:
        raise VlchatError(f"turns must be at least 1, got {turns}")
    return _checked(_easy_vqa_items(split, turns, balance_yes_no, explain_yes_no))


def open_dataset(spec: str | os.PathLike) -> Iterator[Sample]:
    """Samples of the dataset `spec` names: see the module docstring for the forms."""
    return _checked(dataset_items(spec))


def question_type(question: str) -> str:
    """'colour', 'shape' or 'yes/no' from an easy-VQA question's wording (its 24 question forms)."""
    q = question.lower()
    if not q.startswith("what"):
        return "yes/no"
    return "colour" if "color" in q or "colour" in q else "shape"


# --- dispatch and validation ---------------------------------------------------------------------


def dataset_items(spec: str | os.PathLike) -> Iterator[_Item]:
    """The records of `spec`; raises VlchatError now (not when iterated) if spec names nothing usable."""
    from vlchat.train.data_easyvqa import _easy_vqa_items, _easy_vqa_split
    from vlchat.train.data_llava import _jsonl_items, _llava_items
    from vlchat.train.data_minigpt4 import _shard_paths, _stage1_items, _stage2_items

    spec = os.fspath(spec)
    kind, _, arg = spec.partition(":")
    if kind == "easy_vqa":
        return _easy_vqa_items(_easy_vqa_split(arg or "train"), 1)
    if kind == "synth":
        return _synth_items(arg or "caption", spec)
    if _BRACES.search(spec):
        return _stage1_items(_shard_paths(spec))
    path = _existing(spec)
    if path.is_dir() and (path / "filter_cap.json").is_file():
        return _stage2_items(path)
    if path.is_dir() or path.suffix.lower() == ".tar":
        return _stage1_items(_shard_paths(path))
    if path.suffix.lower() == ".json":
        return _llava_items(path, None)
    if path.suffix.lower() == ".jsonl":
        return _jsonl_items(path, None)
    raise VlchatError(
        f"unknown dataset format: {spec}; expected a .json (LLaVA), .jsonl or .tar file, a folder of "
        f".tar shards or with filter_cap.json, easy_vqa:train|test, or synth:caption|qa"
    )


def _synth_items(kind: str, spec: str) -> Iterator[_Item]:
    try:  # imported only when asked for: it pulls in the scene generator
        from vlchat.train.synth import synthetic_dataset
    except ImportError as err:
        raise VlchatError(f"{spec} needs vlchat.train.synth, which does not import ({err})") from None
    samples = synthetic_dataset(kind, range(SYNTH_SAMPLES), "en")
    return (_Item(s.source or f"{spec}: sample {i}", sample=s) for i, s in enumerate(samples))


def _checked(items: Iterable[_Item]) -> Iterator[Sample]:
    """Samples of well-formed records; VlchatError naming the record at the first bad one."""
    for item in items:
        problems = [item.error] if item.error is not None else sample_problems(item.sample)
        if problems:
            raise VlchatError(f"{item.where}: {problems[0]}")
        yield item.sample


def _build(where: str, make: Callable[..., Sample], *args: object) -> _Item:
    """Run a record's builder on `args`; a VlchatError it raises becomes the record's error."""
    try:
        return _Item(where, sample=make(*args))
    except VlchatError as err:
        return _Item(where, error=str(err))


def sample_problems(sample: Sample) -> list[str]:
    """Structural problems: roles, empty answers, images in answers, image parts vs images."""
    problems = []
    for i, message in enumerate(sample.messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            problems.append(
                f"roles must alternate user, assistant, ...: message {i} (from 0) is "
                f"{message.role!r} where {expected!r} was expected"
            )
            break
    if not sample.messages:
        problems.append("no messages")
    elif not problems and sample.messages[-1].role != "assistant":
        problems.append("the last message is not an assistant answer, so there is nothing to learn")
    for i, message in enumerate(sample.messages):
        if message.role == "assistant" and not _has_text(message):
            problems.append(f"empty answer in message {i} (from 0)")
        elif message.role == "assistant" and message.images:
            problems.append(f"an image in assistant message {i}; images belong in user messages")
    parts = sum(len(m.images) for m in sample.messages)
    if parts != len(sample.images):
        problems.append(f"{parts} image placeholder(s) for {len(sample.images)} image(s)")
    return problems


def _has_text(message: Message) -> bool:
    return any(isinstance(p, Text) and p.text.strip() for p in message.parts)


# --- conversations with <image> markers ----------------------------------------------------------


def _messages(turns: Sequence[tuple[str, str]], images: Sequence[Image], images_first: bool = False) -> list[Message]:
    """(role, text with <image> markers) -> Messages, the i-th marker becoming images[i].

    Text next to a marker is stripped ("<image>\\nWhat is it?" -> [Image, Text("What is it?")]).
    `images_first`: when no turn has a marker, the images go in front of the first turn.
    """
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if images_first and markers == 0 and images and turns:
        turns = [(turns[0][0], IMAGE_MARKER * len(images) + turns[0][1]), *turns[1:]]
        markers = len(images)
    if markers != len(images):
        raise VlchatError(
            f"{len(images)} image(s) but {markers} {IMAGE_MARKER} marker(s); "
            f"put one {IMAGE_MARKER} in a user turn where each image goes"
        )
    queue = iter(images)
    messages = []
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and IMAGE_MARKER in text:
            raise VlchatError(f"{IMAGE_MARKER} in turn {i} (from 0), an answer; images belong in user turns")
        pieces = text.split(IMAGE_MARKER)
        parts: list[Text | Image] = []
        for j, piece in enumerate(pieces):
            if j:
                parts.append(next(queue))
            if piece.strip() or len(pieces) == 1:
                parts.append(Text(piece.strip()))
        messages.append(Message(role, parts))  # type: ignore[arg-type]
    return messages


def _path_images(paths: Sequence[str]) -> list[Image]:
    """Image parts for files: the path is the key until the trainer loads the pixels."""
    return [Image(key=p, source=p) for p in paths]


def _image_paths(value: object, folder: Path) -> list[str]:
    """An "image" field (absent, a path, or a list of paths) -> paths joined to `folder`."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise VlchatError(f"'image' must be a path or a list of paths, found {json.dumps(value)[:80]}")
    return [str(folder / n) for n in names]


def _field(record: dict, key: str, kind: type | tuple[type, ...], what: str = "") -> object:
    """record[key], checked to be a `kind`; a VlchatError naming the key otherwise."""
    if key not in record:
        raise VlchatError(f"missing key {key!r}{what}")
    if not isinstance(record[key], kind):
        names = " or ".join(_TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise VlchatError(f"{key!r}{what} must be a {names}, found {type(record[key]).__name__}")
    return record[key]


_TYPE_NAMES = {str: "string", list: "list", dict: "object", int: "number"}


def _object(record: object, what: str = "record") -> dict:
    if not isinstance(record, dict):
        raise VlchatError(f"{what} must be a JSON object, found {type(record).__name__}")
    return record


# --- files --------------------------------------------------------------------------------------


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise VlchatError(f"dataset not found: {path}")
    return path


def _json_file(path: Path) -> tuple[object, _Item | None]:
    """(parsed JSON, None), or (None, an error record at the line where parsing failed)."""
    try:
        return json.loads(path.read_bytes()), None
    except json.JSONDecodeError as err:
        return None, _Item(f"{path}:line {err.lineno}", error=f"not valid JSON: {err.msg} (column {err.colno})")
    except UnicodeDecodeError:
        return None, _Item(str(path), error="not UTF-8 text")
    except OSError as err:
        return None, _Item(str(path), error=f"cannot read ({err.strerror or err})")


def _parse_json(text: bytes) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VlchatError(f"not valid JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError:
        raise VlchatError("not UTF-8 text") from None
