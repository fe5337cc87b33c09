"""MiniGPT-4 from its release files: tiny random files written in its real three-file layout and key
names (LAVIS's `eva_vit_g.pth` with one block more than used, `blip2_pretrained_flant5xxl.pth` with the
Q-Former's unused text parts and the T5 projection, `pretrained_minigpt4.pth` = {"model": llama_proj}),
named by an eval YAML of MiniGPT-4's shape, run through vlchat's engine against a reference forward
written here from MiniGPT-4's published code structure (eva_vit.py, Qformer.py's BertLayer for query
tokens, minigpt4.py `encode_img`, minigpt_base.py `get_context_emb`, conversation.py prompts)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.cli_run import run_cli
from tests.hf_tiny import photo, tiny_llama_config, tiny_tokenizer
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import slot_ids
from vlchat.chat.templates import MINIGPT4_SYSTEM
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model

VIT, VIT_HEADS, VIT_MLP, FILE_BLOCKS, PATCH, IMAGE = 176, 2, 64, 3, 14, 28  # EVA-g: 1408, 16, 6144, 40, 14, 224
QF, QF_HEADS, QF_FFN, QF_LAYERS, QUERIES = 128, 2, 64, 2, 4  # BERT-base: 768, 12, 3072, 12; 32 queries
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
QUESTION = "What is in the picture?"


def rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def norm(prefix: str, width: int) -> dict:
    return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}


def linear(prefix: str, out: int, inp: int, bias: bool = True) -> dict:
    weights = {f"{prefix}.weight": rand(out, inp, scale=1 / math.sqrt(inp))}
    return weights | ({f"{prefix}.bias": rand(out, scale=0.05)} if bias else {})


def eva_state() -> dict:
    state = {
        "cls_token": rand(1, 1, VIT),
        "pos_embed": rand(1, (IMAGE // PATCH) ** 2 + 1, VIT),
        "patch_embed.proj.weight": rand(VIT, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(VIT, scale=0.05),
    }
    for i in range(FILE_BLOCKS):
        p = f"blocks.{i}"
        state |= norm(f"{p}.norm1", VIT) | norm(f"{p}.norm2", VIT)
        state |= linear(f"{p}.attn.qkv", 3 * VIT, VIT, bias=False) | linear(f"{p}.attn.proj", VIT, VIT)
        state |= {f"{p}.attn.q_bias": rand(VIT, scale=0.05), f"{p}.attn.v_bias": rand(VIT, scale=0.05)}
        state |= linear(f"{p}.mlp.fc1", VIT_MLP, VIT) | linear(f"{p}.mlp.fc2", VIT, VIT_MLP)
    return state


def blip2_state() -> dict:
    """LAVIS names; the text-only parts MiniGPT-4 deletes and the T5 projection are there too."""
    bert = "Qformer.bert"
    state = norm("ln_vision", VIT) | {"query_tokens": rand(1, QUERIES, QF)} | norm(f"{bert}.embeddings.LayerNorm", QF)
    state |= {f"{bert}.embeddings.word_embeddings.weight": rand(50, QF), "Qformer.cls.predictions.bias": rand(50)}
    state |= {f"{bert}.embeddings.position_embeddings.weight": rand(20, QF), "t5_proj.weight": rand(16, QF)}
    for i in range(QF_LAYERS):
        p = f"{bert}.encoder.layer.{i}"
        blocks = [("attention", QF)] + ([("crossattention", VIT)] if i % 2 == 0 else [])
        for name, kv_width in blocks:
            state |= linear(f"{p}.{name}.self.query", QF, QF)
            state |= linear(f"{p}.{name}.self.key", QF, kv_width) | linear(f"{p}.{name}.self.value", QF, kv_width)
            state |= linear(f"{p}.{name}.output.dense", QF, QF) | norm(f"{p}.{name}.output.LayerNorm", QF)
        for branch in ("", "_query"):  # "" = the text path, unused
            state |= linear(f"{p}.intermediate{branch}.dense", QF_FFN, QF)
            state |= linear(f"{p}.output{branch}.dense", QF, QF_FFN) | norm(f"{p}.output{branch}.LayerNorm", QF)
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Both variants' files in one folder: eval YAMLs as MiniGPT-4 ships them, plus llama_model and ckpt."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("minigpt4")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    lm = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    lm.save_pretrained(out / "vicuna")
    tokenizer.save_pretrained(out / "vicuna")
    torch.save(eva_state(), out / "eva_vit_g.pth")
    torch.save({"model": blip2_state()}, out / "blip2_pretrained_flant5xxl.pth")
    width = lm.config.hidden_size
    torch.save({"model": linear("llama_proj", width, QF)}, out / "pretrained_minigpt4.pth")
    torch.save({"model": linear("llama_proj", width, 4 * VIT)}, out / "pretrained_minigpt4_llama2.pth")
    write_yaml(out / "minigpt4_eval.yaml", "pretrain_vicuna0", "###", "###Human: {} ###Assistant: ")
    write_yaml(out / "minigpt4_llama2_eval.yaml", "pretrain_llama2", "</s>", "[INST] {} [/INST] ", ckpt_tail="_llama2")
    return out, lm, tokenizer


def write_yaml(path: Path, model_type: str, end_sym: str, prompt: str, ckpt_tail: str = "", **extra) -> Path:
    model = {"arch": "minigpt4", "model_type": model_type, "max_txt_len": 160, "end_sym": end_sym}
    model |= {"low_resource": True, "prompt_template": prompt, "ckpt": f"pretrained_minigpt4{ckpt_tail}.pth"}
    model |= {"llama_model": "vicuna", "image_size": IMAGE, **extra}
    data = {"model": model, "run": {"task": "image_text_pretrain"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def float32(config):
    return replace(config, lm=replace(config.lm, dtype="float32"))


# --- the reference, from MiniGPT-4's code structure --------------------------------------------


def ref_pixels(image) -> torch.Tensor:
    """blip2_image_eval: bicubic resize to IMAGE x IMAGE, to [0, 1], CLIP normalisation."""
    array = np.asarray(image.convert("RGB").resize((IMAGE, IMAGE), 3), dtype=np.float32) / 255
    return ((torch.from_numpy(array) - torch.tensor(MEAN)) / torch.tensor(STD)).permute(2, 0, 1)[None]


def heads_attention(q, k, v, heads):
    b, n, d = q.shape
    split = [t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads)
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, n, d)


def ref_eva(s: dict, pixels) -> torch.Tensor:
    """VisionTransformer.forward_features with depth = blocks - 1, then ln_vision."""
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s["cls_token"], x.flatten(2).transpose(1, 2)], 1) + s["pos_embed"]
    for i in range(FILE_BLOCKS - 1):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (VIT,), s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros(VIT), s[p + "attn.v_bias"]])
        q, k, v = F.linear(h, s[p + "attn.qkv.weight"], bias).chunk(3, -1)
        x = x + F.linear(heads_attention(q, k, v, VIT_HEADS), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.layer_norm(x, (VIT,), s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    return x


def ref_qformer(s: dict, image_embeds) -> torch.Tensor:
    """Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds): post-norm BERT layers
    over the queries; cross-attention in every 2nd layer; the queries' own feed-forward (`*_query`)."""

    def lin(x, name):
        return F.linear(x, s[name + ".weight"], s[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (QF,), s[name + ".weight"], s[name + ".bias"], 1e-12)

    h = ln(s["query_tokens"], "Qformer.bert.embeddings.LayerNorm")
    for i in range(QF_LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}."
        for name, source in [("attention", None)] + ([("crossattention", image_embeds)] if i % 2 == 0 else []):
            kv = h if source is None else source
            a = heads_attention(lin(h, p + name + ".self.query"), lin(kv, p + name + ".self.key"),
                                lin(kv, p + name + ".self.value"), QF_HEADS)  # fmt: skip
            h = ln(lin(a, p + name + ".output.dense") + h, p + name + ".output.LayerNorm")
        f = F.gelu(lin(h, p + "intermediate_query.dense"))
        h = ln(lin(f, p + "output_query.dense") + h, p + "output_query.LayerNorm")
    return h


def ref_image_embeds(folder: Path, qformer: bool) -> torch.Tensor:
    """MiniGPT4.encode_img for one image."""
    eva = torch.load(folder / "eva_vit_g.pth", weights_only=True)
    blip2 = torch.load(folder / "blip2_pretrained_flant5xxl.pth", weights_only=True)["model"]
    ckpt = "pretrained_minigpt4.pth" if qformer else "pretrained_minigpt4_llama2.pth"
    proj = torch.load(folder / ckpt, weights_only=True)["model"]
    x = ref_eva(eva, ref_pixels(photo()))
    if qformer:
        x = F.layer_norm(x, (VIT,), blip2["ln_vision.weight"], blip2["ln_vision.bias"])
        x = ref_qformer(blip2, x)
    else:  # ln_vision as initialised (the LLaMA-2 variant trains none), CLS dropped, 4 tokens concatenated
        x = F.layer_norm(x, (VIT,))[:, 1:].reshape(1, -1, 4 * VIT)
    return F.linear(x, proj["llama_proj.weight"], proj["llama_proj.bias"])[0]


def ref_prompt(qformer: bool) -> str:
    """Chat.upload_img + ask + answer_prepare with CONV_VISION_Vicuna0 / CONV_VISION_LLama2."""
    user = f"<Img><ImageHere></Img> {QUESTION}"
    if qformer:
        return f"{MINIGPT4_SYSTEM}###Human: {user}###Assistant: "
    return f"{MINIGPT4_SYSTEM}<s>[INST] {user} [/INST] "


def ref_ids(tokenizer, prompt: str, image_tokens: int) -> list[int]:
    """get_context_emb: split at <ImageHere>, each piece tokenized alone, BOS on the first only."""
    pieces = [tokenizer(seg, add_special_tokens=i == 0).input_ids for i, seg in enumerate(prompt.split("<ImageHere>"))]
    return pieces[0] + [IMAGE_TOKEN_ID] * image_tokens + pieces[1]


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["minigpt4_eval.yaml", "minigpt4_llama2_eval.yaml"])
def variant(request, release):
    folder, lm, tokenizer = release
    model = load_model(float32(model_config(str(folder / request.param))))
    return request.param == "minigpt4_eval.yaml", model, lm, tokenizer, folder


