"""The ONNX Runtime LM runtime (vlchat.model.onnx_lm) against the torch runtime on the tiny LM: the
float32 graph gives the same logits (prefill, follow-up prefill, decode, a left-padded batch, a gated
adapter per row, a batched prefill of left-padded chunks) and beam search answers; the 8-bit graph
gives the same greedy answers through the engine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import EXAMPLES, tiny_config

from vlchat.chat.beam import beam_search
from vlchat.chat.generate import generate
from vlchat.config import GenerationConfig, LMConfig
from vlchat.errors import VlchatError
from vlchat.images import load_image
from vlchat.model.batching import DecodeBatch
from vlchat.model.language import LMState, load_language_model
from vlchat.model.vlm import load_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """VLCHAT_HOME in a temporary folder: the graphs are cached under its lm/."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("vlchat-home")
        patch.setenv("VLCHAT_HOME", str(path))
        yield path


def onnx_lm(lm_dir, home, weights="float32", adapter=None):
    config = LMConfig(source=str(lm_dir), sha256=None, dtype="float32", runtime="onnx", onnx_weights=weights)
    return load_language_model(replace(config, adapter=str(adapter) if adapter else None))


@pytest.fixture(scope="module")
def onnx_fp32(tiny_lm_dir, home):
    return onnx_lm(tiny_lm_dir, home)


def embed(lm, ids):
    return lm.embed(torch.tensor([ids]))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_prefill_follow_up_and_decode_match_torch(tiny_model, onnx_fp32):
    torch_lm = tiny_model.lm
    assert onnx_fp32.onnx is not None and torch_lm.onnx is None
    results = []
    for lm in (torch_lm, onnx_fp32):
        first, state = lm.prefill(embed(lm, [5, 6, 7, 8]))
        follow, state = lm.prefill(embed(lm, [9, 10, 11]), state)
        steps = []
        for token in (20, 21, 22):
            logits, state = lm.decode(torch.tensor([token]), state)
            steps.append(logits)
        assert state.length == 10 and state.cache.get_seq_length() == 10
        results.append(torch.cat([first, follow, *steps]))  # (5, V)
    close(results[1], results[0])
    assert results[1].dtype == torch.float32 and results[1].shape == (5, len(torch_lm.tokenizer))


def test_states_fork_trim_and_repeat_as_with_torch(tiny_model, onnx_fp32):
    """The ONNX runtime's cache is a DynamicCache: LMState's operations work on it unchanged."""
    out = []
    for lm in (tiny_model.lm, onnx_fp32):
        _, state = lm.prefill(embed(lm, [5, 6, 7, 8, 9]))
        branch = state.fork()
        branch.trim(3)
        branch.repeat(2)
        logits, _ = lm.prefill(lm.embed(torch.tensor([[30], [31]])), branch)
        out.append(logits)
    close(out[1], out[0])


def test_left_padded_batch_matches_torch(tiny_model, onnx_fp32):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    out = []
    for lm in (tiny_model.lm, onnx_fp32):
        batch = DecodeBatch.of([lm.prefill(embed(lm, ids))[1] for ids in prompts])
        out.append(torch.cat([batch.decode(lm, torch.tensor([t, t + 1, t + 2])) for t in (20, 30)]))
        assert batch.lengths == [5, 8, 3]
        row, _ = lm.decode(torch.tensor([40]), batch.row(1))
        out.append(row)
    close(out[2], out[0])
    close(out[3], out[1])


def test_batched_prefill_of_left_padded_chunks_matches_torch(tiny_model, onnx_fp32):
    """`DecodeBatch.prefill` (the server prefilling new requests together): chunks of different
    lengths, padded on the left, after caches of different lengths (one empty)."""
    heads, chunks = [[5, 6, 7], [], [8, 9, 10, 11]], [[20, 21], [22, 23, 24, 25], [26]]
    out = []
    for lm in (tiny_model.lm, onnx_fp32):
        batch = DecodeBatch.of([lm.prefill(embed(lm, ids))[1] if ids else LMState() for ids in heads])
        out.append(batch.prefill(lm, [embed(lm, ids) for ids in chunks]))  # (3, V)
        out.append(lm.decode(torch.tensor([40]), batch.row(0))[0])
    close(out[2], out[0])
    close(out[3], out[1])
    close(out[2][:1], onnx_fp32.prefill(embed(onnx_fp32, heads[0] + chunks[0]))[0])


def test_gated_adapter_per_row_matches_torch(tiny_adapted_model, tiny_lm_dir, tiny_adapter_dir, home):
    """One row with the adapter on (an image), one off, solo and batched: the same logits as torch."""
    adapted = onnx_lm(tiny_lm_dir, home, adapter=tiny_adapter_dir)
    out = []
    for lm in (tiny_adapted_model.lm, adapted):
        states = [
            lm.prefill(embed(lm, ids), LMState(adapter=on))[1] for ids, on in (([5, 6, 7], True), ([8, 9], False))
        ]
        solo = [lm.decode(torch.tensor([20]), state.fork())[0] for state in states]  # torch grows a cache in place
        batched = DecodeBatch.of(states).decode(lm, torch.tensor([20, 20]))
        out.append(torch.cat([*solo, batched]))  # (4, V)
    close(out[1], out[0])
    assert (out[1][0] - out[1][1]).abs().max() > 0.1  # the rows differ (the adapter does something)


