"""Generation: logits processing, clean UTF-8/stop-string streaming, greedy parity with HF, beams."""

from __future__ import annotations

import pytest
import torch

from vlchat.chat.beam import beam_search
from vlchat.chat.generate import (
    TextStream,
    apply_repetition_penalty,
    find_stop,
    generate,
    safe_length,
    top_k_top_p_filter,
)
from vlchat.config import GenerationConfig


def run(lm, prompt_ids: list[int], config: GenerationConfig, stops=()):
    """Decode as the chat engine does: beam search for num_beams > 1, else generate()."""
    logits, state = lm.prefill(lm.embed(torch.tensor([prompt_ids])))
    decode = beam_search if config.num_beams > 1 else generate
    chunks = list(decode(lm, logits, state, config, stops))
    return chunks, chunks[-1].result


def test_top_k_keeps_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = top_k_top_p_filter(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_k_top_p_filter(probs.log(), top_k=0, top_p=0.7)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_k_top_p_filter(probs.log(), 0, 0.01)).sum() == 1  # always one token left


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_stop_prefix_is_held_back():
    assert find_stop("abc###def", ("###",)) == 3
    assert safe_length("hello ##", ("###",)) == len("hello ")
    assert safe_length("hello", ("###",)) == 5
    assert safe_length("ab\ufffd", ()) == 2


def test_chinese_streams_without_split_characters(default_model):
    lm = default_model.lm
    text = "你好，世界！我们一起看看这张图片里的猫。"
    stream = TextStream(lm, ())
    deltas = [stream.push(i) for i in lm.tokenize(text)] + [stream.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(bool(d) for d in deltas) > 5  # it really streamed


def test_stop_string_ends_text_and_is_not_shown(default_model):
    lm = default_model.lm
    stream = TextStream(lm, ("###",))
    shown = "".join(stream.push(i) for i in lm.tokenize("A cat.###Human: more"))
    assert shown == "A cat." and stream.stopped


def test_greedy_matches_hf_generate(default_model):
    """Our decode loop and HF's generate() pick the same tokens (same model, greedy)."""
    lm = default_model.lm
    prompt = lm.tokenize("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
    _, result = run(lm, prompt, GenerationConfig(max_new_tokens=16))
    hf = lm.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :]
    hf = [t for t in hf.tolist() if t not in lm.eos_token_ids]
    assert result.token_ids == hf[: len(result.token_ids)]
    assert result.text == lm.detokenize(result.token_ids)


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    lm = tiny_model.lm
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = run(lm, [1, 2, 3], config)[1], run(lm, [1, 2, 3], config)[1]
    c = run(lm, [1, 2, 3], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8))[1]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_length_and_min_new_tokens(default_model):
    lm = default_model.lm
    prompt = lm.tokenize("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    short = run(lm, prompt, GenerationConfig(max_new_tokens=40))[1]
    assert short.finish_reason == "stop" and len(short.token_ids) < 40
    forced = run(
        lm, prompt, GenerationConfig(max_new_tokens=len(short.token_ids) + 3, min_new_tokens=len(short.token_ids) + 3)
    )[1]
    assert forced.finish_reason == "length" and len(forced.token_ids) == len(short.token_ids) + 3


def test_beam_search_is_deterministic_and_at_least_as_likely_as_greedy(default_model):
    lm = default_model.lm
    prompt = lm.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    config = GenerationConfig(max_new_tokens=12, num_beams=3)
    chunks, beam = run(lm, prompt, config)
    assert beam.text and beam.finish_reason in ("stop", "length")
    assert run(lm, prompt, config)[1].token_ids == beam.token_ids
    greedy = run(lm, prompt, GenerationConfig(max_new_tokens=12))[1]

    def mean_logprob(ids):
        full = torch.tensor([prompt + ids])
        logp = lm.model(full).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        return logp.gather(1, torch.tensor(ids)[:, None]).mean().item()

    assert mean_logprob(beam.token_ids) >= mean_logprob(greedy.token_ids) - 1e-4


def test_generate_leaves_beam_search_to_the_caller():
    with pytest.raises(ValueError, match="beam_search for num_beams > 1"):
        next(generate(None, None, None, GenerationConfig(num_beams=2)))
