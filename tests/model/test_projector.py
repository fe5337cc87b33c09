"""Tests for vlchat.model.projector: the kind registry's shapes and sizes, atomic save/load round
trips with a config check, and the seeded fresh fallback that leaves the global RNG alone."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlchat.config import DEFAULT_PROJECTOR, ModelConfig, ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.model.projector import (
    PROJECTORS,
    Projector,
    build_projector,
    load_projector,
    read_projector_config,
    save_projector,
)

IN, OUT = 40, 24


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_every_kind_maps_b_n_in_to_b_n_out(kind):
    projector = Projector(ProjectorConfig(kind=kind, in_dim=IN, out_dim=OUT))
    features = torch.randn(3, 5, IN)  # (B, N, Dv)
    assert projector(features).shape == (3, 5, OUT)  # (B, N, D)


def test_param_counts():
    linear = Projector(ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT))
    mlp = Projector(ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT))
    assert n_params(linear) == IN * OUT + OUT
    assert n_params(mlp) == (IN * OUT + OUT) + (OUT * OUT + OUT)


def test_default_linear_matches_minigpt4_llama_proj_size():
    assert n_params(Projector(ProjectorConfig())) == 1280 * 576 + 576


def test_files_from_before_output_rms_was_removed_load_at_its_no_op_value_only(tmp_path):
    """Older files (the shipped default-projector.json among them) hold `output_rms: 0.0`, which
    did nothing; any other value trained a layer this version does not have."""
    config = ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT)
    save_projector(Projector(config), tmp_path / "p")
    meta = tmp_path / "p.json"
    assert "output_rms" not in meta.read_text()
    stored = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stored, "output_rms": 0.0}))
    assert load_projector(str(tmp_path / "p"), config).config == config
    assert read_projector_config(str(tmp_path / "p")) == config
    meta.write_text(json.dumps({**stored, "output_rms": 0.133}))
    for load in (
        lambda: load_projector(str(tmp_path / "p"), config),
        lambda: read_projector_config(str(tmp_path / "p")),
    ):
        with pytest.raises(VlchatError, match=r"p.json: output_rms 0.133 is no longer supported \(only 0.0\)") as info:
            load()
        assert "\n" not in str(info.value)
    meta.write_text(json.dumps({**stored, "scale": 2}))
    with pytest.raises(VlchatError, match="unknown projector config .* keys: scale"):
        read_projector_config(str(tmp_path / "p"))


def test_the_shipped_projector_config_reads_as_the_default_presets():
    """(It was written with `output_rms: 0.0`, before the field was removed.)"""
    assert read_projector_config(DEFAULT_PROJECTOR) == ModelConfig().projector


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"position_tokens": -1}, "position_tokens must be an integer >= 0"),
        ({"position_tokens": 2.5}, "position_tokens must be an integer >= 0"),
        ({"position_code": -1.0}, "position_code must be a number >= 0"),
        ({"position_code": 1.0}, "position_code needs a square token grid, but position_tokens is 0"),
        ({"in_dim": 0}, "in_dim and out_dim must be integers >= 1"),
        ({"kind": ""}, "kind must be a non-empty string"),
    ],
)
def test_projector_config_checks_its_fields(fields, message):
    with pytest.raises(VlchatError, match=f"projector {message}"):
        ProjectorConfig(**{"in_dim": IN, "out_dim": OUT, **fields})


def test_position_code_appends_each_tokens_row_and_column_before_the_first_layer():
    config = ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT, position_tokens=9, position_code=5.0)
    projector = Projector(config)
    code = projector.grid_code  # (9, 6): row one-hot ++ column one-hot, times 5
    assert code.shape == (9, 6) and projector.net[0].in_features == IN + 6
    assert code[5].tolist() == [0, 5, 0, 0, 0, 5]  # token 5 of a 3x3 grid: row 1, column 2
    features = torch.randn(2, 9, IN)
    with torch.no_grad():
        # the same features in two cells leave the projector as two different tokens
        same = features[:, :1].expand(-1, 9, -1)
        out = projector(same)
        assert not torch.allclose(out[:, 0], out[:, 5])
        first = projector.net[0](torch.cat([features, code.expand(2, -1, -1)], -1))
        torch.testing.assert_close(projector.net[2](projector.net[1](first)), projector(features))
    plain = Projector(ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT, position_tokens=9))
    assert n_params(projector) == n_params(plain) + 6 * OUT  # the code is a buffer, its weights are trained
    assert "grid_code" not in projector.state_dict()  # not stored: it follows from the config


def test_position_code_round_trips_and_needs_a_square_grid(tmp_path):
    config = ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT, position_tokens=4, position_code=2.0)
    saved = Projector(config)
    save_projector(saved, tmp_path / "p")
    loaded = load_projector(str(tmp_path / "p"), config)
    features = torch.randn(1, 4, IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), saved(features))
    for tokens in (0, 5):
        with pytest.raises(VlchatError, match="position_code needs a square token grid"):
            Projector(ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT, position_tokens=tokens, position_code=1.0))


def test_unknown_kind_lists_the_choices():
    with pytest.raises(VlchatError, match="unknown projector 'qformer'") as err:
        Projector(ProjectorConfig(kind="qformer", in_dim=IN, out_dim=OUT))
    for kind in PROJECTORS:
        assert kind in str(err.value)


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_save_load_round_trip(tmp_path, kind):
    config = ProjectorConfig(kind=kind, in_dim=IN, out_dim=OUT)
    torch.manual_seed(1)
    projector = Projector(config)
    stem = tmp_path / "sub" / "proj"
    save_projector(projector, stem)

    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["proj.json", "proj.safetensors"]
    assert not list(tmp_path.rglob("*.tmp"))
    loaded = load_projector(str(stem), config)
    assert loaded.config == config
    features = torch.randn(2, 3, IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features), projector(features), rtol=0, atol=0)


def test_save_overwrites_atomically(tmp_path):
    config = ProjectorConfig(in_dim=IN, out_dim=OUT)
    stem = tmp_path / "proj"
    save_projector(Projector(config), stem)
    second = Projector(config)
    save_projector(second, stem)
    loaded = load_projector(str(stem), config)
    for a, b in zip(loaded.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "other",
    [
        ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT + 1),
        ProjectorConfig(kind="linear", in_dim=IN + 1, out_dim=OUT),
        ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT),
    ],
)
def test_load_with_mismatched_config_raises(tmp_path, other):
    save_projector(Projector(ProjectorConfig(kind="linear", in_dim=IN, out_dim=OUT)), tmp_path / "proj")
    with pytest.raises(VlchatError, match="the model needs"):
        load_projector(str(tmp_path / "proj"), other)


def test_build_projector_mismatch_is_not_silently_replaced(tmp_path):
    """A saved projector of the wrong shape is an error, not a quiet fresh fallback."""
    save_projector(Projector(ProjectorConfig(in_dim=IN, out_dim=OUT)), tmp_path / "proj")
    with pytest.raises(VlchatError):
        build_projector(ProjectorConfig(in_dim=IN, out_dim=OUT + 1), str(tmp_path / "proj"))


def test_build_projector_loads_saved_weights(tmp_path, caplog):
    config = ProjectorConfig(in_dim=IN, out_dim=OUT)
    saved = Projector(config)
    save_projector(saved, tmp_path / "proj")
    with caplog.at_level(logging.WARNING, logger="vlchat.model.projector"):
        built = build_projector(config, str(tmp_path / "proj"))
    assert "FRESH" not in caplog.text
    assert torch.equal(built.net[0].weight, saved.net[0].weight)


@pytest.mark.parametrize("stem", ["missing", None])
def test_build_projector_fresh_is_seeded_and_keeps_global_rng(tmp_path, caplog, stem):
    """A missing trained projector warns loudly; None asks for a fresh one on purpose (no warning)."""
    config = ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT)
    stem = str(tmp_path / stem) if stem else None
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="vlchat.model.projector"):
        a = build_projector(config, stem, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert ("FRESH" in caplog.text) == (stem is not None)

    b = build_projector(config, stem, seed=7)
    c = build_projector(config, stem, seed=8)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    assert torch.equal(torch.get_rng_state(), before)


def test_stems_with_dots_do_not_collide(tmp_path):
    config = ProjectorConfig(in_dim=IN, out_dim=OUT)
    first, second = Projector(config), Projector(config)
    save_projector(first, tmp_path / "stage1.a")
    save_projector(second, tmp_path / "stage1.b")
    loaded = load_projector(str(tmp_path / "stage1.a"), config)
    assert torch.equal(loaded.net[0].weight, first.net[0].weight)
