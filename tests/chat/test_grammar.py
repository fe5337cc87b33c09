"""Grammar-constrained decoding (llguidance) inside our decoder: tool calls and JSON answers that
always parse and validate, rows of one DecodeBatch each with its own grammar, auto mode, refusals."""

from __future__ import annotations

import json
import random
import time

import jsonschema_rs
import pytest
import torch

from vlchat.chat.generate import SequenceDecoder, generate
from vlchat.chat.grammar import GrammarError, json_structure, tool_structure
from vlchat.chat.messages import Message
from vlchat.chat.structure import build_structure
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import HERMES, ToolError, ToolSpec, parse_answer
from vlchat.config import GenerationConfig
from vlchat.model.batching import DecodeBatch

WEATHER = ToolSpec(
    "get_current_weather",
    "Get the current weather",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
)
STOPS = ("<|im_end|>",)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return tiny_model.lm


def prompt_state(lm, tools=()):
    messages = [Message.text_message("user", "What's the weather in Boston?")]
    ids = lm.tokenize(get_template("chatml").render(messages, tools=tools))
    return lm.prefill(lm.embed(torch.tensor([ids])))


def run(lm, structure, max_new_tokens=64, tools=()):
    logits, state = prompt_state(lm, tools)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    chunks = list(generate(lm, logits, state, config, STOPS, structure.constraint(lm) if structure else None))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_required_forces_a_valid_call(lm):
    text, finish = run(lm, tool_structure([WEATHER], HERMES, lm.tokenizer, "required", False), tools=[WEATHER])
    content, calls = parse_answer(text, HERMES)
    assert finish == "stop" and content == "" and len(calls) == 1
    assert calls[0].name == "get_current_weather"
    jsonschema_rs.validate(WEATHER.parameters, json.loads(calls[0].arguments))


def test_named_choice_calls_that_function(lm):
    other = ToolSpec("get_time", "", {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}})
    structure = build_structure([WEATHER, other], "get_time", True, None, HERMES, lm.tokenizer)
    _, calls = parse_answer(run(lm, structure)[0], HERMES)
    assert [c.name for c in calls] == ["get_time"]


def test_unconstrained_tiny_model_does_not_call(lm):
    text, _ = run(lm, None, 24)
    assert parse_answer(text, HERMES)[1] == []


def scripted_decoder(lm, structure, script: str, seed: int = 0) -> tuple[str, str]:
    """Decode with random logits, except that the first tokens are forced to `script`'s: a
    scripted model that opens a call and then writes noise the grammar must turn into a call."""
    decoder = SequenceDecoder(lm, GenerationConfig(max_new_tokens=80), STOPS, structure.constraint(lm))
    forced = lm.tokenize(script)
    generator = torch.Generator().manual_seed(seed)
    vocab = lm.model.config.vocab_size
    text, step = "", 0
    while True:
        logits = torch.randn(1, vocab, generator=generator)
        if step < len(forced):
            logits[0, forced[step]] = 100.0
        delta, token = decoder.step(logits)
        text += delta
        step += 1
        if token is None or decoder.finish_reason:
            return text + decoder.tail(), decoder.finish_reason


@pytest.mark.parametrize("seed", range(4))
def test_auto_completes_an_opened_call(lm, seed):
    structure = tool_structure([WEATHER], HERMES, lm.tokenizer, "auto", False)
    text, finish = scripted_decoder(lm, structure, "Let me look that up.\n<tool_call>", seed)
    content, calls = parse_answer(text, HERMES)
    assert finish == "stop", text
    assert content == "Let me look that up." and [c.name for c in calls] == ["get_current_weather"]
    for call in calls:
        jsonschema_rs.validate(WEATHER.parameters, json.loads(call.arguments))


