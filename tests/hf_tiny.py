"""Tiny random Hugging Face checkpoints built from configs and saved locally (no downloads).

A tiny SentencePiece-style BPE tokenizer (Metaspace pre-tokenizer, as LLaMA's) is trained on a few
sentences, so the prompt tokenization paths of real Llama-family checkpoints are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CORPUS = [
    "USER: What is in the picture? ASSISTANT: A cat sits on a red mat.",
    "Describe the image in detail. The dog runs in the green park near a blue car.",
    "system user assistant You are a helpful assistant. Answer the question briefly.",
    "Hello! How are you today? I am fine, thank you. What colour is the sky?",
] * 4
# LLaVA-1.5's chat template as published with llava-hf checkpoints (processor chat_template): roles
# upper-cased, images first as "<image>\n", each text followed by a space, generation prompt "ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(extra_special: tuple[str, ...] = (), vocab_size: int = 300, chat_template: str | None = None):
    """A LLaMA-style tokenizer: <unk>=0, <s>=1, </s>=2, then `extra_special`, byte fallback BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Trained with words split at "▁" (no piece spans two words, as in LLaMA's SentencePiece model),
    # then run unsplit with the "▁" prepended at the start only, as transformers converts LLaMA's tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials + bytes_, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(extra_special),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**base, **overrides})


def photo(seed: int = 0, size: tuple[int, int] = (50, 40)) -> Image.Image:
    """A random RGB image, not square, so resize and crop matter."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def save_preprocessor(out: Path, kind: str, size: int) -> None:
    """preprocessor_config.json as CLIP (shortest edge + center crop) or SigLIP (square resize) publish it."""
    if kind == "clip":
        config = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
        }
    else:
        config = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def tiny_clip_vision_config(image_size: int = 28, patch_size: int = 7):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )


def tiny_siglip_vision_config(image_size: int = 28, patch_size: int = 7):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def save_tiny_vision(out: Path, kind: str, seed: int = 0) -> Path:
    """A standalone CLIP or SigLIP vision tower directory: weights + config + preprocessor config."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    torch.manual_seed(seed)
    config = tiny_clip_vision_config() if kind == "clip" else tiny_siglip_vision_config()
    model = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_preprocessor(out, kind, config.image_size)
    return out


def save_tiny_llava(out: Path, seed: int = 0):
    """A tiny random LlavaForConditionalGeneration (CLIP tower, mlp2x_gelu, LLaMA) with its processor files."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer(("<image>",), chat_template=LLAVA_TEMPLATE)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = tiny_clip_vision_config()
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=tiny_llama_config(len(tokenizer)).to_dict(),
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    config.vision_config.model_type = "clip_vision_model"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_preprocessor(out, "clip", vision.image_size)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE}))
    processor = {
        "processor_class": "LlavaProcessor",
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # CLIP's CLS, dropped by the "default" strategy
        "image_token": "<image>",
    }
    (out / "processor_config.json").write_text(json.dumps(processor))
    return model, tokenizer


# A Qwen2.5-style ChatML template that writes a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)


def save_tiny_causal_lm(out: Path, chat_template: str = CHATML_TEMPLATE, seed: int = 0):
    """A tiny random LLaMA causal LM directory whose tokenizer has ChatML markers and a chat template."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(("<|im_start|>", "<|im_end|>"), chat_template=chat_template)
    tokenizer.eos_token = "<|im_end|>"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


def tiny_gpt2_tokenizer(vocab_size: int = 300):
    """An OPT-style byte-level BPE tokenizer (GPT-2's): <s>=0, <pad>=1, </s>=2 (BOS and EOS, as OPT's),
    <unk>=3, then "<image>"; the tokenizer adds "</s>" in front of a text, as OPT's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS + ["Question: what is this? Answer: a cat."] * 4, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def tiny_blip2_config(vocab_size: int, image_token: int, num_query_tokens: int = 8):
    """BLIP-2 with a tiny ViT (28 px, 7 px patches: 16 patches + CLS), a 2-layer Q-Former and a tiny OPT."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
    )
    qformer = Blip2QFormerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=24,
        cross_attention_frequency=1,
        vocab_size=50,
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        init_std=0.3,  # far from uniform logits: greedy decoding then varies its tokens
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token,
    )


