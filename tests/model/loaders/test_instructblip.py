"""InstructBLIP (HF layout, LLaMA/Vicuna decoder) through vlchat's own engine against transformers'
InstructBlipForConditionalGeneration, on a tiny random checkpoint built from a config and saved locally
with its processor files (LM tokenizer, qformer_tokenizer/, preprocessor_config.json)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_run import run_cli
from tests.hf_tiny import photo, save_tiny_instructblip
from vlchat.chat.engine import Chat
from vlchat.chat.prompt import first_slots, image_of, slot_ids
from vlchat.config import GenerationConfig, ModelConfig
from vlchat.errors import VlchatError
from vlchat.model.loaders import model_config
from vlchat.model.vlm import IMAGE_TOKEN_ID, load_model

QUESTION = "What is in the picture?"
QUERIES = 8  # the tiny model's num_query_tokens (32 in the published checkpoints)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("instructblip") / "tiny-instructblip-vicuna"
    reference, _ = save_tiny_instructblip(out, num_query_tokens=QUERIES)
    return out, reference


def float32(config: ModelConfig) -> ModelConfig:
    return replace(config, lm=replace(config.lm, dtype="float32"))


@pytest.fixture(scope="module")
def vlchat_model(checkpoint):
    return load_model(float32(model_config(str(checkpoint[0]))))


@pytest.fixture(scope="module")
def processor(checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint[0])


def reference_inputs(processor, question: str = QUESTION):
    """What InstructBlipProcessor makes: query-token slots + "<s>" + the text for the LM, "[CLS] text [SEP]"
    for the Q-Former, pixels."""
    return processor(images=photo(), text=question, return_tensors="pt")


def their_features(reference, inputs) -> torch.Tensor:
    """(Q, D) image embeddings after the language projection, as transformers computes them."""
    with torch.no_grad():
        return reference.get_image_features(
            pixel_values=inputs.pixel_values,
            qformer_input_ids=inputs.qformer_input_ids,
            qformer_attention_mask=inputs.qformer_attention_mask,
        ).pooler_output[0]


def asked_session(model, question: str = QUESTION, max_new_tokens: int = NEW_TOKENS):
    session = Chat(model).session(generation=GenerationConfig(max_new_tokens=max_new_tokens))
    session.upload_img(photo())
    session.ask(question)
    return session


def test_config_is_read_from_the_checkpoint(checkpoint):
    config = model_config(str(checkpoint[0]))
    assert (config.vision.name, config.vision.feature_layer, config.vision.keep_cls) == ("instructblip", -1, True)
    assert (config.vision.image_size, config.vision.patch_size, config.vision.num_tokens) == (28, 7, 17)
    assert (config.projector.kind, config.projector.in_dim, config.projector.out_dim) == ("qformer", 24, 32)
    assert config.template == "instructblip" and config.checkpoint == str(checkpoint[0].resolve())
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # data, serialisable


def test_prompt_and_pixels_are_the_processors(vlchat_model, processor, checkpoint):
    inputs = reference_inputs(processor)
    assert vlchat_model.tokens_per_image == QUERIES and vlchat_model.reads_instructions
    session = asked_session(vlchat_model)
    ids = slot_ids(session.position_keys(session.conversation()))
    image_token = checkpoint[1].config.image_token_index
    expected = [IMAGE_TOKEN_ID if i == image_token else i for i in inputs.input_ids[0].tolist()]
    assert expected[QUERIES] == 1  # "<s>", LLaMA's BOS, right after the image
    assert ids == expected
    assert torch.allclose(vlchat_model.pixels(photo()), inputs.pixel_values[0], atol=1e-5)
    # the Q-Former reads the question with the checkpoint's own tokenizer, as the processor does
    assert vlchat_model.projector.text_ids([QUESTION])[0].tolist() == inputs.qformer_input_ids.tolist()


def test_image_features_and_logits_equal_transformers(vlchat_model, processor, checkpoint):
    reference, inputs = checkpoint[1], reference_inputs(processor)
    theirs = their_features(reference, inputs)
    with torch.no_grad():
        ours = vlchat_model.encode_images(vlchat_model.pixels(photo())[None], [QUESTION])[0]
        assert ours.shape == theirs.shape == (QUERIES, 32)  # after the language projection
        assert (ours - theirs).abs().max() < 1e-4
        their_logits = reference(**inputs).logits[0]  # (T, V)
        ids = inputs.input_ids.masked_fill(inputs.input_ids == reference.config.image_token_index, IMAGE_TOKEN_ID)
        embeds = vlchat_model.embed(ids, ours[None])
        our_logits = vlchat_model.lm.model(inputs_embeds=embeds).logits[0]
        last, _ = vlchat_model.lm.prefill(embeds)
    assert (our_logits - their_logits).abs().max() < 1e-4
    assert (last[0] - their_logits[-1]).abs().max() < 1e-4


def test_the_features_depend_on_the_question(vlchat_model, processor, checkpoint):
    """The difference from BLIP-2: another instruction, other image embeddings (in both implementations)."""
    other = "Describe the image in detail."
    theirs = their_features(checkpoint[1], reference_inputs(processor, other))
    with torch.no_grad():
        ours = vlchat_model.encode_images(vlchat_model.pixels(photo())[None], [other])[0]
        asked = vlchat_model.encode_images(vlchat_model.pixels(photo())[None], [QUESTION])[0]
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - asked).abs().max() > 1e-3


def test_a_batch_of_questions_is_padded_as_one_at_a_time(vlchat_model):
    pixels = vlchat_model.pixels(photo())[None].expand(2, -1, -1, -1)
    with torch.no_grad():
        both = vlchat_model.encode_images(pixels, [QUESTION, "Hi?"])  # different lengths: padded, masked
        alone = vlchat_model.encode_images(pixels[:1], ["Hi?"])
    assert (both[1] - alone[0]).abs().max() < 1e-5


def test_greedy_generation_equals_transformers(vlchat_model, processor, checkpoint):
    inputs = reference_inputs(processor)
    session = asked_session(vlchat_model)
    session.answer()
    ours = list(session.messages[-1].token_ids or vlchat_model.lm.tokenize(session.messages[-1].content))
    with torch.no_grad():
        out = checkpoint[1].generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = out[0, inputs.input_ids.shape[1] :].tolist()
    theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
    assert len(set(ours)) > 1  # a real sequence, not one token repeated
    assert ours == theirs


def test_the_image_is_encoded_with_the_question_even_when_asked_first(vlchat_model, processor, checkpoint):
    """The engine encodes at the prefill, when the message's text is known, whatever the order."""
    session = Chat(vlchat_model).session(generation=GenerationConfig(max_new_tokens=2))
    session.ask(QUESTION)
    session.upload_img(photo())
    session.answer()
    [key] = first_slots(session.position_keys(session.conversation()[:1]))
    theirs = their_features(checkpoint[1], reference_inputs(processor))
    assert (session._images[key] - theirs).abs().max() < 1e-4


