"""collate.length_groups: similar-length groups that pad the fewest tokens, and a training step on
groups that equals the step on the whole padded batch."""

from __future__ import annotations

import torch
from conftest import tiny_config

from vlchat.train.collate import Encoded, length_groups
from vlchat.train.recipe import DataSource, TrainConfig
from vlchat.train.trainer import BatchMaker, TrainModule, build_model, group_weights


def encoded(length: int) -> Encoded:
    return Encoded(list(range(length)), [-100] * (length - 2) + [1, 2], [])


def lengths(runs: list[list[Encoded]]) -> list[list[int]]:
    return [[len(item.ids) for item in run] for run in runs]


def test_one_long_row_gets_its_own_group():
    items = [encoded(n) for n in (200, 275, 205, 198, 210, 201)]
    assert lengths(length_groups(items, 1)) == [[198, 200, 201, 205, 210, 275]]
    assert lengths(length_groups(items, 2)) == [[198, 200, 201, 205, 210], [275]]


def test_equal_lengths_stay_one_group_and_every_item_is_kept():
    assert lengths(length_groups([encoded(50)] * 5, 3)) == [[50] * 5]
    items = [encoded(n) for n in (30, 90, 31, 88, 60, 59, 32)]
    runs = length_groups(items, 3)
    assert sorted(len(i.ids) for run in runs for i in run) == sorted(len(i.ids) for i in items)
    assert lengths(runs) == [[30, 31, 32], [59, 60], [88, 90]]
    assert length_groups([encoded(7)], 4) and len(length_groups([encoded(7)], 4)) == 1


def test_grouped_gradients_equal_the_padded_batch(tiny_lm_dir, tmp_path):
    """Weighted by their supervised tokens, the groups' gradients sum to the whole batch's (float32)."""
    import json

    model_file = tmp_path / "tiny.json"
    tiny = tiny_config(tiny_lm_dir)
    model_file.write_text(json.dumps(tiny.to_dict()))
    data = (DataSource("synth:qa", samples=8, turns=3, lang="zh"), DataSource("synth:qa", samples=8))
    grads = []
    for groups in (1, 2):
        config = TrainConfig(
            stage="stage2",
            model=str(model_file),
            projector=tiny.projector,
            data=data,
            length_groups=groups,
            seed=3,
        )
        from vlchat.train.datasets import build_samples

        vlm = build_model(config, torch.device("cpu"))
        module = TrainModule(vlm)
        batches = BatchMaker(build_samples(config.data), vlm, config)([0, 1, 2, 9, 10, 11, 12])
        assert len(batches) == groups
        for batch, weight in zip(batches, group_weights(batches)):
            loss = module(batch.ids, batch.labels, batch.attention_mask, batch.pixels, batch.position_ids)
            (loss * weight).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
