"""`vlchat weights apply-delta` on tiny LLaMA models: base + (target - base) gives the target back, with
the delta's larger vocabulary (LLaMA's 32000 against Vicuna v0's 32001, here 300 + 1), sharded
safetensors or `.bin` bases; bad inputs are one line through the CLI with exit code 2."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.cli_run import run_cli
from tests.hf_tiny import tiny_llama_config, tiny_tokenizer
from vlchat.delta import apply_delta


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base (300 tokens, `.bin`), a target with one more token (the pad Vicuna v0 added), and the
    delta target - base in the target's vocabulary, sharded safetensors with the target's tokenizer."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("delta")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    base.save_pretrained(root / "base", safe_serialization=False)
    target = LlamaForCausalLM(tiny_llama_config(len(tokenizer) + 1)).eval()
    delta = LlamaForCausalLM(tiny_llama_config(len(tokenizer) + 1)).eval()
    with torch.no_grad():
        base_state = base.state_dict()
        for key, value in delta.state_dict().items():
            b = base_state[key]
            value.copy_(target.state_dict()[key])
            value[tuple(slice(0, n) for n in b.shape)] -= b
    delta.save_pretrained(root / "delta", max_shard_size="100KB")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(root / "delta")
    return root, target


def test_round_trip_gives_the_target_with_its_vocabulary(models, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    root, target = models
    vocabulary = len(tiny_tokenizer()) + 1
    assert len(list((root / "delta").glob("*.safetensors"))) > 1  # sharded, with an index
    out = apply_delta(root / "base", root / "delta", tmp_path / "out")
    rebuilt = LlamaForCausalLM.from_pretrained(out).eval()
    assert rebuilt.get_input_embeddings().weight.shape[0] == target.config.vocab_size == vocabulary
    for key, value in target.state_dict().items():
        assert torch.allclose(rebuilt.state_dict()[key], value, atol=1e-6), key
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"  # the delta's tokenizer


def test_ziya_style_takes_the_deltas_embeddings_whole(models, tmp_path):
    """Fengshenbang-LM's apply_delta: embed_tokens and lm_head come from the delta as they are."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    root, target = models
    ziya = tmp_path / "ziya-delta"
    shutil.copytree(root / "delta", ziya)
    for path in ziya.glob("*.safetensors"):
        state = load_file(path)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                state[key] = target.state_dict()[key].clone()
        save_file(state, path, metadata={"format": "pt"})
    rebuilt = LlamaForCausalLM.from_pretrained(apply_delta(root / "base", ziya, tmp_path / "out", "delta"))
    for key, value in target.state_dict().items():
        assert torch.allclose(rebuilt.state_dict()[key], value, atol=1e-6), key


def test_the_cli_prints_the_folder(models, tmp_path, monkeypatch, capsys):
    root, _ = models
    code, out, _ = run_cli(
        monkeypatch, capsys, "weights", "apply-delta", "--base", str(root / "base"), "--delta", str(root / "delta"),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 0 and out.strip() == str(tmp_path / "o")


def wrong_shape(models, tmp_path):
    """A delta made for a wider model: the base's q_proj does not fit."""
    from transformers import LlamaForCausalLM

    wide = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer()) + 1, hidden_size=64, num_attention_heads=4))
    wide.save_pretrained(tmp_path / "wide")
    return ["--base", str(models[0] / "base"), "--delta", str(tmp_path / "wide")]


@pytest.mark.parametrize(
    "make_args, words",
    [
        (lambda m, t: ["--base", str(t / "nope"), "--delta", str(m[0] / "delta")], ["--base", "no such directory"]),
        (wrong_shape, ["weight '", ", 64) in the delta but (", ", 32) in the base", "width"]),
        (lambda m, t: ["--base", str(m[0] / "delta"), "--delta", str(m[0] / "base")], ["at least its vocabulary"]),
    ],
)
def test_bad_inputs_fail_with_one_line(models, tmp_path, monkeypatch, capsys, make_args, words):
    args = make_args(models, tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "weights", "apply-delta", *args, "--out", str(tmp_path / "out"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err
