"""Grammar cost on the default model: `python -m vlchat.bench.grammar [--tokens N]`.

Prints one line per measurement: greedy decode tokens/s without a grammar and with one (a JSON
answer under a schema, a forced tool call), the grammar's compile time, the per-step mask time,
and the CPU flags that decide the LM's speed (docs/function-calling.md quotes the output).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from vlchat.chat.generate import SequenceDecoder
from vlchat.chat.grammar import grammar_tokenizer, json_structure, tool_structure
from vlchat.chat.messages import Message
from vlchat.chat.template_lookup import get_template
from vlchat.chat.tools import HERMES, ToolSpec
from vlchat.config import GenerationConfig, ModelConfig

WEATHER = ToolSpec(
    "get_current_weather",
    "Get the current weather in a given location",
    {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
)
LIST_SCHEMA = {  # long enough to fill the token budget: a list of words
    "type": "object",
    "properties": {"colours": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
    "required": ["colours"],
}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = sorted(set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", text)))
    return " ".join(found) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def decode(lm, prompt: str, tokens: int, structure=None) -> tuple[int, float, float]:
    """(tokens decoded, seconds, seconds inside the mask) for a greedy decode of at most `tokens`."""
    ids = lm.tokenize(prompt)
    logits, state = lm.prefill(lm.embed(torch.tensor([ids])))
    constraint = structure.constraint(lm) if structure is not None else None
    masked = 0.0
    if constraint is not None:
        original = constraint.mask

        def timed(*args):
            nonlocal masked
            start = time.perf_counter()
            out = original(*args)
            masked += time.perf_counter() - start
            return out

        constraint.mask = timed
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens if structure is None else 0)
    decoder = SequenceDecoder(lm, config, ("<|im_end|>",), constraint)
    start, count = time.perf_counter(), 0
    with torch.inference_mode():
        while True:
            _, token = decoder.step(logits)
            if token is None:
                break
            count += 1
            logits, state = lm.decode(torch.tensor([token]), state)
            if decoder.finish_reason:
                break
    return count, time.perf_counter() - start, masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from vlchat.model.vlm import load_model

    lm = load_model(ModelConfig()).lm
    template = get_template("chatml")
    ask = [Message.text_message("user", "List as many colours as you can, one word each.")]
    weather = [Message.text_message("user", "What's the weather like in Boston today?")]
    start = time.perf_counter()
    grammar_tokenizer(lm.tokenizer)
    print(f"cpu flags: {cpu_flags()}; torch threads {torch.get_num_threads()}")
    print(f"llguidance tokenizer (once per model): {time.perf_counter() - start:.2f} s")
    schema = json_structure(LIST_SCHEMA, lm.tokenizer)
    call = tool_structure([WEATHER], HERMES, lm.tokenizer, "required", False)
    print(f"grammar compile: JSON schema {schema.compile_s * 1000:.1f} ms, tool call {call.compile_s * 1000:.1f} ms")
    decode(lm, template.render(ask), 8)  # warm-up
    runs = [
        ("no grammar", template.render(ask), None),
        ("json_schema", template.render(ask), schema),
        ("tool call (required)", template.render(weather, tools=[WEATHER]), call),
    ]
    for name, prompt, structure in runs:
        count, seconds, masked = decode(lm, prompt, args.tokens, structure)
        per_step = f"; mask {masked / max(count, 1) * 1000:.2f} ms/token" if structure is not None else ""
        print(f"decode {name}: {count} tokens in {seconds:.2f} s = {count / seconds:.1f} tokens/s{per_step}")


if __name__ == "__main__":
    main()
