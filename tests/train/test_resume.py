"""`--resume`'s recipe check: which changes keep the same run (the end-to-end kill-and-resume
tests are in test_trainer.py)."""

from __future__ import annotations

from vlchat.train.recipe import DataSource, TrainConfig
from vlchat.train.resume import recipe_changes


def test_resume_may_split_the_global_batch_differently_but_not_change_the_run():
    data = (DataSource("synth:qa", samples=16),)
    saved = TrainConfig(data=data, batch_size=4).to_dict()
    assert recipe_changes(saved, 1, TrainConfig(data=data, batch_size=2), 2) == []  # same samples per step
    assert recipe_changes(saved, 1, TrainConfig(data=data, batch_size=2, grad_accum=2), 1) == []
    assert recipe_changes(saved, 1, TrainConfig(data=data, batch_size=2), 1) == [
        "global batch (batch_size x grad_accum x processes) 4 -> 2"
    ]
    assert recipe_changes(saved, 1, TrainConfig(data=data, batch_size=4, save_every=7, log_every=3), 1) == []
    assert recipe_changes(saved, 1, TrainConfig(data=data, batch_size=4, compile=True), 1) == []  # same math
    assert recipe_changes(saved, 1, TrainConfig(data=(DataSource("synth:qa", samples=8),), batch_size=4), 1) == [
        "data sources differ"
    ]
    older = {key: value for key, value in saved.items() if key not in ("loss_weighting", "length_groups")}
    assert recipe_changes(older, 1, TrainConfig(data=data, batch_size=4), 1) == []  # keys it predates: defaults
    assert recipe_changes(older, 1, TrainConfig(data=data, batch_size=4, length_groups=1), 1) == [
        "length_groups 2 -> 1"
    ]