@pytest.mark.parametrize(
    "weights, generation",
    [
        ("int8", GenerationConfig(max_new_tokens=8, min_new_tokens=8)),
        ("float32", GenerationConfig(max_new_tokens=6, min_new_tokens=6, num_beams=3)),
    ],
)
def test_generated_tokens_match_torch(tiny_model, tiny_lm_dir, home, weights, generation):
    """The engine's decoding loops (chat/generate.py, chat/beam.py) after an image prompt: 8-bit
    weights (blocks of 32) give the same greedy tokens as torch; the float32 graph the same beam
    search tokens (LMState.repeat/select on the ONNX caches)."""
    config = tiny_config(tiny_lm_dir)
    torch.manual_seed(0)
    fast = load_model(replace(config, lm=replace(config.lm, runtime="onnx", onnx_weights=weights)))
    tokens = []
    for model in (tiny_model, fast):
        lm = model.lm
        image = model.encode_images(model.pixels(load_image(EXAMPLES / "chelsea.jpg"))[None])[0]  # (N, D)
        prompt = torch.cat([lm.embed(torch.tensor([5, 6, 7])), image, lm.embed(torch.tensor([8, 9]))])[None]
        logits, state = lm.prefill(prompt)
        decode = beam_search if generation.num_beams > 1 else generate
        tokens.append(list(decode(lm, logits, state, generation, ()))[-1].result.token_ids)
    assert len(tokens[0]) == generation.max_new_tokens and tokens[1] == tokens[0]


@pytest.fixture(scope="module")
def q4_1_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny LM with weights as the default LM's GGUF file holds them: each decoder linear layer
    de-quantised from Q4_1 blocks (d*q + m, a float minimum), the tied embeddings from Q8_0 blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlchat.model.onnx_quant import q4_1_blocks, q4_1_weight, symmetric8

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(q4_1_weight(*q4_1_blocks(module.weight.numpy()))))
        embed = model.get_input_embeddings().weight
        q, scale, zero = symmetric8(embed.numpy())
        embed.copy_(torch.from_numpy((q.astype("float32") - 128) * scale.reshape(*q.shape[:2], 1)).reshape(embed.shape))
    out = tmp_path_factory.mktemp("tiny-q4_1")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(out)
    return out


def test_q4_1_graph_keeps_q4_1_weights_where_int4_moves_them(q4_1_lm_dir, home):
    """On Q4_1-like weights the q4_1 graph differs from the float32 graph by the int8 activations
    only; the int4 graph (integer zero points) moves every block and errs several times more."""
    errors = {}
    for weights in ("float32", "q4_1", "int4"):
        lm = onnx_lm(q4_1_lm_dir, home, weights)
        first, state = lm.prefill(embed(lm, [5, 6, 7, 8, 9, 10]))
        step, _ = lm.decode(torch.tensor([20]), state)
        errors[weights] = torch.cat([first, step])
    reference = errors.pop("float32")
    errors = {w: float((logits - reference).abs().max()) for w, logits in errors.items()}
    assert errors["q4_1"] < 0.05 and errors["q4_1"] * 8 < errors["int4"], errors


def test_q4_1_graph_generates_torch_tokens_on_q4_1_weights(q4_1_lm_dir, home):
    config = LMConfig(source=str(q4_1_lm_dir), sha256=None, dtype="float32")
    tokens = []
    for lm in (load_language_model(config), onnx_lm(q4_1_lm_dir, home, "q4_1")):
        logits, state = lm.prefill(embed(lm, [5, 6, 7, 8]))
        generation = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
        tokens.append(list(generate(lm, logits, state, generation, ()))[-1].result.token_ids)
    assert len(tokens[0]) == 12 and tokens[1] == tokens[0]


def test_bad_runtime_options_are_refused():
    with pytest.raises(VlchatError, match="runtime must be torch or onnx"):
        LMConfig(runtime="llama.cpp")
    with pytest.raises(VlchatError, match="onnx_weights must be"):
        LMConfig(onnx_weights="int2")


def test_graphs_are_cached_per_weights_and_quantisation(tiny_lm_dir, home, onnx_fp32):
    graphs = lambda: sorted((home / "lm").glob("onnx-*"))  # noqa: E731
    before = graphs()
    assert before and all((g / "model.onnx").is_file() and (g / "weights.data").is_file() for g in before)
    onnx_lm(tiny_lm_dir, home)  # the same weights, the same quantisation: the cached graph
    assert graphs() == before
    four_bits = onnx_lm(tiny_lm_dir, home, weights="int4")
    assert len(graphs()) == len(before) + 1
    logits, _ = four_bits.prefill(embed(four_bits, [5, 6, 7]))
    assert logits.shape == (1, len(four_bits.tokenizer)) and torch.isfinite(logits).all()


def test_batched_first_prefill_of_left_padded_prompts_matches_torch(tiny_model, onnx_fp32):
    """Rows with no cache yet, prompts of different lengths padded on the left: the rotary must use
    each row's own positions (GroupQueryAttention's first-prompt path included)."""
    prompts = [[5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]
    out = []
    for lm in (tiny_model.lm, onnx_fp32):
        batch = DecodeBatch.of([LMState() for _ in prompts])
        out.append(batch.prefill(lm, [embed(lm, ids) for ids in prompts]))  # (3, V)
        out.append(batch.decode(lm, torch.tensor([20, 21, 22])))
    close(out[2], out[0])
    close(out[3], out[1])
    close(out[2][:1], onnx_fp32.prefill(embed(onnx_fp32, prompts[0]))[0])