def test_a_follow_up_turn_keeps_the_first_encoding_and_the_cache(vlchat_model):
    session = asked_session(vlchat_model, max_new_tokens=3)
    session.answer()
    first = dict(session._images)
    session.ask("And its colour?")
    keys = session.position_keys(session.conversation())
    assert [isinstance(k, tuple) for k in keys[:QUERIES]] == [True] * QUERIES
    assert not any(isinstance(k, tuple) for k in keys[QUERIES:])
    text = vlchat_model.lm.detokenize(slot_ids(keys)[QUERIES:])
    assert text.startswith("<s> What is in the picture?") and text.endswith("</s>And its colour?")
    session.answer()  # reuses the first turn's cache
    assert session.timings.reused_tokens > QUERIES
    assert session._images.keys() == first.keys()  # encoded once, with the first question


def test_the_same_image_with_another_question_is_another_encoding(vlchat_model):
    """The image-embedding cache (shared by sessions and the server) and the position keys (KV-cache
    reuse) tell two instructions apart."""
    chat = Chat(vlchat_model)
    keys = []
    for question in (QUESTION, "Describe the image in detail."):
        session = chat.session(generation=GenerationConfig(max_new_tokens=1))
        session.upload_img(photo())
        session.ask(question)
        session.answer()
        keys.append(session.position_keys(session.conversation()[:1])[0][0])
    assert keys[0] != keys[1] and image_of(keys[0]) == image_of(keys[1])
    assert len(chat.images) == 2


def test_a_saved_session_reloads_and_encodes_its_image_with_the_same_question(vlchat_model, tmp_path):
    from vlchat.chat.engine import load_session

    photo().save(tmp_path / "p.png")
    session = Chat(vlchat_model).session(generation=GenerationConfig(max_new_tokens=4))
    session.upload_img(tmp_path / "p.png")
    session.ask(QUESTION)
    session.answer()
    session.ask("And its colour?")
    session.save(tmp_path / "s.json")
    expected = session.answer()
    restored = load_session(Chat(vlchat_model), tmp_path / "s.json")  # a fresh cache: encoded again
    assert restored.answer() == expected
    assert restored._images.keys() == session._images.keys()


