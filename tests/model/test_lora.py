"""Gated LoRA (vlchat.model.lora): a sequence without an image runs the base LM bit for bit, one with
an image the merged adapter; batch rows are gated each on their own. On the tiny model with a random
adapter, then on the real default model (text chat = base SmolLM2, the shapes example still works)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from conftest import EXAMPLES, LORA_TARGETS

from vlchat.config import LMConfig
from vlchat.errors import VlchatError
from vlchat.model.language import LanguageModel, LMState, load_language_model, merge_adapter
from vlchat.model.lora import GatedLoRALinear, attach_adapter

PROMPT = "<|im_start|>user\nWhat colour is the cat on the mat?<|im_end|>\n<|im_start|>assistant\n"
STEPS = (20, 21, 22)


@pytest.fixture(scope="module")
def merged_lm(tiny_lm_dir, tiny_adapter_dir) -> LanguageModel:
    """The tiny LM with the adapter folded into its weights (how main loaded every adapter)."""
    lm = load_language_model(LMConfig(source=str(tiny_lm_dir), sha256=None, dtype="float32"))
    lm.model = merge_adapter(lm.model, str(tiny_adapter_dir)).eval()
    return lm


def run(lm: LanguageModel, adapter: bool, text: str = PROMPT) -> torch.Tensor:
    """Logits of a prefill then three decode steps, stacked: (4, V)."""
    logits, state = lm.prefill(lm.embed(torch.tensor([lm.tokenize(text)])), LMState(adapter=adapter))
    out = [logits]
    for token in STEPS:
        logits, state = lm.decode(torch.tensor([token]), state)
        out.append(logits)
    assert state.adapter is adapter
    return torch.cat(out)


def test_without_an_image_the_adapted_lm_is_the_base_lm_bit_for_bit(tiny_model, tiny_adapted_model):
    assert torch.equal(run(tiny_adapted_model.lm, False), run(tiny_model.lm, False))


def test_with_an_image_it_is_the_merged_adapter(tiny_adapted_model, tiny_model, merged_lm):
    on = run(tiny_adapted_model.lm, True)
    torch.testing.assert_close(on, run(merged_lm, False), rtol=0, atol=1e-5)
    assert (on - run(tiny_model.lm, False)).abs().max() > 0.1  # the adapter does change the logits


def test_each_batch_row_has_its_own_gate(tiny_model, tiny_adapted_model, merged_lm):
    lm = tiny_adapted_model.lm
    ids = torch.tensor([lm.tokenize(PROMPT)] * 2)  # (2, T)
    with torch.inference_mode():
        with lm.gated([True, False]):
            mixed = lm.model(input_ids=ids).logits  # (2, T, V)
        base = tiny_model.lm.model(input_ids=ids).logits
        merged = merged_lm.model(input_ids=ids).logits
    assert torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], merged[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 rows"), lm.gated([True, False, True]):
        lm.model(input_ids=ids)


def test_beam_search_keeps_the_gate_of_its_sequence(tiny_model, tiny_adapted_model, merged_lm):
    from vlchat.chat.beam import beam_search
    from vlchat.config import GenerationConfig

    config = GenerationConfig(num_beams=3, max_new_tokens=8)

    def beams(lm: LanguageModel, adapter: bool) -> str:
        logits, state = lm.prefill(lm.embed(torch.tensor([lm.tokenize(PROMPT)])), LMState(adapter=adapter))
        return "".join(chunk.text for chunk in beam_search(lm, logits, state, config, ()))

    on, off = beams(tiny_adapted_model.lm, True), beams(tiny_adapted_model.lm, False)
    assert on == beams(merged_lm, False) and off == beams(tiny_model.lm, False) and on != off


def test_the_gate_is_per_thread_and_reset_after_the_forward(tiny_adapted_model):
    gate = tiny_adapted_model.lm.adapter_gate
    seen = []
    with gate.on(True):
        assert gate.rows is True
        worker = threading.Thread(target=lambda: seen.append(gate.rows))
        worker.start()
        worker.join()
    assert seen == [None] and gate.rows is None
    with gate.on([False, False]):
        assert gate.rows is None  # all rows off: the plain base path
    with gate.on([True, True]):
        assert gate.rows is True


def test_state_dict_and_parameters_stay_the_base_lms(tiny_model, tiny_adapted_model):
    adapted, base = tiny_adapted_model.lm.model, tiny_model.lm.model
    assert adapted.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), base.state_dict().values()))
    gated = [name for name, m in adapted.named_modules() if isinstance(m, GatedLoRALinear)]
    assert len(gated) == 2 * len(LORA_TARGETS) and all(name.split(".")[-1] in LORA_TARGETS for name in gated)
    assert not any(p.requires_grad for p in adapted.parameters())


def test_the_gate_of_a_sequence(tiny_model, tiny_adapted_model):
    assert tiny_adapted_model.lm.adapter_on(True) and not tiny_adapted_model.lm.adapter_on(False)
    assert tiny_adapted_model.lm.adapter_on(False, has_tools=True)  # tool use is trained into the adapter
    assert not tiny_model.lm.adapter_on(True)  # no adapter: every cache stays shareable


def test_state_operations_keep_the_gate(tiny_adapted_model):
    lm = tiny_adapted_model.lm
    _, state = lm.prefill(lm.embed(torch.tensor([lm.tokenize(PROMPT)])), LMState(adapter=True))
    fork = state.fork()
    fork.repeat(2)
    fork.select(torch.tensor([1]))
    state.trim(3)
    assert fork.adapter and state.adapter
    state.trim(0)
    assert state.adapter and state.cache is None


def test_refuses_missing_and_unswitchable_adapters(tiny_lm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with pytest.raises(VlchatError, match="not found"):
        attach_adapter(LlamaForCausalLM.from_pretrained(tiny_lm_dir), str(tmp_path / "nothing"))
    dora = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_lm_dir), dora).save_pretrained(tmp_path / "dora")
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(VlchatError, match="cannot switch per conversation: .*q_proj"):
        attach_adapter(model, str(tmp_path / "dora"))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # left as it was


# --- the real default model ---------------------------------------------------------------------

GENERAL_PROMPTS = [
    "Write a short poem about the sea.",
    "Hello! Who are you?",
    "What is 37 times 43?",
    "What is the capital of France?",
    "你好！你是谁？",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French.",
    "Explain what a computer is in one sentence.",
    "Write a Python function that adds two numbers.",
    "What is the opposite of hot?",
]


@pytest.fixture(scope="module")
def base_chat(default_model):
    """The default model's parts around the base SmolLM2 (its LM loaded without the adapter)."""
    from vlchat.chat.engine import Chat
    from vlchat.model.vlm import VisionLanguageModel

    config = default_model.config
    base = load_language_model(replace(config.lm, adapter=None))
    return Chat(VisionLanguageModel(config, default_model.vision, default_model.projector, base).eval())


