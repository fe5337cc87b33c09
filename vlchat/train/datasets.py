"""A recipe's data sources -> one indexable sequence of Samples (synthetic ones made on demand)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from vlchat.errors import VlchatError
from vlchat.train.data import Sample
from vlchat.train.recipe import DataSource


class SyntheticSamples(Sequence):
    """Synthetic scenes by index: sample i is made from seed TRAIN_SEEDS[seed_offset + i]."""

    def __init__(self, source: DataSource) -> None:
        from vlchat.train import synth

        kind = source.spec.partition(":")[2]
        if kind not in ("qa", "caption"):
            raise VlchatError(f"unknown synthetic data {source.spec!r}; use synth:qa or synth:caption")
        if source.samples is None:
            raise VlchatError(f"{source.spec}: synthetic data needs `samples: N`")
        self.source, self.kind, self.synth = source, kind, synth

    def __len__(self) -> int:
        return self.source.samples

    def __getitem__(self, index: int) -> Sample:
        seed = self.synth.TRAIN_SEEDS[self.source.seed_offset + index]
        lang = self.source.lang if self.source.lang != "both" else ("en", "zh")[seed % 2]
        if self.kind == "caption":
            return self.synth.caption_sample(seed, lang, self.source.max_objects)
        sample = self.synth.qa_sample(
            seed,
            lang,
            self.source.turns,
            self.source.explain_yes_no,
            self.source.qtypes or self.synth.QTYPES,
            self.source.max_objects,
        )
        return tagged(sample, self.source)


class Concatenated(Sequence):
    def __init__(self, parts: list[Sequence[Sample]]) -> None:
        self.parts = parts
        self.ends = []
        total = 0
        for part in parts:
            total += len(part)
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> Sample:
        part = bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return self.parts[part][index - start]


def file_samples(source: DataSource) -> list[Sample]:
    from vlchat.train.data import open_dataset, read_easy_vqa

    if source.spec.startswith("easy_vqa:"):
        split = source.spec.partition(":")[2]
        samples = list(read_easy_vqa(split, source.turns, source.balance_yes_no, source.explain_yes_no))
    else:
        samples = list(open_dataset(source.spec))
    if not samples:
        raise VlchatError(f"data source {source.spec!r} has no samples")
    return [tagged(s, source) for s in (samples[: source.samples] if source.samples else samples)]


def tagged(sample: Sample, source: DataSource) -> Sample:
    """Marks the sample for the collator when its source's turns are independent questions."""
    if source.independent_turns:
        sample.meta["independent_turns"] = True
    return sample


def check_yes_no_options(source: DataSource) -> None:
    """balance_yes_no is easy-VQA's; explain_yes_no also applies to English synthetic QA."""
    easy, synth_qa = source.spec.startswith("easy_vqa:"), source.spec == "synth:qa"
    if source.balance_yes_no and not easy:
        raise VlchatError(f"data source {source.spec!r}: balance_yes_no applies to easy_vqa sources only")
    if source.explain_yes_no and not (easy or (synth_qa and source.lang == "en")):
        raise VlchatError(
            f"data source {source.spec!r}: explain_yes_no applies to easy_vqa and English synth:qa sources only"
        )


def check_qtypes(source: DataSource) -> None:
    if source.qtypes is None:
        return
    if source.spec != "synth:qa":
        raise VlchatError(f"data source {source.spec!r}: qtypes applies to synth:qa sources only")
    from vlchat.train import synth

    synth.check_qtypes(source.qtypes)


def check_max_objects(source: DataSource) -> None:
    from vlchat.train.synth_scene import MAX_OBJECTS

    if source.max_objects == MAX_OBJECTS:
        return
    if not source.spec.startswith("synth:"):
        raise VlchatError(f"data source {source.spec!r}: max_objects applies to synth sources only")
    if not 1 <= source.max_objects <= MAX_OBJECTS:
        raise VlchatError(
            f"data source {source.spec!r}: max_objects must be 1 to {MAX_OBJECTS}, got {source.max_objects}"
        )


def source_samples(source: DataSource) -> Sequence[Sample]:
    if source.spec.startswith("synth:"):
        return SyntheticSamples(source)
    if source.spec.startswith("tools:"):
        return tool_samples(source)
    return file_samples(source)


def tool_samples(source: DataSource) -> Sequence[Sample]:
    """A "tools:KIND" source (train/data_tools.py): made on demand like the synthetic ones."""
    from vlchat.train.data_tools import ToolSamples, ToolSource

    if source.samples is None:
        raise VlchatError(f"{source.spec}: tool-use data needs `samples: N`")
    if source.independent_turns:
        raise VlchatError(f"{source.spec}: independent_turns does not apply to tool-use data (one question each)")
    kind = source.spec.partition(":")[2]
    return ToolSamples(ToolSource(kind, source.samples, source.seed_offset, source.lang))


def build_samples(sources: Sequence[DataSource]) -> Sequence[Sample]:
    parts: list[Sequence[Sample]] = []
    for source in sources:
        if source.repeat < 1:
            raise VlchatError(f"data source {source.spec!r}: repeat must be at least 1, got {source.repeat}")
        check_yes_no_options(source)
        check_qtypes(source)
        check_max_objects(source)
        part = source_samples(source)
        parts += [part] * source.repeat
    return Concatenated(parts)
