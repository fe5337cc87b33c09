"""`--resume`'s recipe check: which changes keep the same run (the end-to-end kill-and-resume
tests are in test_trainer.py)."""

from __future__ import annotations

from dataclasses import replace

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
    older = {key: value for key, value in saved.items() if key != "length_groups"}
    assert recipe_changes(older, 1, TrainConfig(data=data, batch_size=4), 1) == []  # keys it predates: defaults
    assert recipe_changes(older, 1, TrainConfig(data=data, batch_size=4, length_groups=1), 1) == [
        "length_groups 2 -> 1"
    ]


def test_checkpoints_from_before_the_nested_projector_resume_with_the_same_projector():
    """Flat projector keys (`projector: mlp2x_gelu`, `position_tokens`, `projector_position_code`)
    mean today's `projector:` fields; removed keys resume only at the value that trains as now."""
    data = (DataSource("synth:qa", samples=16),)
    now = TrainConfig(data=data)  # the default preset's projector: mlp2x_gelu, 49 tokens, code 50
    flat = {key: value for key, value in now.to_dict().items() if key != "projector"}
    flat |= {"projector": "mlp2x_gelu", "position_tokens": 49, "projector_position_code": 50}
    flat |= {"projector_output_rms": 0.0, "loss_weighting": "token"}
    assert recipe_changes(flat, 1, now, 1) == []
    assert recipe_changes({**flat, "projector_position_code": 0.0}, 1, now, 1) == [
        "projector.position_code 0.0 -> 50.0"
    ]
    older = {key: value for key, value in flat.items() if key not in ("position_tokens", "projector_position_code")}
    assert recipe_changes({**older, "projector": "linear"}, 1, now, 1) == [  # keys it predates: their old defaults
        "projector.kind 'linear' -> 'mlp2x_gelu'",
        "projector.position_tokens 0 -> 49",
        "projector.position_code 0.0 -> 50.0",
    ]
    assert recipe_changes({**flat, "projector_output_rms": 0.133, "loss_weighting": "answer"}, 1, now, 1) == [
        "projector_output_rms 0.133, no longer supported",
        "loss_weighting 'answer', no longer supported",
    ]
    linear = replace(now, projector=replace(now.projector, kind="linear"))
    assert recipe_changes(now.to_dict(), 1, linear, 1) == ["projector.kind 'mlp2x_gelu' -> 'linear'"]
