"""Ziya-BLIP2-14B-Visual-v1 from its two repositories, named by a ziya_visual YAML: a tiny random visual
directory in the assumed layout (transformers' Blip2Config pieces in config.json; BLIP-2's weights without
the LM: vision_model.*, query_tokens, qformer.*, language_projection.*) and a tiny LLaMA directory, run
through vlchat's engine against a reference forward written here from the published usage code:

    lm_model = LlamaForCausalLM.from_pretrained(LM); tokenizer = LlamaTokenizer.from_pretrained(LM)
    model = <visual repository>; model.language_model = lm_model
    image_processor = BlipImageProcessor(size={"height": s, "width": s}, image_mean=CLIP, image_std=CLIP)
    model.chat(tokenizer=..., pixel_values=image_processor(image).pixel_values, query=..., previous_querys=[], ...)

Inside `chat` (its code is on the model hub only), BLIP-2's structure is ASSUMED: pixels -> vision_model ->
qformer(query_tokens, cross-attending the image) -> language_projection -> those embeddings first, then
the embeddings of tokenizer("<human>:" + query + "\\n<bot>:") with its BOS, as BLIP-2 generates. The
prompt text itself is the Ziya model cards' (tests/test_python_api.py checks the turns)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.cli_run import run_cli
from tests.hf_tiny import photo, tiny_llama_config, tiny_tokenizer
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import slot_ids
from vlchat.config import GenerationConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model

QUESTION = "What is in the picture?"
QUERIES, IMAGE, PATCH = 8, 28, 7  # Ziya-Visual: 32 queries, 224 px, ViT-g's 14 px patches
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NEW_TOKENS = 8


def visual_config(text_config):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=24,
        cross_attention_frequency=2,  # as BLIP-2's Q-Former: cross-attention in every 2nd layer
        vocab_size=50,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=QUERIES,
    )


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The two repositories and a ziya_visual YAML beside them; returns (folder, reference, lm, tokenizer)."""
    from transformers import Blip2ForConditionalGeneration, LlamaForCausalLM

    out = tmp_path_factory.mktemp("ziya")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_config = tiny_llama_config(len(tokenizer), initializer_range=0.3)  # varied greedy tokens
    lm = LlamaForCausalLM(text_config).eval()
    lm.save_pretrained(out / "Ziya-LLaMA-13B-v1")
    tokenizer.save_pretrained(out / "Ziya-LLaMA-13B-v1")
    reference = Blip2ForConditionalGeneration(visual_config(text_config)).eval()
    with torch.no_grad():  # random queries (the init leaves them at zero: every query the same)
        reference.query_tokens.normal_(std=0.5)
    reference.language_model = lm  # as the published usage attaches the separately loaded LM
    save_visual(reference, out / "Ziya-BLIP2-14B-Visual-v1")
    write_yaml(out / "ziya.yaml", "Ziya-BLIP2-14B-Visual-v1", "Ziya-LLaMA-13B-v1")
    return out, reference, lm, tokenizer