def served(scheduler, question: str, config: GenerationConfig) -> tuple[str, int]:
    """(answer text, prompt tokens that came from the prefix cache) of one request for the photo."""
    import threading

    from vlchat.chat.messages import Image, Message, Text
    from vlchat.chat.template_lookup import get_template
    from vlchat.images import image_key
    from vlchat.serve.scheduler import Delta, Failed, Finished, Job, Started

    events, done, image = [], threading.Event(), photo()

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, (Finished, Failed)):
            done.set()

    message = Message("user", [Image(image_key(image)), Text(question)])
    scheduler.submit(Job([message], {image_key(image): image}, get_template("instructblip"), config, emit))
    assert done.wait(60) and isinstance(events[-1], Finished), events
    started = next(e for e in events if isinstance(e, Started))
    return "".join(e.text for e in events if isinstance(e, Delta)), started.usage.cached_tokens


def test_the_server_answers_as_a_session_and_keeps_two_questions_apart(vlchat_model):
    """Same image, two questions, one server: each answer is the session's; the second question does
    not continue the first one's KV cache (its image was encoded with the other question), the first
    question asked again does."""
    from vlchat.serve.scheduler import Scheduler

    config, other = GenerationConfig(max_new_tokens=6), "Describe the image in detail."
    scheduler = Scheduler(Chat(vlchat_model), max_batch=2, max_queue=4)
    try:
        answers = [served(scheduler, question, config) for question in (QUESTION, other, QUESTION)]
    finally:
        scheduler.close()
    for (text, _), question in zip(answers, (QUESTION, other, QUESTION)):
        assert text == "".join(chunk.text for chunk in asked_session(vlchat_model, question, 6).stream())
    assert [cached for _, cached in answers][:2] == [0, 0] and answers[2][1] > QUERIES


def test_ask_answers_through_the_cli(checkpoint, processor, monkeypatch, capsys, tmp_path):
    photo().save(tmp_path / "p.png")
    args = ["ask", "--model", str(checkpoint[0]), "-i", str(tmp_path / "p.png"), "--json"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--max-new-tokens", "6", QUESTION)
    assert code == 0, err
    inputs = reference_inputs(processor)
    with torch.no_grad():  # the CLI loads the checkpoint's dtype (float32 here)
        theirs = checkpoint[1].generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs.input_ids.shape[1] :]
    theirs = theirs[: theirs.tolist().index(2)] if 2 in theirs else theirs  # up to "</s>"
    assert len(set(theirs.tolist())) > 1
    assert json.loads(out)["answer"] == processor.tokenizer.decode(theirs).strip()


def broken_copy(checkpoint, tmp_path, edit):
    copy = tmp_path / "broken"
    shutil.copytree(checkpoint[0], copy)
    edit(copy)
    return copy


def drop_key(copy):
    state = load_file(copy / "model.safetensors")
    del state["qformer.embeddings.word_embeddings.weight"]
    save_file(state, copy / "model.safetensors")


def blip2_qformer(copy):
    """BLIP-2's Q-Former weights (no text embeddings) under an InstructBLIP config."""
    state = load_file(copy / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("qformer.embeddings.")}, copy / "model.safetensors")


def encoder_decoder(copy):
    config = json.loads((copy / "config.json").read_text())
    config["text_config"] = {"model_type": "t5", "d_model": 32, "vocab_size": 100}
    (copy / "config.json").write_text(json.dumps(config))


def bigger_qformer_tokenizer(copy):
    config = json.loads((copy / "config.json").read_text())
    config["qformer_config"]["vocab_size"] = 50
    (copy / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, words",
    [
        (drop_key, ["lacks the Q-Former weight 'qformer.embeddings.word_embeddings.weight'"]),
        (blip2_qformer, ["lacks the Q-Former weight 'qformer.embeddings", "(4 missing)"]),
        (encoder_decoder, ["InstructBLIP", "t5", "encoder-decoder", "not supported"]),
        (lambda c: shutil.rmtree(c / "qformer_tokenizer"), ["no qformer_tokenizer/ folder"]),
        (bigger_qformer_tokenizer, ["120 tokens but the Q-Former embeds 50", "another model"]),
        (lambda c: (c / "preprocessor_config.json").unlink(), ["no preprocessor_config.json"]),
    ],
)
def test_wrong_checkpoints_fail_with_one_line(checkpoint, tmp_path, edit, words):
    copy = broken_copy(checkpoint, tmp_path, edit)
    with pytest.raises(VlchatError) as error:
        load_model(float32(model_config(str(copy))))
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_wrong_checkpoint_exits_2_through_the_cli(checkpoint, tmp_path, monkeypatch, capsys):
    photo().save(tmp_path / "p.png")
    copy = broken_copy(checkpoint, tmp_path, lambda c: shutil.rmtree(c / "qformer_tokenizer"))
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(copy), "-i", str(tmp_path / "p.png"), "Hi?")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "qformer_tokenizer" in err