def test_auto_leaves_free_text_alone(lm):
    structure = tool_structure([WEATHER], HERMES, lm.tokenizer, "auto", True)
    constraint = structure.constraint(lm)
    logits = torch.randn(1, lm.model.config.vocab_size)
    assert torch.equal(constraint.mask(logits), logits)  # no call opened: no mask
    for token in lm.tokenize("It is sunny <b>today</b>."):
        constraint.advance(token)
    assert not constraint.active


def test_parallel_tool_calls_false_allows_one_call_only(lm):
    one = tool_structure([WEATHER], HERMES, lm.tokenizer, "required", False).constraint(lm)
    many = tool_structure([WEATHER], HERMES, lm.tokenizer, "required", True).constraint(lm)
    arguments = '{"location": "Boston", "unit": "celsius"}'
    call = f'<tool_call>\n{{"name": "get_current_weather", "arguments": {arguments}}}\n</tool_call>'
    newline = lm.tokenize("\n")[0]
    for constraint in (one, many):
        for token in lm.tokenize(call):
            constraint.advance(token)
    logits = torch.zeros(1, lm.model.config.vocab_size)
    assert torch.isfinite(one.mask(logits)).nonzero()[:, 1].tolist() == [2]  # only EOS (<|im_end|>)
    assert bool(torch.isfinite(many.mask(logits))[0, newline])  # "\n" opens another call


def test_tags_that_are_added_tokens_are_matched_as_those_tokens(lm):
    """Qwen2.5's tokenizer has `<tool_call>` and `</tool_call>` as added tokens (not marked special):
    the forced call must still be the model's own tokens for them, accepted to the end."""
    import copy

    from llguidance import LLMatcher

    from vlchat.chat.grammar import grammar_tokenizer

    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # special=False, as Qwen's
    opened, closed = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    structure = tool_structure([WEATHER], HERMES, tokenizer, "required", False)
    matcher = LLMatcher(grammar_tokenizer(tokenizer), structure.grammar, log_level=0)
    call = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston", "unit": "celsius"}}'
    ids = tokenizer(call + "\n</tool_call>", add_special_tokens=False)["input_ids"]
    assert ids[0] == opened and ids[-1] == closed
    assert matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize(
    "schema,message",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
        ({"not": {"type": "string"}}, "not"),
        ({"$ref": "#/definitions/missing"}, "missing"),
    ],
)
def test_unsupported_or_invalid_schemas_are_refused_up_front(lm, schema, message):
    with pytest.raises(GrammarError, match=message):
        json_structure(schema, lm.tokenizer)
    with pytest.raises(GrammarError):
        tool_structure(
            [ToolSpec("f", "", {"type": "object", "properties": {"x": schema}})],
            HERMES,
            lm.tokenizer,
            "required",
            False,
        )


def test_unknown_named_function_and_required_without_tools_are_refused(lm):
    with pytest.raises(ToolError, match="not among the tools"):
        build_structure([WEATHER], "nope", True, None, HERMES, lm.tokenizer)
    with pytest.raises(ToolError, match="at least one tool"):
        build_structure([], "required", True, None, HERMES, lm.tokenizer)


def test_beam_search_with_a_grammar_is_refused(lm):
    """generate() decodes one sequence; the engine refuses beams with a grammar before any prefill
    (ChatSession.stream), the API with a 400 (tests/serve/test_tools_api.py)."""
    logits, state = prompt_state(lm)
    constraint = json_structure({"type": "object"}, lm.tokenizer).constraint(lm)
    with pytest.raises(ValueError, match="beam_search"):
        list(generate(lm, logits, state, GenerationConfig(num_beams=2), STOPS, constraint))


