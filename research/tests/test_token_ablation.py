"""The image-token ablation (research/token_ablation.py): grid orders, what each ablation does
to the projector's output tokens, that the projector is restored, and the CLI on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_config

from research.token_ablation import ABLATIONS, Ablation, ablated, grid_order, main
from vlchat.config import ProjectorConfig
from vlchat.errors import VlchatError
from vlchat.model.projector import Projector

IN, OUT, N = 12, 8, 9  # a 3x3 grid


def test_grid_orders_mirror_a_row_major_grid_left_to_right():
    assert grid_order(9, "mirrored").tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6]
    assert grid_order(4, "same").tolist() == [0, 1, 2, 3]
    permuted = grid_order(49, "permuted")
    assert sorted(permuted.tolist()) == list(range(49)) and permuted.tolist() != list(range(49))
    assert torch.equal(permuted, grid_order(49, "permuted"))  # seeded
    with pytest.raises(VlchatError, match="no square grid"):
        grid_order(5, "mirrored")


@pytest.fixture
def projector() -> Projector:
    torch.manual_seed(0)
    projector = Projector(
        ProjectorConfig(kind="mlp2x_gelu", in_dim=IN, out_dim=OUT, position_tokens=N, position_code=3.0)
    )
    with torch.no_grad():
        projector.position.normal_()  # trained embeddings are not zero
    return projector


def test_each_ablation_moves_content_or_slot_signals_and_the_projector_is_restored(projector):
    features = torch.randn(2, N, IN)
    mirror = grid_order(N, "mirrored")
    with torch.no_grad():
        plain = projector(features)
        with ablated(projector, Ablation("x", content="mirrored", slots="mirrored"), N):
            everything = projector(features)
        # content and slot signals mirrored together: the same tokens, in mirrored slots
        torch.testing.assert_close(everything, plain[:, mirror])
        with ablated(projector, Ablation("x", content="mirrored"), N):
            content_only = projector(features)
        assert not torch.allclose(content_only, plain[:, mirror])  # the slots still say where they are
        with ablated(projector, Ablation("x", slots="zeroed"), N):
            zeroed = projector(features)
        bare = Projector(ProjectorConfig(kind="mlp2x_gelu", in_dim=IN + 6, out_dim=OUT))
        bare.net.load_state_dict(projector.net.state_dict())
        torch.testing.assert_close(zeroed, bare(torch.cat([features, torch.zeros(2, N, 6)], -1)))
        torch.testing.assert_close(projector(features), plain)  # restored
    assert "forward" not in vars(projector)
    assert [a.name for a in ABLATIONS][0] == "as trained" and len({a.name for a in ABLATIONS}) == len(ABLATIONS)


def test_cli_prints_a_table_per_ablation_and_fails_cleanly(tiny_lm_dir, tmp_path, capsys):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_config(tiny_lm_dir).to_dict()))
    assert main(["--model", str(model), "--scenes", "2"]) == 0
    out = capsys.readouterr().out
    header = re.search(r"^\| image tokens (\| \w+ \((\d+)\) )+\|$", out, re.M)
    assert header and "| all (" in header.group(0)
    for ablation in ABLATIONS:
        assert re.search(rf"^\| {ablation.name} (\| \d+ )+\|$", out, re.M), ablation.name
    assert main(["--model", str(model), "--scenes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --scenes must be at least 1"
