"""`vlchat export --format hf-llava`: a run on a tiny CLIP or SigLIP model exports to a directory that
transformers' LlavaForConditionalGeneration loads with the same logits as vlchat (within 1e-4), and
that vlchat's own LLaVA loader loads back to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tests.hf_tiny import photo, save_tiny_vision_model
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.projector import Projector, save_projector
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model
from vlchat.train.export_llava import export_llava, run_model_config


def tiny_run(root, kind: str, tie: bool, projector: dict | None = None):
    """A finished-looking run: its recipe's config.json names a model config file (tiny tower + LM)
    and a trained (here: random) projector sits beside it."""
    model_file = save_tiny_vision_model(root, kind, tie, projector)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": str(model_file), "lm": "frozen"}))
    torch.manual_seed(2)
    trained = Projector(model_config(str(model_file)).projector)
    for p in trained.parameters():
        p.data.normal_(0, 0.3)
    save_projector(trained, run / "projector")
    return run


def logits_with_image(vlm, token_ids: list[int], image_at: int) -> torch.Tensor:
    """vlchat's logits (T, V) for ids with one image's slots at `image_at`."""
    n = vlm.tokens_per_image
    ids = torch.tensor([token_ids[:image_at] + [IMAGE_TOKEN_ID] * n + token_ids[image_at:]])
    with torch.no_grad():
        images = vlm.encode_images(vlm.pixels(photo())[None])
        return vlm.lm.model(inputs_embeds=vlm.embed(ids, images)).logits[0]


TEXT = [1, 5, 9, 17, 3, 40, 41]


@pytest.mark.parametrize("kind,tie", [("clip", False), ("siglip", True)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kind, tie):
    from transformers import LlavaForConditionalGeneration

    run = tiny_run(tmp_path, kind, tie)
    config, _ = run_model_config(run)
    vlm = load_model(config)
    ours = logits_with_image(vlm, TEXT, 2)  # (T, V)
    out = export_llava(run, tmp_path / "exported")

    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    image_token = llava.config.image_token_index
    n = llava.config.image_seq_length
    ids = torch.tensor([TEXT[:2] + [image_token] * n + TEXT[2:]])
    pixels = vlm.pixels(photo())[None]
    with torch.no_grad():
        theirs = llava(input_ids=ids, pixel_values=pixels).logits[0]
    vocab = ours.shape[-1]
    assert theirs.shape[0] == ours.shape[0] and theirs.shape[-1] >= vocab  # + the added <image> row
    assert (theirs[:, :vocab] - ours).abs().max() < 1e-4
    assert (ours[-1] - ours[0]).abs().max() > 1e-3  # not a constant: the comparison means something

    back = load_model(replace(model_config(str(out)), lm=replace(model_config(str(out)).lm, dtype="float32")))
    assert (logits_with_image(back, TEXT, 2)[:, :vocab] - ours).abs().max() < 1e-4


def test_runs_without_a_llava_equivalent_are_refused(tmp_path):
    run = tiny_run(tmp_path, "clip", False, {"kind": "linear", "in_dim": 24, "out_dim": 32})
    with pytest.raises(VlchatError, match="needs an mlp2x_gelu projector|has an mlp2x_gelu projector"):
        export_llava(run, tmp_path / "out")
    (run / "projector.safetensors").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "vlchat.cli", "export", str(tmp_path / "out"), "--run", str(run)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no trained projector" in result.stderr
    assert len(result.stderr.splitlines()) == 1