# --- schema coverage: 200 generated schemas, as tool parameters and as response formats --------


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A bounded JSON Schema (strings capped or patterned, numbers in ranges, arrays capped), so a
    random model's output ends within max_tokens; nested objects, arrays, enums, optional keys."""
    kinds = ["string", "pattern", "enum", "integer", "number", "boolean", "null", "format"]
    if depth < 2:
        kinds += ["object", "array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "pattern":
        return {
            "type": "string",
            "pattern": rng.choice(["^[a-z]{1,5}$", "^[A-Z][0-9]{2}$", "^(yes|no)$", "^#[0-9a-f]{6}$"]),
        }
    if kind == "format":
        return {"type": "string", "format": rng.choice(["date", "time", "uuid"])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 3, True, None, "a b"], rng.randint(1, 4))}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        low = rng.randint(-10, 10)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 50), "multipleOf": 0.25}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 0, "maxItems": rng.randint(1, 3)}
    names = rng.sample(["id", "name", "size", "tags", "color", "when", "ok", "x"], rng.randint(1, 4))
    properties = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def object_schema(rng: random.Random) -> dict:
    schema = random_schema(rng, 1)
    if schema.get("type") != "object":
        schema = {
            "type": "object",
            "properties": {"value": schema},
            "required": ["value"],
            "additionalProperties": False,
        }
    return schema


def decode_batch(lm, structures, max_new_tokens: int) -> list[tuple[str, str]]:
    """Decode the same prompt once per structure together in a DecodeBatch, each row masked by its
    own grammar (as the server's continuous batching does)."""
    prompt_logits, state = prompt_state(lm)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    decoders = [SequenceDecoder(lm, config, STOPS, s.constraint(lm)) for s in structures]
    logits = [prompt_logits] * len(structures)
    batch, texts, live = DecodeBatch.of([state] * len(structures)), [""] * len(structures), list(range(len(structures)))
    while live:
        tokens, keep = [], []
        for row, index in enumerate(live):
            delta, token = decoders[index].step(logits[row])
            texts[index] += delta
            if token is None or decoders[index].finish_reason:
                texts[index] += decoders[index].tail()
            else:
                keep.append(row)
                tokens.append(token)
        if len(keep) < len(live):
            batch = DecodeBatch.of([batch.row(r) for r in keep])
            live = [live[r] for r in keep]
        if live:
            out = batch.decode(lm, torch.tensor(tokens))
            logits = [out[r : r + 1] for r in range(len(live))]
    return [(text, decoder.finish_reason) for text, decoder in zip(texts, decoders)]


def test_two_hundred_schemas_always_give_valid_output(lm):
    rng = random.Random(1234)
    schemas = [object_schema(rng) for _ in range(200)]
    start = time.perf_counter()
    failures = []
    for first in range(0, len(schemas), 50):
        chunk = schemas[first : first + 50]
        structures = []
        for i, schema in enumerate(chunk):
            if (first + i) % 2:  # as the only tool's parameters, tool_choice "required"
                tool = ToolSpec(f"tool_{first + i}", "", schema)
                structures.append(tool_structure([tool], HERMES, lm.tokenizer, "required", False))
            else:  # as response_format json_schema
                structures.append(json_structure(schema, lm.tokenizer))
        for i, (text, finish) in enumerate(decode_batch(lm, structures, 96)):
            index = first + i
            if index % 2:
                _, calls = parse_answer(text, HERMES)
                value = json.loads(calls[0].arguments) if len(calls) == 1 else None
                ok = value is not None and calls[0].name == f"tool_{index}"
            else:
                try:
                    value, ok = json.loads(text), True
                except ValueError:
                    value, ok = None, False
            if not (ok and finish == "stop" and jsonschema_rs.is_valid(schemas[index], value)):
                failures.append((index, finish, text[:200], schemas[index]))
    elapsed = time.perf_counter() - start
    print(f"200 schemas decoded and validated in {elapsed:.1f} s")
    assert not failures, failures[:3]


def test_objects_are_closed_unless_they_say_otherwise():
    from vlchat.chat.grammar import closed

    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {}}}, "c": {"type": "object"}},
        "anyOf": [{"properties": {"d": {}}}],
        "allOf": [{"properties": {"e": {}}}],
        "$defs": {"x": {"properties": {}, "additionalProperties": True}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["c"]  # no properties listed: left open
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]
    assert out["$defs"]["x"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is not changed
