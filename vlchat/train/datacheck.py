"""`vlchat data check`: walk a whole dataset and report every problem with its location,
instead of failing mid-epoch on the first one."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image as PILImage

from vlchat.chat.prompt import encode
from vlchat.chat.template_lookup import get_template
from vlchat.chat.templates import Template
from vlchat.errors import VlchatError
from vlchat.images import load_image
from vlchat.train.data import DEFAULT_TEMPLATE, TOKENS_PER_IMAGE, Sample, dataset_items, sample_problems


@dataclass(frozen=True)
class Problem:
    """One problem `check_dataset` found: where ("data.jsonl:line 3") and what, in one line."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def check_dataset(
    spec: str | os.PathLike,
    tokenizer_fn: Callable[[str], Sequence[int]] | None = None,
    max_tokens: int | None = None,
    template: Template | str | None = None,
    tokens_per_image: int = TOKENS_PER_IMAGE,
) -> list[Problem]:
    """Every problem in the dataset `spec`, in order; [] when it is clean.

    Reports records that cannot be read (bad JSON, missing keys, `<image>` markers that do not
    match the images), images that are missing or do not load, roles that do not alternate, empty
    answers, and, given `tokenizer_fn` (e.g. `LanguageModel.tokenize`) and `max_tokens`, samples
    longer than that once rendered with `template` (default chatml), each image counting
    `tokens_per_image` tokens. An unusable spec (no such file, unknown format) raises VlchatError.
    """
    if (tokenizer_fn is None) != (max_tokens is None):
        raise VlchatError("give both tokenizer_fn and max_tokens to check sample lengths, or neither")
    chosen = template if isinstance(template, Template) else get_template(template or DEFAULT_TEMPLATE)
    loaded: dict[str, str | None] = {}  # image path -> load error; each file is loaded once
    problems = []
    for item in dataset_items(spec):
        if item.error is not None:
            problems.append(Problem(item.where, item.error))
            continue
        found = sample_problems(item.sample)
        if tokenizer_fn is not None and not found:  # rendering needs well-formed turns
            found += _length_problems(item.sample, chosen, tokenizer_fn, max_tokens, tokens_per_image)
        found += _image_problems(item.sample.images, loaded)
        problems += [Problem(item.where, message) for message in found]
    return problems


def _image_problems(images: Sequence[PILImage.Image | str], loaded: dict[str, str | None]) -> list[str]:
    """Load each image path once (decoded in full, so truncated files show); their errors."""
    for path in images:
        if isinstance(path, str) and path not in loaded:
            try:
                load_image(path)
                loaded[path] = None
            except VlchatError as err:
                loaded[path] = str(err)
    return [loaded[p] for p in images if isinstance(p, str) and loaded[p] is not None]


def _length_problems(
    sample: Sample,
    template: Template,
    tokenizer_fn: Callable[[str], Sequence[int]],
    max_tokens: int,
    tokens_per_image: int,
) -> list[str]:
    # the same tokenizer path as training and inference (chat/prompt.py), images as N slots each
    keys, _ = encode(
        template, sample.messages, tokenizer_fn, tokens_per_image, add_generation_prompt=False, tools=sample.tools
    )
    count = len(keys)
    if count <= max_tokens:
        return []
    return [f"too long: {count} tokens with template {template.name} ({tokens_per_image} an image), limit {max_tokens}"]
