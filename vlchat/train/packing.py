"""Shared-prefix packing across samples: the samples of one micro-batch whose token ids begin
alike (system prompt, offered tools) train as one row, the shared prefix once and each sample's
remainder as its own branch (collate.Encoded.branches), at the positions it would have alone.

Each branch attends the prefix and itself only (collate.branch_mask), so it trains exactly what
the sample trains unpacked, and the row's loss is the mean over the same supervised targets. Two
rules keep that exact (labels are compared one step ahead, LanguageModel.loss):
  - the prefix holds no supervised target and no image slot (ids compare IMAGE_TOKEN_ID equal
    for different images), and
  - a branch's first token is no target: in the row, the token before it is the previous
    branch's last one, which must not be trained to predict it.
So a sample's prefix is cut before its first supervised label (and its first image slot, and its
last token); a sample that leaves less than `min_prefix` shared tokens stays as it is, as does a
sample that already has branches (independent turns).
"""

from __future__ import annotations

from vlchat.model.vlm import IMAGE_TOKEN_ID
from vlchat.train.collate import IGNORE, Encoded


def pack_shared_prefixes(items: list[Encoded], min_prefix: int, max_tokens: int) -> list[Encoded]:
    """`items` with the runs that share at least `min_prefix` prefix tokens merged into one row
    each (no row over `max_tokens`), choosing the runs that save the most tokens. Rows keep the
    order of their first sample; a merged row's branches are in token order."""
    index = {id(item): i for i, item in enumerate(items)}
    packable = sorted((item for item in items if _shareable(item) >= min_prefix), key=lambda item: item.ids)
    rows = [(run, _merge(run, prefix)) for run, prefix in _runs(packable, min_prefix, max_tokens) if len(run) > 1]
    merged = {id(item) for run, _ in rows for item in run}
    rows += [([item], item) for item in items if id(item) not in merged]
    rows.sort(key=lambda row: min(index[id(item)] for item in row[0]))
    return [row for _, row in rows]


def _shareable(item: Encoded) -> int:
    """How many leading tokens of `item` may go into a shared prefix (module docstring)."""
    if item.branches is not None:
        return 0
    first_target = next((i for i, label in enumerate(item.labels) if label != IGNORE), len(item.ids))
    first_slot = next((i for i, token in enumerate(item.ids) if token == IMAGE_TOKEN_ID), len(item.ids))
    return max(0, min(first_target - 1, first_slot, len(item.ids) - 1))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _runs(ordered: list[Encoded], min_prefix: int, max_tokens: int) -> list[tuple[list[Encoded], int]]:
    """Split `ordered` (sorted by ids) into consecutive runs, each with the prefix its members share,
    saving the most tokens. A set's common prefix is that of its first and last member in sorted
    order, so the best packing is one of consecutive runs (a small dynamic programme)."""
    n = len(ordered)
    best = [0] * (n + 1)  # best[i]: most tokens saved in the first i items
    cut = [(i - 1, 0) for i in range(n + 1)]  # cut[i]: (where the last run starts, its shared prefix)
    for end in range(1, n + 1):
        best[end] = best[end - 1]
        for start in range(end - 1):
            prefix = _run_prefix(ordered[start:end], min_prefix, max_tokens)
            if prefix and best[start] + (end - start - 1) * prefix > best[end]:
                best[end], cut[end] = best[start] + (end - start - 1) * prefix, (start, prefix)
    runs, end = [], n
    while end > 0:
        start, prefix = cut[end]
        runs.append((ordered[start:end], prefix))
        end = start
    return runs[::-1]


def _run_prefix(run: list[Encoded], min_prefix: int, max_tokens: int) -> int:
    """The prefix `run` would share, or 0 if it is too short or the packed row too long."""
    prefix = min(_common_prefix(run[0].ids, run[-1].ids), *(_shareable(item) for item in run))
    length = prefix + sum(len(item.ids) - prefix for item in run)
    return prefix if prefix >= min_prefix and length <= max_tokens else 0


def _merge(run: list[Encoded], prefix: int) -> Encoded:
    """One row: `prefix` tokens once (branch 0), then each item's remainder as branch 1, 2, ..."""
    first = run[0]
    ids, labels, images = first.ids[:prefix], first.labels[:prefix], []
    branches, positions = [0] * prefix, list(range(prefix))
    for number, item in enumerate(run, start=1):
        ids, labels = ids + item.ids[prefix:], labels + item.labels[prefix:]
        images += item.images  # no slot in the prefix: slot order is branch order
        branches += [number] * (len(item.ids) - prefix)
        positions += range(prefix, len(item.ids))
    return Encoded(ids, labels, images, branches, positions, samples=sum(item.samples for item in run))
