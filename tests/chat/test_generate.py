"""Generation: logits processing, clean UTF-8/stop-string streaming, greedy parity with HF, beams."""

from __future__ import annotations

import pytest
import torch

from vlchat.chat.beam import beam_search
from vlchat.chat.generate import (
    SequenceDecoder,
    TextStream,
    apply_frequency_presence,
    apply_logit_bias,
    apply_repetition_penalty,
    check_for_model,
    find_stop,
    generate,
    next_token,
    process_logits,
    safe_length,
    token_bytes,
    top_k_top_p_filter,
)
from vlchat.config import GenerationConfig
from vlchat.errors import VlchatError


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


# --- sampling safety, penalties, logit_bias, logprobs ------------------------------------------


def test_tiny_temperatures_give_the_greedy_token():
    # logits around 30 overflow float32 when divided by 1e-38; ties are far apart here
    logits = torch.tensor([[29.0, 31.5, -4.0, 31.0, float("-inf")]])
    for temperature in (1e-10, 1e-30, 1e-38, 1e-45, 1e-300, 5e-324):
        config = GenerationConfig(temperature=temperature, seed=0)
        picks = {int(next_token(logits, config, torch.Generator().manual_seed(s))) for s in range(20)}
        assert picks == {1}, (temperature, picks)


def test_temperature_is_bounded_zero_to_two():
    assert GenerationConfig(temperature=2.0).temperature == 2.0
    for bad in (2.0001, 1e300, float("inf"), float("nan"), -0.1):
        with pytest.raises(VlchatError, match="temperature must be between 0 and 2"):
            GenerationConfig(temperature=bad)


def test_frequency_and_presence_penalties_follow_openais_rule():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    previous = torch.tensor([[1, 1, 1, 3]])  # token 1 three times, token 3 once
    out = apply_frequency_presence(logits, previous, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0, 2.0 - 1.5 - 0.25, 3.0, 4.0 - 0.5 - 0.25]]
    assert apply_frequency_presence(logits, previous, -1.0, 0.0).tolist() == [[1.0, 5.0, 3.0, 5.0]]


def test_logit_bias_is_added_and_checked():
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, ((4, -100.0), (0, 2.5)))
    assert out.tolist() == [[2.5, 0, 0, 0, -100.0]] * 2
    config = GenerationConfig(logit_bias={7: 1.0, 2: -3})
    assert config.logit_bias == ((7, 1.0), (2, -3.0))
    with pytest.raises(VlchatError, match="outside the model's vocabulary"):
        check_for_model(config, vocab_size=5)
    for bad in ({-1: 1.0}, {1: 101}, {1: float("nan")}, {"x": 1}, {i: 1.0 for i in range(301)}):
        with pytest.raises(VlchatError, match="logit_bias"):
            GenerationConfig(logit_bias=bad)


def test_process_logits_order_and_min_tokens():
    config = GenerationConfig(
        repetition_penalty=2.0, frequency_penalty=1.0, logit_bias=((0, 1.0),), min_new_tokens=3, max_new_tokens=8
    )
    out = process_logits(torch.tensor([[4.0, 2.0, 1.0]]), torch.tensor([[0, 0]]), config, eos={2})
    assert out.tolist() == [[4.0 / 2 - 2 + 1, 2.0, float("-inf")]]  # 2 answer tokens < min 3: EOS masked


def test_logprobs_are_the_models_log_softmax(tiny_model):
    lm = tiny_model.lm
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, logprobs=True, top_logprobs=3)
    prompt = [1, 2, 3]
    logits, state = lm.prefill(lm.embed(torch.tensor([prompt])))
    decoder = SequenceDecoder(lm, config)
    ids = []
    while True:
        _, token = decoder.step(logits)
        if token is None:
            break
        ids.append(token)
        if decoder.finish_reason:
            break
        logits, state = lm.decode(torch.tensor([token]), state)
    assert [e.token_id for e in decoder.logprobs] == ids and len(ids) == 6
    full = lm.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    for position, entry in enumerate(decoder.logprobs):
        assert entry.logprob == pytest.approx(full[position, entry.token_id].item(), abs=1e-4)
        best = torch.topk(full[position], 3)
        assert [t for t, _ in entry.top] == best.indices.tolist()  # greedy: the pick is the best
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    with pytest.raises(VlchatError, match="beam search"):
        GenerationConfig(logprobs=True, num_beams=2)
    with pytest.raises(VlchatError, match="needs logprobs"):
        GenerationConfig(top_logprobs=2)


def test_token_bytes_keep_pieces_of_a_character(default_model):
    lm = default_model.lm
    ids = lm.tokenize("猫")  # one character, several byte-level tokens
    assert b"".join(token_bytes(lm, i) for i in ids) == "猫".encode()
    assert token_bytes(lm, lm.tokenize(" Paris")[0]) == b" Paris"


def test_penalties_and_logit_bias_change_the_answer(default_model):
    lm = default_model.lm
    prompt = lm.tokenize("<|im_start|>user\nSay 'yes yes yes yes yes yes'.<|im_end|>\n<|im_start|>assistant\n")
    plain = run(lm, prompt, GenerationConfig(max_new_tokens=24, min_new_tokens=24))[1]
    cat = lm.tokenize(" cat")[0]

    def most_repeated(ids):
        return max(ids.count(t) for t in set(ids))

    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = run(lm, prompt, GenerationConfig(max_new_tokens=24, min_new_tokens=24, **penalty))[1]
        assert most_repeated(penalised.token_ids) < most_repeated(plain.token_ids), (plain.text, penalised.text)
    first = plain.token_ids[0]
    banned = run(lm, prompt, GenerationConfig(max_new_tokens=4, logit_bias={first: -100}))[1]
    assert banned.token_ids[0] != first
    forced = run(lm, prompt, GenerationConfig(max_new_tokens=4, logit_bias={cat: 100}))[1]
    assert forced.token_ids == [cat] * 4
    beams = run(lm, prompt, GenerationConfig(max_new_tokens=4, num_beams=2, logit_bias={cat: 100}))[1]
    assert beams.token_ids == [cat] * 4  # beam search applies the same processors
