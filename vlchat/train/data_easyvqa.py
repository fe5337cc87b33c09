"""easy-VQA (the `easy-vqa` package: 64x64 shape images, 13 answers) as Samples. The public
entry point is `read_easy_vqa` in vlchat.train.data."""

from __future__ import annotations

from typing import Iterator, Sequence

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.train.data import EASY_VQA_SPLITS, Sample, _build, _Item, question_type


# --- easy-VQA -----------------------------------------------------------------------------------


def _easy_vqa_split(split: str) -> str:
    if split not in EASY_VQA_SPLITS:
        raise VlchatError(f"unknown easy_vqa split {split!r}; choose train or test")
    return split


def _easy_vqa_items(split: str, turns: int) -> Iterator[_Item]:
    questions, answers, image_ids, paths = _easy_vqa_data(split)
    by_image: dict[int, list[tuple[str, str]]] = {}  # insertion order: the package's order
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image.setdefault(image_id, []).append((question, answer))
    for image_id, pairs in by_image.items():
        for start in range(0, len(pairs), turns):
            where = f"easy_vqa:{split}: image {image_id} question {start}"
            group = pairs[start : start + turns]
            yield _build(where, lambda: _vqa_sample(paths.get(image_id), group, image_id, split, where))


def _easy_vqa_data(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, {image id: png path}) from the easy_vqa package."""
    try:
        import easy_vqa
    except ImportError:
        raise VlchatError("easy_vqa is not installed; run: pip install easy-vqa==1.0") from None
    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())


def _vqa_sample(
    path: str | None, pairs: Sequence[tuple[str, str]], image_id: int, split: str, where: str
) -> Sample:
    if path is None:
        raise VlchatError(f"the easy_vqa package has no image {image_id}.png for this question")
    messages = []
    for i, (question, answer) in enumerate(pairs):
        parts = [Image(key=path, source=path), Text(question)] if i == 0 else [Text(question)]
        messages += [Message("user", parts), Message.text_message("assistant", answer)]
    qtypes = [question_type(q) for q, _ in pairs]
    meta = {"answer": pairs[-1][1], "qtype": qtypes[-1], "answers": [a for _, a in pairs],
            "qtypes": qtypes, "image_id": image_id, "split": split, "lang": "en"}
    return Sample(messages, [path], where, meta)
