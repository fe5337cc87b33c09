"""InternLM2 chat checkpoints without remote code: a tiny random checkpoint written in InternLM2's own
key layout and config.json (packed `wqkv`, `tok_embeddings`, `feed_forward.w1/w2/w3`, `output`, two
`.bin` shards with an index, an InternLM2Tokenizer tokenizer_config), converted to LLaMA by vlchat and
run through its engine, against a reference forward written here from InternLM2's published modeling
code (InternLM2Attention / InternLM2MLP / InternLM2RMSNorm)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tests.hf_tiny import tiny_tokenizer
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import slot_ids
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import load_model

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 32, 4, 2, 2, 64
HEAD_DIM, GROUPS = HIDDEN // HEADS, HEADS // KV_HEADS
THETA, EPS = 1_000_000.0, 1e-5


def internlm2_config(vocab: int) -> dict:
    """config.json as internlm2-chat checkpoints write it (remote-code classes in auto_map)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "attn_implementation": "eager",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 256,
        "model_type": "internlm2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": EPS,
        "rope_scaling": None,
        "rope_theta": THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab,
    }


def internlm2_weights(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"model.tok_embeddings.weight": rand(vocab, HIDDEN, scale=1.0), "output.weight": rand(vocab, HIDDEN)}
    state["model.norm.weight"] = 1 + rand(HIDDEN, scale=0.1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "attention.wqkv.weight"] = rand((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        state[p + "attention.wo.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        state[p + "feed_forward.w1.weight"] = rand(FFN, HIDDEN)
        state[p + "feed_forward.w3.weight"] = rand(FFN, HIDDEN)
        state[p + "feed_forward.w2.weight"] = rand(HIDDEN, FFN)
        state[p + "attention_norm.weight"] = 1 + rand(HIDDEN, scale=0.1)
        state[p + "ffn_norm.weight"] = 1 + rand(HIDDEN, scale=0.1)
        state[p + "attention.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)  # old checkpoints carry it
    return state


def save_internlm2(out, state: dict, config: dict, tokenizer) -> None:
    """Two pytorch_model-0000N-of-00002.bin shards and their index, as internlm2-chat-7b ships."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, out / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "InternLM2Tokenizer"
    tok_config["auto_map"] = {
        "AutoTokenizer": [
            "tokenization_internlm2.InternLM2Tokenizer",
            "tokenization_internlm2_fast.InternLM2TokenizerFast",
        ]
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))


# --- the reference: InternLM2's forward, written from its modeling code ---------------------------
def rms_norm(x, weight):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + EPS))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(state: dict, ids: list[int]) -> torch.Tensor:
    """(T, V) logits of InternLM2ForCausalLM on `ids` (no cache, causal attention)."""
    t = len(ids)
    x = state["model.tok_embeddings.weight"][torch.tensor(ids)]  # (T, D)
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (T, d)
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, state[p + "attention_norm.weight"])
        qkv = (h @ state[p + "attention.wqkv.weight"].T).view(t, KV_HEADS, GROUPS + 2, HEAD_DIM)  # "(h gs d)"
        q = qkv[:, :, :GROUPS].reshape(t, HEADS, HEAD_DIM).transpose(0, 1)  # (H, T, d): head h*G + g
        k = qkv[:, :, -2].transpose(0, 1)  # (KV, T, d)
        v = qkv[:, :, -1].transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(GROUPS, dim=0), v.repeat_interleave(GROUPS, dim=0)  # (H, T, d)
        scores = q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM) + mask
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(t, HIDDEN)
        x = x + attn @ state[p + "attention.wo.weight"].T
        h = rms_norm(x, state[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ state[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ state[p + "feed_forward.w3.weight"].T)) @ state[p + "feed_forward.w2.weight"].T
    return rms_norm(x, state["model.norm.weight"]) @ state["output.weight"].T


# --- tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = tiny_tokenizer(("<|im_start|>", "<|im_end|>"))
    state = internlm2_weights(len(tokenizer))
    out = tmp_path_factory.mktemp("internlm2") / "tiny-internlm2-chat"
    save_internlm2(out, state, internlm2_config(len(tokenizer)), tokenizer)
    return out, state


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("vlchat-home")


@pytest.fixture(scope="module")
def vlchat_model(checkpoint, home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLCHAT_HOME", str(home))
        config = model_config(str(checkpoint[0]))
        return load_model(replace(config, lm=replace(config.lm, dtype="float32")))


def test_config_uses_the_internlm2_template(checkpoint):
    config = model_config(str(checkpoint[0]))
    assert (config.template, config.vision, config.projector) == ("internlm2", None, None)
    assert config.checkpoint == str(checkpoint[0].resolve())


def test_converted_once_into_a_llama_directory(vlchat_model, checkpoint, home):
    converted = list((home / "converted" / "internlm2").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-internlm2-chat-")
    assert json.loads((converted[0] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in json.loads((converted[0] / "tokenizer_config.json").read_text())
    assert len(list(converted[0].glob("model-0000?-of-00002.safetensors"))) == 2  # shard by shard
    assert type(vlchat_model.lm.model).__name__ == "LlamaForCausalLM"
    mtime = (converted[0] / "vlchat-converted.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLCHAT_HOME", str(home))
        load_model(model_config(str(checkpoint[0])))  # cached: not converted again
    assert (converted[0] / "vlchat-converted.json").stat().st_mtime_ns == mtime


def test_logits_equal_the_internlm2_reference_forward(vlchat_model, checkpoint):
    session = Chat(vlchat_model).session(generation=GenerationConfig(max_new_tokens=8))
    session.ask("Hello! What colour is the sky?")
    ids = slot_ids(session.position_keys(session.conversation()))
    assert ids[0] == 1  # "<s>" of the internlm2 template
    theirs = reference_logits(checkpoint[1], ids)
    with torch.no_grad():
        ours = vlchat_model.lm.model(input_ids=torch.tensor([ids])).logits[0]
        last, _ = vlchat_model.lm.prefill(vlchat_model.embed(torch.tensor([ids]), None))
    assert (ours - theirs).abs().max() < 1e-4
    assert (last[0] - theirs[-1]).abs().max() < 1e-4


def test_greedy_generation_follows_the_reference(vlchat_model, checkpoint):
    session = Chat(vlchat_model).session(generation=GenerationConfig(max_new_tokens=6))
    session.ask("Hello! What colour is the sky?")
    ids = slot_ids(session.position_keys(session.conversation()))
    session.answer()
    ours = list(session.messages[-1].token_ids or vlchat_model.lm.tokenize(session.messages[-1].content))
    expected = []
    for _ in range(len(ours)):
        expected.append(int(reference_logits(checkpoint[1], ids + expected)[-1].argmax()))
    assert len(ours) > 0 and ours == expected


def edited_copy(checkpoint, tmp_path, edit):
    import shutil

    copy = tmp_path / "tiny-internlm2-edited"
    shutil.copytree(checkpoint[0], copy)
    edit(copy)
    return copy


def other_kv_heads(copy):
    config = json.loads((copy / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (copy / "config.json").write_text(json.dumps(config))


def drop_wo(copy):
    for path in copy.glob("pytorch_model-*.bin"):
        state = torch.load(path, weights_only=True)
        state.pop("model.layers.1.attention.wo.weight", None)
        torch.save(state, path)


def foreign_key(copy):
    path = copy / "pytorch_model-00001-of-00002.bin"
    state = torch.load(path, weights_only=True)
    state["model.layers.0.attention.q_norm.weight"] = torch.ones(HIDDEN)
    torch.save(state, path)


@pytest.mark.parametrize(
    "edit, words",
    [
        (other_kv_heads, ["attention.wqkv.weight", "(64, 32)", "(96, 32)", "4 key-value heads", "different models"]),
        (drop_wo, ["missing keys", "model.layers.1.self_attn.o_proj.weight"]),
        (foreign_key, ["unexpected weight 'model.layers.0.attention.q_norm.weight'", "InternLM2's key layout"]),
    ],
)
def test_wrong_checkpoints_fail_with_one_line(checkpoint, tmp_path, monkeypatch, edit, words):
    monkeypatch.setenv("VLCHAT_HOME", str(tmp_path / "home"))
    copy = edited_copy(checkpoint, tmp_path, edit)
    with pytest.raises(VlchatError) as error:
        load_model(model_config(str(copy)))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not list((tmp_path / "home" / "converted" / "internlm2").glob(".*tmp*"))  # no half-written cache
