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
    tools:KIND                 tool-use conversations (vlchat.train.data_tools): labels, read_text,
                               python, functions, qa, general

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

Where things live: `Sample`, the per-record outcome `Record` and the helpers every reader shares
are in samples.py; each format's reader in its own module (data_llava.py, data_minigpt4.py,
data_easyvqa.py, synth.py), all importing samples.py; this module picks a reader from a spec and
checks what it yields (samples <- readers <- data).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from vlchat.errors import VlchatError

# question_type and INSTRUCTIONS are public here as well as in their readers' modules.
from vlchat.train.data_easyvqa import easy_vqa_records, easy_vqa_split, question_type  # noqa: F401
from vlchat.train.data_llava import jsonl_records, llava_records
from vlchat.train.data_minigpt4 import (  # noqa: F401
    INSTRUCTIONS,
    SHARD_RANGE,
    shard_paths,
    stage1_records,
    stage2_folder,
    stage2_records,
)
from vlchat.train.samples import Record, Sample, existing_path, sample_problems

TOKENS_PER_IMAGE = 49  # the default vision tower's 7x7 feature grid at 224 px
DEFAULT_TEMPLATE = "chatml"  # the default language model's format, for length checks
SYNTH_SAMPLES = 1000  # seeds 0..999 for "synth:KIND"
TOOL_SAMPLES = 200  # seeds 0..199 for "tools:KIND"


# --- public readers -----------------------------------------------------------------------------


def read_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Iterator[Sample]:
    """LLaVA's JSON list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}.

    "image" is a path (or a list of paths) relative to `image_folder` (default: the JSON's folder),
    or absent for a text-only sample; each `<image>` in a human turn becomes that image's part, in
    place ("<image>\nQ" -> [Image, Text(Q)], "Q\n<image>" -> [Text(Q), Image]).
    """
    return _checked(llava_records(existing_path(path), image_folder))


def read_jsonl(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Iterator[Sample]:
    """One JSON object a line: {"image", "question", "answer"} or {"image", "messages"}.

    "image" (or "images") is a path or a list of paths relative to `image_folder` (default: the
    file's folder), or absent for text only. In "messages" ({"role": "user"|"assistant",
    "content"}) an `<image>` marks where each image goes; a question without markers gets its
    images in front (MiniGPT-4's order). Other keys ("answer", "id", "qtype", ...) go to `meta`.
    """
    return _checked(jsonl_records(existing_path(path), image_folder))


def read_minigpt4_stage1(path: str | os.PathLike) -> Iterator[Sample]:
    """Webdataset tar shards (a .tar, a folder of them, or "shards/{00000..00003}.tar").

    Each KEY.jpg/.jpeg/.png/.webp + KEY.json ({"caption"}) or KEY.txt pair becomes
    user [Image, Text(instruction)] -> assistant caption; the instruction is one of
    `INSTRUCTIONS`, chosen by the key (the same every run).
    """
    return _checked(stage1_records(shard_paths(path)))


def read_minigpt4_stage2(path: str | os.PathLike) -> Iterator[Sample]:
    """MiniGPT-4's cc_sbu_align folder: filter_cap.json and image/ID.jpg, captions as answers.

    filter_cap.json is {"annotations": [{"image_id": "2", "caption": "..."}, ...]}; the user turn
    is [Image, Text(instruction)] as in stage 1.
    """
    return _checked(stage2_records(stage2_folder(path)))


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
    easy_vqa_split(split)
    if turns < 1:
        raise VlchatError(f"turns must be at least 1, got {turns}")
    return _checked(easy_vqa_records(split, turns, balance_yes_no, explain_yes_no))


def open_dataset(spec: str | os.PathLike) -> Iterator[Sample]:
    """Samples of the dataset `spec` names: see the module docstring for the forms."""
    return _checked(dataset_items(spec))


# --- dispatch and validation ---------------------------------------------------------------------


def dataset_items(spec: str | os.PathLike) -> Iterator[Record]:
    """The records of `spec`; raises VlchatError now (not when iterated) if spec names nothing usable."""
    spec = os.fspath(spec)
    kind, _, arg = spec.partition(":")
    if kind == "easy_vqa":
        return easy_vqa_records(easy_vqa_split(arg or "train"), 1)
    if kind == "synth":
        return _synth_records(arg or "caption", spec)
    if kind == "tools":
        return _tool_records(arg, spec)
    if SHARD_RANGE.search(spec):
        return stage1_records(shard_paths(spec))
    path = existing_path(spec)
    if path.is_dir() and (path / "filter_cap.json").is_file():
        return stage2_records(path)
    if path.is_dir() or path.suffix.lower() == ".tar":
        return stage1_records(shard_paths(path))
    if path.suffix.lower() == ".json":
        return llava_records(path, None)
    if path.suffix.lower() == ".jsonl":
        return jsonl_records(path, None)
    raise VlchatError(
        f"unknown dataset format: {spec}; expected a .json (LLaVA), .jsonl or .tar file, a folder of "
        f".tar shards or with filter_cap.json, easy_vqa:train|test, synth:caption|qa, or tools:KIND"
    )


def _synth_records(kind: str, spec: str) -> Iterator[Record]:
    try:  # imported only when asked for: it pulls in the scene generator
        from vlchat.train.synth import synthetic_dataset
    except ImportError as err:
        raise VlchatError(f"{spec} needs vlchat.train.synth, which does not import ({err})") from None
    samples = synthetic_dataset(kind, range(SYNTH_SAMPLES), "en")
    return (Record(s.source or f"{spec}: sample {i}", sample=s) for i, s in enumerate(samples))


def _tool_records(kind: str, spec: str) -> Iterator[Record]:
    from vlchat.train.data_tools import ToolSamples, ToolSource

    samples = ToolSamples(ToolSource(kind, TOOL_SAMPLES))  # raises now for an unknown kind
    return (Record(sample.source or f"{spec}: sample {i}", sample=sample) for i, sample in enumerate(samples))


def _checked(items: Iterable[Record]) -> Iterator[Sample]:
    """Samples of well-formed records; VlchatError naming the record at the first bad one."""
    for item in items:
        problems = [item.error] if item.error is not None else sample_problems(item.sample)
        if problems:
            raise VlchatError(f"{item.where}: {problems[0]}")
        yield item.sample
