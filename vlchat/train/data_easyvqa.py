"""easy-VQA (the `easy-vqa` package: 64x64 shape images, 13 answers) as Samples. The public
entry point is `read_easy_vqa` in vlchat.train.data."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.train.samples import Record, Sample, build_record

EASY_VQA_SPLITS = ("train", "test")


# --- easy-VQA -----------------------------------------------------------------------------------


def question_type(question: str) -> str:
    """'colour', 'shape' or 'yes/no' from an easy-VQA question's wording (its 24 question forms)."""
    q = question.lower()
    if not q.startswith("what"):
        return "yes/no"
    return "colour" if "color" in q or "colour" in q else "shape"


def easy_vqa_split(split: str) -> str:
    if split not in EASY_VQA_SPLITS:
        raise VlchatError(f"unknown easy_vqa split {split!r}; choose train or test")
    return split


def easy_vqa_records(
    split: str, turns: int, balance_yes_no: bool = False, explain_yes_no: bool = False
) -> Iterator[Record]:
    questions, answers, image_ids, paths = _easy_vqa_data(split)
    by_image: dict[int, list[tuple[str, str]]] = {}  # insertion order: the package's order
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image.setdefault(image_id, []).append((question, answer))
    if balance_yes_no or explain_yes_no:  # training options; the test split is read as it is
        balancer = YesNoBalancer(list(zip(questions, answers)))
        if balance_yes_no:
            by_image = balancer.balance(by_image)
        if explain_yes_no:
            by_image = {image_id: balancer.explain(pairs) for image_id, pairs in by_image.items()}
    for image_id, pairs in by_image.items():
        for start in range(0, len(pairs), turns):
            where = f"easy_vqa:{split}: image {image_id} question {start}"
            group = pairs[start : start + turns]
            yield build_record(where, _vqa_sample, paths.get(image_id), group, image_id, split, where)


def _easy_vqa_data(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, {image id: png path}) from the easy_vqa package."""
    try:
        import easy_vqa
    except ImportError:
        raise VlchatError("easy_vqa is not installed; run: pip install easy-vqa==1.0") from None
    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())


def _vqa_sample(path: str | None, pairs: Sequence[tuple[str, str]], image_id: int, split: str, where: str) -> Sample:
    if path is None:
        raise VlchatError(f"the easy_vqa package has no image {image_id}.png for this question")
    messages = []
    for i, (question, answer) in enumerate(pairs):
        parts = [Image(key=path, source=path), Text(question)] if i == 0 else [Text(question)]
        messages += [Message("user", parts), Message.text_message("assistant", answer)]
    qtypes = [question_type(q) for q, _ in pairs]
    meta = {
        "answer": pairs[-1][1],
        "qtype": qtypes[-1],
        "answers": [a for _, a in pairs],
        "qtypes": qtypes,
        "image_id": image_id,
        "split": split,
        "lang": "en",
    }
    return Sample(messages, [path], where, meta)


# --- yes/no balance -----------------------------------------------------------------------------
# About 4 in 5 of easy-VQA's yes/no questions ask about a colour or shape that is not in the image
# (8 colours, 3 shapes, one object), so "absent" is a strong prior: a model trained on the split as
# it is answered 15% of the test questions about what *is* there correctly (the previous default).

Pair = tuple[str, str]  # (question, answer)
_NEGATED = re.compile(r"\b(not|no)\b")


class YesNoBalancer:
    """Rewrites each image's questions so that half of its yes/no questions ask about what the
    image shows. Each image keeps its question count and its what-questions; absent-asking yes/no
    questions are swapped for present-asking ones made from the split's own question forms
    ("is there not a {colour} shape?") filled with the image's colour or shape, which its
    questions reveal. Only for training splits: it uses the answers."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.shapes = {a for q, a in pairs if question_type(q) == "shape"}
        self.colours = {a for q, a in pairs if question_type(q) == "colour"}
        self.forms = sorted({self._form(q) for q, _ in pairs if question_type(q) == "yes/no"} - {None})

    def balance(self, by_image: dict[int, list[Pair]]) -> dict[int, list[Pair]]:
        return {image_id: self._image(pairs, random.Random(image_id)) for image_id, pairs in by_image.items()}

    def explain(self, pairs: list[Pair]) -> list[Pair]:
        """The image's questions with each yes/no answer giving its reason first: "is there a red
        shape?" -> "It is blue, so no." The LM then compares two words it has just read,
        which it learns in ~100 steps, instead of a word with image features, which it did not
        learn in 300 (docs/experiments.md). A yes/no question about a
        colour or shape that the image's questions do not reveal is left out."""
        labels, out = self._labels(pairs), []
        for question, answer in pairs:
            named = self._word(question) if question_type(question) == "yes/no" else None
            if named is None:
                out.append((question, answer))
            elif named[0] in labels:
                seen = labels["colour"] if named[0] == "colour" else "a " + labels["shape"]
                out.append((question, f"It is {seen}, so {answer}."))
        return out

    def _word(self, question: str) -> tuple[str, str] | None:
        """("colour"|"shape", word) named by a question, or None."""
        words = re.findall(r"[a-z]+", question.lower())
        for kind, vocab in (("colour", self.colours), ("shape", self.shapes)):
            if found := [w for w in words if w in vocab]:
                return kind, found[0]
        return None

    def _form(self, question: str) -> str | None:
        named = self._word(question)
        return re.sub(rf"\b{named[1]}\b", "{" + named[0] + "}", question.lower()) if named else None

    def _present(self, question: str, answer: str) -> bool:
        """Whether a yes/no question asks about something the image has."""
        return (answer == "yes") != bool(_NEGATED.search(question.lower()))

    def _labels(self, pairs: Sequence[Pair]) -> dict[str, str]:
        """{"colour": ..., "shape": ...} of the image's one object, as far as its questions tell."""
        labels = {}
        for question, answer in pairs:
            kind = question_type(question)
            if kind != "yes/no":
                labels[kind] = answer
            if (named := self._word(question)) and (kind != "yes/no" or self._present(question, answer)):
                labels[named[0]] = named[1]
        return labels

    def _ask_present(self, labels: dict[str, str], asked: set[str], rng: random.Random) -> Pair:
        """A question about the image's colour or shape in one of the split's forms, not yet asked."""
        filled = {f.format_map(labels): f for f in self.forms if re.findall(r"{(\w+)}", f)[0] in labels}
        question = rng.choice(sorted(filled.keys() - asked) or sorted(filled))
        asked.add(question)
        return question, "no" if _NEGATED.search(filled[question]) else "yes"

    def _image(self, pairs: list[Pair], rng: random.Random) -> list[Pair]:
        yes_no = [p for p in pairs if question_type(p[0]) == "yes/no"]
        absent = [p for p in yes_no if not self._present(*p)]
        swap = len(absent) - len(yes_no) // 2 - len(yes_no) % 2  # absent beyond half (rounded up)
        labels = self._labels(pairs)
        if swap <= 0 or not labels:
            return pairs
        dropped = set(rng.sample(range(len(absent)), swap))
        kept = [p for p in pairs if p not in absent] + [p for i, p in enumerate(absent) if i not in dropped]
        asked = {q for q, _ in kept}
        out = kept + [self._ask_present(labels, asked, rng) for _ in range(swap)]
        rng.shuffle(out)
        return out