def save_visual(reference, directory: Path, keep_lm: bool = False) -> None:
    """config.json (Blip2Config, architectures as the remote class is named) + BLIP-2's weights without the LM."""
    directory.mkdir(parents=True, exist_ok=True)
    config = reference.config.to_dict() | {"architectures": ["ZiyaBLIP2ForConditionalGeneration"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(
        {k: v for k, v in state.items() if keep_lm or not k.startswith("language_model.")},
        directory / "model.safetensors",
    )


def write_yaml(path: Path, visual: str, lm: str | None) -> Path:
    block = {"visual_model": visual} | ({"language_model": lm} if lm is not None else {})
    path.write_text(yaml.safe_dump({"ziya_visual": block}))
    return path


def float32(config: ModelConfig) -> ModelConfig:
    return replace(config, lm=replace(config.lm, dtype="float32"))


@pytest.fixture(scope="module")
def vlchat_model(release):
    return load_model(float32(model_config(str(release[0] / "ziya.yaml"))))


# --- the reference, from the published usage and BLIP-2's structure ---------------------------


def ref_pixels() -> torch.Tensor:
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return processor(photo(), return_tensors="pt").pixel_values  # (1, 3, S, S)


def ref_image_embeds(reference) -> torch.Tensor:
    """vision_model -> qformer with query_tokens -> language_projection: (1, Q, D)."""
    image_embeds = reference.vision_model(pixel_values=ref_pixels()).last_hidden_state
    queries = reference.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = reference.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    return reference.language_projection(out)


def ref_prompt_ids(tokenizer, query: str = QUESTION) -> list[int]:
    """The Ziya cards' prompt for a first turn, tokenized with the tokenizer's BOS."""
    return tokenizer(f"<human>:{query}\n<bot>:").input_ids


def ref_embeds(reference, tokenizer) -> torch.Tensor:
    """The image's embeddings first, then the prompt's (BLIP-2's order)."""
    ids = torch.tensor([ref_prompt_ids(tokenizer)])
    return torch.cat([ref_image_embeds(reference), reference.language_model.get_input_embeddings()(ids)], dim=1)


def ref_greedy(reference, tokenizer) -> list[int]:
    with torch.no_grad():
        out = reference.language_model.generate(
            inputs_embeds=ref_embeds(reference, tokenizer), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    tokens = out[0].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def asked_session(model):
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    session.upload_img(photo())
    session.ask(QUESTION)
    return session


# --- the tests ---------------------------------------------------------------------------------


def test_config_comes_from_the_yaml_and_both_repositories(release):
    config = model_config(str(release[0] / "ziya.yaml"))
    assert (config.vision.name, config.vision.image_size, config.vision.patch_size) == ("blip2", IMAGE, PATCH)
    assert (config.vision.keep_cls, config.vision.source) == (True, str(release[0] / "Ziya-BLIP2-14B-Visual-v1"))
    assert (config.projector.kind, config.projector.in_dim, config.projector.out_dim) == ("qformer", 24, 32)
    assert (config.template, config.lm.source) == ("ziya", str(release[0] / "Ziya-LLaMA-13B-v1"))
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # data, serialisable


def test_prompt_and_pixels_follow_the_published_usage(vlchat_model, release):
    _, _, _, tokenizer = release
    assert vlchat_model.tokens_per_image == QUERIES
    session = asked_session(vlchat_model)
    ids = slot_ids(session.position_keys(session.conversation()))
    assert ids == [IMAGE_TOKEN_ID] * QUERIES + ref_prompt_ids(tokenizer)
    assert ids[QUERIES] == 1  # LLaMA's BOS right after the image
    assert torch.allclose(vlchat_model.pixels(photo())[None], ref_pixels(), atol=1e-5)


def test_image_features_and_logits_equal_the_reference(vlchat_model, release):
    _, reference, _, tokenizer = release
    with torch.no_grad():
        theirs = ref_image_embeds(reference)[0]
        ours = vlchat_model.encode_images(vlchat_model.pixels(photo())[None])[0]
        assert ours.shape == theirs.shape == (QUERIES, 32)
        assert (ours - theirs).abs().max() < 1e-4
        their_logits = reference.language_model(inputs_embeds=ref_embeds(reference, tokenizer)).logits[0]
        ids = torch.tensor([[IMAGE_TOKEN_ID] * QUERIES + ref_prompt_ids(tokenizer)])
        embeds = vlchat_model.embed(ids, ours[None])
        our_logits = vlchat_model.lm.model(inputs_embeds=embeds).logits[0]
        last, _ = vlchat_model.lm.prefill(embeds)
    assert (our_logits - their_logits).abs().max() < 1e-4
    assert (last[0] - their_logits[-1]).abs().max() < 1e-4


def test_greedy_tokens_equal_the_reference(vlchat_model, release):
    _, reference, _, tokenizer = release
    session = asked_session(vlchat_model)
    session.answer()
    ours = list(session.messages[-1].token_ids or vlchat_model.lm.tokenize(session.messages[-1].content))
    theirs = ref_greedy(reference, tokenizer)
    assert len(set(ours)) > 1  # a real sequence, not one token repeated
    assert ours == theirs


def test_ziyas_chat_verb_answers_as_the_reference(release):
    """Ziya's `chat(query, previous_querys, previous_outputs)` (image given) through vlchat.load."""
    import vlchat

    folder, reference, _, tokenizer = release
    ziya = vlchat.load(str(folder / "ziya.yaml"), dtype="float32")
    answer = ziya.chat(QUESTION, [], [], image=photo(), max_new_tokens=NEW_TOKENS)
    assert answer and list(ziya.session.messages[-1].token_ids) == ref_greedy(reference, tokenizer)


def test_bfloat16_puts_the_parts_in_it_and_keeps_the_qformer_in_float32(release):
    config = model_config(str(release[0] / "ziya.yaml"))
    model = load_model(replace(config, lm=replace(config.lm, dtype="bfloat16")))
    assert model.lm.model.dtype == torch.bfloat16
    assert next(model.vision.parameters()).dtype == torch.bfloat16
    assert model.projector.query_tokens.dtype == torch.float32
    assert model.projector.language_projection.weight.dtype == torch.bfloat16
    session = asked_session(model)
    session.answer()  # runs end to end in bfloat16
    assert session.messages[-1].role == "assistant"


# --- wrong pairs and layouts: one line, exit code 2, through the CLI ---------------------------


def wider_lm(folder: Path, tmp_path: Path) -> Path:
    """The 13B visual part (5120) with a 7B LM (4096), in small: an LM twice as wide as the projection."""
    shutil.copytree(folder / "Ziya-LLaMA-13B-v1", tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    return write_yaml(tmp_path / "ziya.yaml", str(folder / "Ziya-BLIP2-14B-Visual-v1"), str(tmp_path / "wide"))


def full_blip2(folder: Path, tmp_path: Path, reference) -> Path:
    save_visual(reference, tmp_path / "blip2-full", keep_lm=True)
    return write_yaml(tmp_path / "ziya.yaml", str(tmp_path / "blip2-full"), str(folder / "Ziya-LLaMA-13B-v1"))


def edited_visual(folder: Path, tmp_path: Path, edit) -> Path:
    shutil.copytree(folder / "Ziya-BLIP2-14B-Visual-v1", tmp_path / "visual")
    state = load_file(tmp_path / "visual" / "model.safetensors")
    save_file(edit(state), tmp_path / "visual" / "model.safetensors")
    return write_yaml(tmp_path / "ziya.yaml", str(tmp_path / "visual"), str(folder / "Ziya-LLaMA-13B-v1"))


def with_foreign_key(state: dict) -> dict:
    return state | {"ln_vision.weight": torch.ones(24)}  # LAVIS's name: another layout


def without_query_tokens(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "query_tokens"}


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda f, t, r: wider_lm(f, t),
            ["language_projection in Ziya-BLIP2-14B-Visual-v1 makes 32-wide embeddings", "wide is 64-wide"],
        ),
        (full_blip2, ["holds language model weights such as 'language_model.", "complete BLIP-2", "--model"]),
        (
            lambda f, t, r: edited_visual(f, t, with_foreign_key),
            ["weight 'ln_vision.weight' outside vision_model/qformer", "not the BLIP-2 key layout"],
        ),
        (lambda f, t, r: edited_visual(f, t, without_query_tokens), ["lacks the Q-Former weight 'query_tokens'"]),
        (
            lambda f, t, r: write_yaml(t / "ziya.yaml", str(f / "Ziya-BLIP2-14B-Visual-v1"), None),
            ["ziya_visual.language_model is not set"],
        ),
        (lambda f, t, r: f / "Ziya-BLIP2-14B-Visual-v1", ["without a language model", "ziya_visual:", "--model"]),
    ],
)
def test_wrong_pairs_fail_in_one_line_through_the_cli(release, tmp_path, monkeypatch, capsys, make, words):
    folder, reference, _, _ = release
    photo().save(tmp_path / "p.png")
    target = make(folder, tmp_path, reference)
    code, _, err = run_cli(monkeypatch, capsys, "ask", "--model", str(target), "-i", str(tmp_path / "p.png"), "Hi?")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


def test_ask_answers_through_the_cli(release, monkeypatch, capsys, tmp_path):
    photo().save(tmp_path / "p.png")
    args = ["ask", "--model", str(release[0] / "ziya.yaml"), "-i", str(tmp_path / "p.png"), "--dtype", "float32"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--max-new-tokens", "3", QUESTION)
    assert code == 0 and out.strip(), err


def test_a_config_that_does_not_fit_the_weights_is_refused(release, tmp_path):
    shutil.copytree(release[0] / "Ziya-BLIP2-14B-Visual-v1", tmp_path / "visual")
    config = json.loads((tmp_path / "visual" / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 40
    (tmp_path / "visual" / "config.json").write_text(json.dumps(config))
    path = write_yaml(tmp_path / "ziya.yaml", str(tmp_path / "visual"), str(release[0] / "Ziya-LLaMA-13B-v1"))
    with pytest.raises(VlchatError, match=r"vision tower weight 'encoder.layers.0.mlp.fc1.bias' is \(48,\) in the"):
        load_model(float32(model_config(str(path))))


class Stop(Exception):
    """Raised by the fake from_pretrained once it has seen its arguments."""


def test_quantization_and_device_map_reach_the_lms_from_pretrained(release, monkeypatch):
    """With a GPU and bitsandbytes faked present (nothing runs on them): Ziya-LLaMA's from_pretrained gets
    the quantization config and the device placement (the visual parts load first, on the CPU)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from vlchat.model import placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    seen: dict = {}

    def fake(cls, *args, **kwargs):
        seen.update(kwargs, args=args)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fake))
    config = placement.with_placement(model_config(str(release[0] / "ziya.yaml")), "cuda", "float16", "8bit", None)
    with pytest.raises(Stop):
        load_model(config)
    assert seen["args"] == (release[0].resolve() / "Ziya-LLaMA-13B-v1",) and seen["dtype"] == torch.float16
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": "cuda"}