def test_config_comes_from_the_yaml_and_the_files(release):
    folder = release[0]
    vicuna = model_config(str(folder / "minigpt4_eval.yaml"))
    assert (vicuna.template, vicuna.projector.kind, vicuna.projector.in_dim, vicuna.projector.out_dim) == (
        "minigpt4_vicuna0",
        "qformer",
        VIT,
        32,
    )
    assert (vicuna.vision.name, vicuna.vision.image_size, vicuna.vision.patch_size) == ("eva_vit_g", IMAGE, PATCH)
    llama2 = model_config(str(folder / "minigpt4_llama2_eval.yaml"))
    assert (llama2.template, llama2.projector.kind) == ("minigpt4_llama2", "concat4")


def test_prompt_ids_and_logits_equal_minigpt4s(variant):
    qformer, model, lm, tokenizer, folder = variant
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=6))
    session.upload_img(photo())
    session.ask(QUESTION)
    ids = slot_ids(session.position_keys(session.conversation()))
    image_tokens = QUERIES if qformer else (IMAGE // PATCH) ** 2 // 4
    assert model.tokens_per_image == image_tokens
    expected = ref_ids(tokenizer, ref_prompt(qformer), image_tokens)
    assert ids == expected
    assert torch.allclose(model.pixels(photo())[None], ref_pixels(photo()), atol=1e-5)
    with torch.no_grad():
        theirs_image = ref_image_embeds(folder, qformer)
        ours_image = model.encode_images(model.pixels(photo())[None])[0]
        assert ours_image.shape == theirs_image.shape == (image_tokens, 32)
        assert (ours_image - theirs_image).abs().max() < 1e-4
        ids_tensor = torch.tensor([expected])
        embeds = lm.get_input_embeddings()(ids_tensor.clamp(min=0))
        embeds[ids_tensor == IMAGE_TOKEN_ID] = theirs_image
        theirs = lm(inputs_embeds=embeds).logits[0]
        ours = model.lm.model(inputs_embeds=model.embed(ids_tensor, ours_image[None])).logits[0]
    assert (ours - theirs).abs().max() < 1e-4
    session.answer()  # greedy, as MiniGPT-4's generate with num_beams=1 and do_sample=False
    with torch.no_grad():
        generated = lm.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)[0].tolist()
    theirs = generated[: generated.index(2)] if 2 in generated else generated
    ours = list(session.messages[-1].token_ids or model.lm.tokenize(session.messages[-1].content))
    assert len(set(ours)) > 1 and ours == theirs