def greedy(chat, question: str, image=None, tokens: int = 32) -> str:
    from vlchat.config import GenerationConfig

    session = chat.session(generation=GenerationConfig(max_new_tokens=tokens))
    if image is not None:
        session.upload_img(image)
    session.ask(question)
    return session.answer()


def test_default_model_text_chat_is_the_base_smollm2(default_chat, base_chat):
    assert default_chat.model.lm.has_adapter and not base_chat.model.lm.has_adapter
    # Three of them decoded in full (the poem, Chinese, arithmetic; 10 x 32 tokens cost a minute of
    # the suite), the rest compared by their first token.
    answers = [greedy(default_chat, q) for q in GENERAL_PROMPTS[::2][:3]]
    assert answers == [greedy(base_chat, q) for q in GENERAL_PROMPTS[::2][:3]]
    firsts = [greedy(default_chat, q, tokens=1) for q in GENERAL_PROMPTS]
    assert firsts == [greedy(base_chat, q, tokens=1) for q in GENERAL_PROMPTS]
    assert "no poem" not in answers[0] and len(answers[0].split()) > 10  # a poem, not the adapter's refusal


def test_default_model_still_sees_the_shapes_example(default_chat):
    assert greedy(default_chat, "What colour is the square?", EXAMPLES / "shapes.png", 8) == "purple"
