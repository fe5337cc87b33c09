"""Device, dtype, 8-bit/4-bit and device-map requests: refused in one line where this machine cannot
honour them, and turned into the right `from_pretrained` keywords where it can.

No GPU and no bitsandbytes here: the quantized and device-mapped loads themselves are NOT run. The
tests stop at the boundary we can reach: the keywords handed to transformers' `from_pretrained`
(with a GPU and bitsandbytes faked present), and, run for real on the CPU, the LLaVA LM loaded
through `from_pretrained(key_mapping=...)`, the path quantized and device-mapped loads take.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from tests.hf_tiny import CHATML_TEMPLATE, save_tiny_llava, tiny_llama_config, tiny_tokenizer
from vlchat.config import LMConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model import placement
from vlchat.model.loaders import model_config
from vlchat.model.vlm import load_model


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def fake_gpu_and_bitsandbytes(monkeypatch):
    """A machine that looks like it has one GPU and bitsandbytes (nothing may actually use them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )


@pytest.mark.parametrize(
    "request_, words",
    [
        (("cuda", "auto", None, None), "device 'cuda' is not available here (0 CUDA device(s))"),
        (("cuda:1", "auto", None, None), "device 'cuda:1' is not available"),
        (("gpu", "auto", None, None), "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (("cpu", "float16", None, None), "dtype float16 runs on GPUs only"),
        (("auto", "float16", None, None), "dtype float16 runs on GPUs only"),
        (("cpu", "int8", None, None), "dtype must be one of auto, float32, bfloat16, float16"),
        (("cpu", "auto", "3bit", None), "load_in must be 8bit or 4bit"),
        (("cpu", "auto", None, "balanced"), "device_map must be auto"),
        (("cpu", "auto", None, "auto"), "--device-map auto spreads a model over GPUs; no CUDA GPU here"),
    ],
)
def test_requests_this_machine_cannot_honour_are_one_line_errors(no_gpu, request_, words):
    with pytest.raises(VlchatError, match="^" + words.replace("(", r"\(").replace(")", r"\)")) as error:
        placement.check_placement(*request_)
    assert "\n" not in str(error.value)


def test_load_in_without_bitsandbytes_or_without_a_gpu(no_gpu, monkeypatch):
    assert importlib.util.find_spec("bitsandbytes") is None  # this machine; with it the next check applies
    with pytest.raises(VlchatError, match="--load-in 8bit needs bitsandbytes: pip install bitsandbytes"):
        placement.check_placement("cpu", "auto", "8bit", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(VlchatError, match="--load-in 4bit needs a CUDA GPU"):
        placement.check_placement("cpu", "auto", "4bit", None)


def test_cpu_requests_pass_and_auto_means_the_cpu_without_a_gpu(no_gpu):
    assert placement.check_placement("auto", "bfloat16", None, None) == "cpu"
    assert placement.check_placement("cpu", "float32", None, None) == "cpu"
    assert placement.pretrained_kwargs(torch.float32, "cpu", None, None) == {}


def test_pretrained_keywords_for_quantized_and_mapped_loads():
    eight = placement.pretrained_kwargs(torch.float16, "cuda:0", "8bit", None)
    assert eight["device_map"] == {"": "cuda:0"} and eight["quantization_config"].load_in_8bit
    four = placement.pretrained_kwargs(torch.bfloat16, "cuda", "4bit", None)["quantization_config"]
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    mapped = placement.pretrained_kwargs(torch.bfloat16, "cuda", "4bit", "auto")
    assert mapped["device_map"] == "auto"
    assert placement.pretrained_kwargs(torch.bfloat16, "cuda", None, "auto") == {"device_map": "auto"}


def test_configs_refuse_unknown_names():
    with pytest.raises(VlchatError, match="lm load_in must be 8bit or 4bit"):
        LMConfig(load_in="2bit")
    with pytest.raises(VlchatError, match="device must be auto, cpu, cuda or cuda:N"):
        ModelConfig(device="tpu")
    assert LMConfig(dtype="float16", load_in="4bit", device_map="auto").load_in == "4bit"


class Stop(Exception):
    """Raised by the fake from_pretrained once it has seen its arguments."""


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-text-lm")
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "tiny-llava"
    return out, save_tiny_llava(out)[0]


def capture_from_pretrained(monkeypatch) -> dict:
    from transformers import AutoModelForCausalLM

    seen: dict = {}

    def fake(cls, *args, **kwargs):
        seen.update(kwargs, args=args)
        raise Stop

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fake))
    return seen


def test_text_checkpoint_hands_quantization_and_device_to_from_pretrained(
    text_dir, fake_gpu_and_bitsandbytes, monkeypatch
):
    seen = capture_from_pretrained(monkeypatch)
    config = placement.with_placement(model_config(str(text_dir)), "cuda", "float16", "8bit", None)
    with pytest.raises(Stop):
        load_model(config)
    assert seen["args"] == (text_dir.resolve(),) and seen["dtype"] == torch.float16
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": "cuda"}


def test_llava_lm_goes_through_from_pretrained_with_renamed_keys(llava_dir, fake_gpu_and_bitsandbytes, monkeypatch):
    seen = capture_from_pretrained(monkeypatch)
    config = placement.with_placement(model_config(str(llava_dir[0])), "auto", "bfloat16", "4bit", "auto")
    with pytest.raises(Stop):
        load_model(config)
    assert seen["device_map"] == "auto" and seen["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["config"].model_type == "llama" and seen["key_mapping"] == {
        r"^language_model\.model\.": "model.",
        r"^model\.language_model\.": "model.",
        r"^language_model\.lm_head\.": "lm_head.",
    }


def test_llava_lm_through_from_pretrained_equals_the_state_dict_path(llava_dir):
    """The from_pretrained(key_mapping=...) path, run for real without quantization, loads the very
    weights the usual path does (same logits)."""
    from transformers import AutoConfig

    from vlchat.model.loaders.llava import pretrained_lm

    config = model_config(str(llava_dir[0]))
    usual = load_model(replace(config, lm=replace(config.lm, dtype="float32"))).lm.model
    text_config = AutoConfig.from_pretrained(llava_dir[0]).text_config
    mapped = pretrained_lm(llava_dir[0], text_config, torch.float32, {})
    ids = torch.tensor([[1, 5, 9, 17, 3]])
    with torch.no_grad():
        assert torch.equal(usual(ids).logits, mapped(ids).logits)


def test_vlchat_load_refuses_what_this_machine_cannot_do(no_gpu, text_dir):
    import vlchat

    with pytest.raises(VlchatError, match="dtype float16 runs on GPUs only"):
        vlchat.load(str(text_dir), dtype="float16")
    with pytest.raises(VlchatError, match="device 'cuda' is not available here"):
        vlchat.load(str(text_dir), device="cuda")
    with pytest.raises(VlchatError, match="needs bitsandbytes"):
        vlchat.load(str(text_dir), device="cpu", load_in="8bit")
    model = vlchat.load(str(text_dir), device="auto", dtype="float32")
    assert model.model.config.device == "cpu" and model.model.lm.dtype == torch.float32