def test_a_follow_up_turn_is_rendered_as_minigpt4_does(variant):
    """conversation.py's get_prompt after one answer (the answer's own token ids are kept by vlchat)."""
    from vlchat.chat.template_lookup import get_template

    qformer, model, _, _, _ = variant
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=3))
    session.upload_img(photo())
    session.ask(QUESTION)
    session.answer()
    answer = session.messages[-1].content
    session.ask("And its colour?")
    if qformer:
        expected = f"{ref_prompt(True)}{answer}###Human: And its colour?###Assistant: "
    else:
        expected = f"{ref_prompt(False)}{answer}<s>[INST] And its colour? [/INST] "
    template = get_template(model.config.template)
    assert "<s>" + expected == template.render(session.conversation())


def edit_yaml(folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the Vicuna YAML in another folder, its paths absolute, with `changes` to model:."""
    data = yaml.safe_load((folder / "minigpt4_eval.yaml").read_text())
    data["model"] |= {"ckpt": str(folder / "pretrained_minigpt4.pth"), "llama_model": str(folder / "vicuna")}
    data["model"] |= changes
    path = tmp_path / "minigpt4_eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_eva_and_qformer_files_are_found_beside_the_ckpt(release, tmp_path):
    path = edit_yaml(release[0], tmp_path)  # the YAML elsewhere: files found beside ckpt
    assert model_config(str(path)).projector.kind == "qformer"
    (tmp_path / "vicuna").mkdir()
    with pytest.raises(VlchatError, match="not a Hugging Face model directory"):
        model_config(str(edit_yaml(release[0], tmp_path, llama_model=str(tmp_path / "vicuna"))))


def test_the_llama2_projection_with_the_qformer_variant_names_the_cause(release, tmp_path):
    path = edit_yaml(release[0], tmp_path, ckpt=str(release[0] / "pretrained_minigpt4_llama2.pth"))
    with pytest.raises(VlchatError) as error:
        model_config(str(path))
    assert "reads 704-wide inputs but the Q-Former give 128" in str(error.value)
    assert "pretrain_llama2" in str(error.value)


# --- through the CLI: one line, exit code 2 ----------------------------------------------------


def test_ask_answers_through_the_cli(release, monkeypatch, capsys, tmp_path):
    photo().save(tmp_path / "p.png")
    args = ["ask", "--model", str(release[0] / "minigpt4_eval.yaml"), "-i", str(tmp_path / "p.png")]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--max-new-tokens", "3", QUESTION)
    assert code == 0 and out.strip(), err


def wider_lm(folder: Path, tmp_path: Path) -> Path:
    """The 4096-vs-5120 case in small: an LM twice as wide as the projection's output."""
    import json
    import shutil

    shutil.copytree(folder / "vicuna", tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    return edit_yaml(folder, tmp_path, llama_model=str(tmp_path / "wide"))


class Payload:
    def __reduce__(self):
        return (print, ("this would run at load",))


def pickled_object(folder: Path, tmp_path: Path) -> Path:
    state = torch.load(folder / "pretrained_minigpt4.pth", weights_only=True)
    torch.save(state | {"config": Payload()}, tmp_path / "evil.pth")
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"):  # found beside the YAML
        (tmp_path / name).symlink_to(folder / name)
    return edit_yaml(folder, tmp_path, ckpt=str(tmp_path / "evil.pth"))


@pytest.mark.parametrize(
    "make_yaml, words",
    [
        (wider_lm, ["llama_proj in pretrained_minigpt4.pth is 32-wide but the LM wide is 64", "use the"]),
        (pickled_object, ["refused to load", "evil.pth", "pickles Python objects", "weights_only"]),
        (lambda f, t: edit_yaml(f, t, arch="minigpt_v2"), ["arch 'minigpt_v2' is not supported"]),
    ],
)
def test_wrong_files_fail_in_one_line_through_the_cli(release, tmp_path, monkeypatch, capsys, make_yaml, words):
    photo().save(tmp_path / "p.png")
    path = make_yaml(release[0], tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(path), "-i", str(tmp_path / "p.png"), "Hi?")
    assert code == 2 and "this would run" not in out + err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


# --- placement: the device/dtype/load-in/device-map options reach every part ---------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_dtype_option_reaches_every_part(release, dtype):
    """vlchat.load(..., dtype=...) as the CLI's --dtype: ViT, projection and LM in it; ln_vision and the
    Q-Former in float32 (LAVIS computes that LayerNorm in float32, BLIP-2 keeps the Q-Former so); a turn runs."""
    import vlchat

    chat = vlchat.load(str(release[0] / "minigpt4_eval.yaml"), device="cpu", dtype=dtype)
    model, want = chat.model, getattr(torch, dtype)
    assert model.lm.model.dtype == want
    assert {p.dtype for p in model.vision.vit.parameters()} == {want}
    assert model.vision.ln_vision.weight.dtype == torch.float32
    assert model.projector.language_projection.weight.dtype == want
    assert model.projector.query_tokens.dtype == torch.float32
    chat.upload_img(photo())
    chat.ask(QUESTION)
    assert chat.answer(max_new_tokens=3)


def test_auto_dtype_follows_the_requested_device_not_the_gpu(release, monkeypatch):
    """`auto` on `--device cpu` is the CPU's choice (float32 without native bfloat16) even where a GPU is
    present: the dtype is resolved for the model's device, as the other loaders do."""
    from vlchat.model import placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    config = placement.with_placement(model_config(str(release[0] / "minigpt4_eval.yaml")), "cpu", "auto", None, None)
    model = load_model(config)
    assert model.lm.model.dtype == torch.float32 and next(model.vision.parameters()).dtype == torch.float32


class Stop(Exception):
    """Raised by the fake from_pretrained once it has seen its arguments."""


def test_quantization_and_device_map_reach_the_lms_from_pretrained(release, monkeypatch):
    """With a GPU and bitsandbytes faked present (nothing runs on them): the LM's from_pretrained gets
    the quantization config and the device placement, as for the other families."""
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
    yaml_path = str(release[0] / "minigpt4_eval.yaml")
    with pytest.raises(Stop):
        load_model(placement.with_placement(model_config(yaml_path), "cuda", "float16", "8bit", None))
    assert seen["args"] == (release[0].resolve() / "vicuna",) and seen["dtype"] == torch.float16
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": "cuda"}
    with pytest.raises(Stop):
        load_model(placement.with_placement(model_config(yaml_path), "auto", "bfloat16", "4bit", "auto"))
    assert seen["device_map"] == "auto" and seen["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "options, words",
    [
        (["--device", "cuda"], "device 'cuda' is not available here (0 CUDA device(s)); use --device cpu"),
        (["--dtype", "float16"], "dtype float16 runs on GPUs only"),
        (["--device-map", "auto"], "--device-map auto spreads a model over GPUs; no CUDA GPU here"),
    ],
)
def test_device_options_without_a_gpu_are_refused_in_one_line(release, monkeypatch, capsys, tmp_path, options, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    photo().save(tmp_path / "p.png")
    args = ["ask", "--model", str(release[0] / "minigpt4_eval.yaml"), *options, "-i", str(tmp_path / "p.png"), "Hi?"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and words in err