def save_tiny_blip2(out: Path, seed: int = 0, num_query_tokens: int = 8):
    """A tiny random Blip2ForConditionalGeneration (OPT decoder) with its processor files, as
    Salesforce/blip2-opt-* publish them (BlipImageProcessor: 224 -> here 28 px square, CLIP mean/std)."""
    from transformers import Blip2ForConditionalGeneration

    tokenizer = tiny_gpt2_tokenizer()
    config = tiny_blip2_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), num_query_tokens)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random query tokens (the init leaves them at zero: every query the same)
        model.query_tokens.normal_(std=0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    preprocess = {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True,
        "size": {"height": 28, "width": 28},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2))
    processor = {"processor_class": "Blip2Processor", "num_query_tokens": num_query_tokens}
    (out / "processor_config.json").write_text(json.dumps(processor))
    return model, tokenizer


def save_tiny_vision_model(root: Path, kind: str, tie: bool = False, projector: dict | None = None) -> Path:
    """A vlchat model config file (YAML) over a tiny CLIP or SigLIP tower (layer -2, as LLaVA-1.5) and
    a tiny LLaMA with a ChatML template, as a training recipe's `model:` names it; returns its path."""
    import yaml
    from transformers import LlamaForCausalLM

    tower = save_tiny_vision(root / f"{kind}-tower", kind)
    tokenizer = tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), tie_word_embeddings=tie)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    model = {
        "name": f"tiny-{kind}",
        "vision": {"name": kind, "image_size": 28, "patch_size": 7, "weights": None, "sha256": None},
        "projector": projector or {"kind": "mlp2x_gelu", "in_dim": 24, "out_dim": 32},
        "lm": {"source": str(root / "lm"), "sha256": None, "dtype": "float32"},
        "template": "chatml",
        "projector_weights": None,
    }
    model["vision"] |= {"source": str(tower), "feature_layer": -2}
    (root / "model.yaml").write_text(yaml.safe_dump(model))
    return root / "model.yaml"


def tiny_bert_tokenizer(vocab_size: int = 120):
    """A BERT-style WordPiece tokenizer (lower-cased; [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4) that
    writes "[CLS] text [SEP]", as InstructBLIP's `qformer_tokenizer` (bert-base-uncased) does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tiny_instructblip_config(vocab_size: int, qformer_vocab_size: int, image_token: int, num_query_tokens: int = 8):
    """InstructBLIP with a tiny ViT (28 px, 7 px patches: 16 patches + CLS), a 2-layer Q-Former that
    reads text, and a tiny LLaMA (Vicuna's architecture)."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

    vision = InstructBlipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
    )
    qformer = InstructBlipQFormerConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        cross_attention_frequency=1,
        vocab_size=qformer_vocab_size,
        max_position_embeddings=64,
    )
    # random weights far from uniform logits: greedy decoding then varies its tokens
    text = tiny_llama_config(vocab_size, initializer_range=0.3)
    return InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token,
    )


def save_tiny_instructblip(out: Path, seed: int = 0, num_query_tokens: int = 8):
    """A tiny random InstructBlipForConditionalGeneration (LLaMA decoder) with its processor files as
    Salesforce/instructblip-vicuna-* publish them: the LM tokenizer (with "<image>") at the top,
    `qformer_tokenizer/`, preprocessor_config.json (BlipImageProcessor: 224 -> here 28 px square) and
    processor_config.json."""
    from transformers import InstructBlipForConditionalGeneration

    tokenizer, qformer_tokenizer = tiny_tokenizer(("<image>",)), tiny_bert_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_instructblip_config(len(tokenizer), len(qformer_tokenizer), image_token, num_query_tokens)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # random query tokens (the init leaves them at zero: every query the same)
        model.query_tokens.normal_(std=0.5)
        for weight in model.qformer.parameters():  # larger Q-Former weights: the question then matters
            if weight.dim() > 1:
                weight.normal_(std=0.3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")
    preprocess = {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True,
        "size": {"height": 28, "width": 28},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2))
    processor = {"processor_class": "InstructBlipProcessor", "num_query_tokens": num_query_tokens}
    (out / "processor_config.json").write_text(json.dumps(processor))
    return model, tokenizer
