"""Grammar-constrained decoding with llguidance: a per-sequence token mask inside our own decoder.

Why llguidance (1.9.1): a 3 MB wheel with no dependencies (xgrammar 0.2.8 pulls triton and
apache-tvm-ffi besides torch/transformers); grammars compile lazily, so a JSON Schema is ready
in ~10 ms with no per-vocabulary precompute; a mask over SmolLM2's 49,152 tokens costs ~0.1-2 ms
on one core, small beside a ~70 ms CPU decode step; and it reports unsupported JSON Schema
keywords as errors instead of silently loosening them.

`Structure` is what a request asks for (compiled once, checked before the job is queued: a bad
schema is the caller's error); `Constraint` is one sequence's live matcher. The decoder calls
`mask(logits)` before picking a token and `advance(token)` after. Beam search is refused with a
grammar (serving answers 400): its beams would each need their own matcher forked and reordered.

Modes: a grammar from the first token (`response_format`, tool_choice "required" or a named
function: the answer is exactly the call(s)), or "auto": free text until the model writes the
format's open tag, then the rest of the call(s) constrained to completion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlchat.chat.tools import ToolError, ToolFormat, ToolSpec

# The JSON the grammar lets the model write: no free whitespace (a small model pads forever),
# json.dumps' separators (so a call rendered back into the prompt tokenizes as it was written).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict[int, Any] = {}  # id(HF tokenizer) -> llguidance tokenizer (~1 s to build)


class GrammarError(ToolError):
    """A schema or grammar llguidance cannot compile (or a feature it does not implement)."""


def grammar_tokenizer(tokenizer) -> Any:
    """The llguidance view of an HF fast tokenizer, built once per tokenizer."""
    import llguidance.hf

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer)
    return _TOKENIZERS[key]


def schema_lark(schema: dict[str, Any]) -> str:
    """A lark rule body for a JSON Schema, in JSON_STYLE, objects closed (see `closed`)."""
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_STYLE}, ensure_ascii=False)


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists `properties` and
    says nothing of others (as OpenAI's strict mode): still valid under the original schema, and a
    small model no longer invents keys until max_tokens (seen: the weather call grew "humidity",
    "wind_speed", ...). allOf parts are left open: closing each would forbid the others' keys."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "contains", "not", "if", "then", "else"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in ("$defs", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    return out


def call_schema(tools: Sequence[ToolSpec], fmt: ToolFormat) -> dict[str, Any]:
    """One call's JSON: {"name": <one of the tools>, <arguments key>: <its parameters>}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, fmt.arguments_key: {"type": "object", **t.parameters}},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def literal(text: str, special: set[str]) -> str:
    """Lark for fixed text: special tokens (InternLM2's <|action_start|>) as tokens, the rest quoted."""
    pieces, rest = [], text
    while rest:
        hit = min(((rest.find(s), s) for s in special if s in rest), default=None)
        if hit is None:
            pieces.append(json.dumps(rest))
            break
        at, token = hit
        if at:
            pieces.append(json.dumps(rest[:at]))
        pieces.append(token)
        rest = rest[at + len(token) :]
    return " ".join(pieces) or '""'


def calls_lark(
    tools: Sequence[ToolSpec], fmt: ToolFormat, parallel: bool, special: set[str], opened: bool = False
) -> str:
    """Lark for a run of calls (one unless `parallel`); `opened`: the first open tag is already written."""
    after_tag = fmt.call_open[fmt.call_open.index(fmt.open_tag) + len(fmt.open_tag) :]
    first = literal(after_tag, special) if opened else literal(fmt.call_open, special)
    again = literal("\n" + fmt.call_open, special)
    more = f" ({again} body {literal(fmt.call_close, special)})*" if parallel else ""
    return (
        f"calls: {first} body {literal(fmt.call_close, special)}{more}\nbody: {schema_lark(call_schema(tools, fmt))}\n"
    )


@dataclass
class Structure:
    """A request's output constraint: `grammar` from the first token, or (auto) `after_open`
    once the model writes `open_tag`. Build with `json_structure` / `tool_structure`."""

    grammar: str | None
    after_open: str | None = None
    open_tag: str = ""
    compile_s: float = 0.0

    def constraint(self, lm) -> Constraint:
        return Constraint(self, lm)


def compile_grammar(lark: str, tokenizer, param: str) -> str:
    """Lark -> an llguidance grammar, checked against the tokenizer (GrammarError if it fails)."""
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_lark(lark)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, grammar_tokenizer(tokenizer))
    if failed:
        detail = messages[0].splitlines()[0] if messages else "unknown error"
        raise GrammarError(f"{param}: cannot be enforced: {detail}", param)
    return grammar


def special_tokens(tokenizer) -> set[str]:
    """Tokens a grammar must name as tokens, not text: the special ones and every added token llguidance
    treats as special. Qwen2.5's `<tool_call>` and `</tool_call>` are added tokens not marked special:
    as quoted text, the forced tag tokenized to that token, whose bytes the text then did not match, and
    the constraint gave up after the tag (the model wrote no call)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ll = grammar_tokenizer(tokenizer) if added else None
    return {t for t in getattr(tokenizer, "all_special_tokens", []) if t.startswith("<|")} | {
        t.content for i, t in added.items() if getattr(t, "special", False) or ll.is_special_token(i)
    }


def json_structure(
    schema: dict[str, Any], tokenizer, param: str = "response_format", tools: Sequence[ToolSpec] = (), fmt=None
) -> Structure:
    """The answer is JSON valid under `schema` (or, when `tools` are given, a call instead)."""
    import time

    start = time.perf_counter()
    rules = f"json_answer: {schema_lark(schema)}\n"
    if tools:
        rules += calls_lark(tools, fmt, True, special_tokens(tokenizer))
    top = "start: json_answer | calls\n" if tools else "start: json_answer\n"
    grammar = compile_grammar(top + rules, tokenizer, param)
    return Structure(grammar, compile_s=time.perf_counter() - start)


def tool_structure(
    tools: Sequence[ToolSpec], fmt: ToolFormat, tokenizer, mode: str, parallel: bool, param: str = "tools"
) -> Structure:
    """mode "required": the answer is the call(s) to `tools`; "auto": free text or, once opened, calls."""
    import time

    start = time.perf_counter()
    special = special_tokens(tokenizer)
    if mode == "required":
        grammar = compile_grammar("start: calls\n" + calls_lark(tools, fmt, parallel, special), tokenizer, param)
        return Structure(grammar, compile_s=time.perf_counter() - start)
    after = compile_grammar("start: calls\n" + calls_lark(tools, fmt, parallel, special, True), tokenizer, param)
    return Structure(None, after, fmt.open_tag, time.perf_counter() - start)


class Constraint:
    """One sequence's matcher. mask: (1, V) logits -> logits with disallowed tokens at -inf."""

    def __init__(self, structure: Structure, lm) -> None:
        from llguidance import LLMatcher

        self.structure, self.lm = structure, lm
        self.tokenizer = grammar_tokenizer(lm.tokenizer)
        self._new = lambda grammar: LLMatcher(self.tokenizer, grammar, log_level=0)
        self.matcher = self._new(structure.grammar) if structure.grammar else None
        self.ids: list[int] = []  # tokens generated before the call opened (auto)
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self.failed = False  # the model's text left the grammar (auto fallback): unconstrained

    @property
    def active(self) -> bool:
        return self.matcher is not None and not self.failed

    def mask(self, logits: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
        """(1, V) logits with the tokens the grammar forbids at -inf. When no allowed token is
        finite in `logits` (min_new_tokens suppressed EOS, the only token the grammar allows),
        the allowed tokens of `fallback` (the unprocessed logits): the grammar wins. numpy, not
        torch: small elementwise torch ops pay thread-pool waits on a busy CPU (~50 ms each here)."""
        if not self.active:
            return logits
        import llguidance.torch as llt

        bits = torch.zeros(1, self.words, dtype=torch.int32)
        llt.fill_next_token_bitmask(self.matcher, bits)
        allowed = expand_bitmask(bits, logits.shape[-1])  # (1, V) bool
        masked = np.where(allowed, logits.numpy(), -np.inf).astype(np.float32)
        if fallback is not None and not np.isfinite(masked).any():
            masked = np.where(allowed, fallback.numpy(), -np.inf).astype(np.float32)
        return torch.from_numpy(masked)

    def advance(self, token: int) -> None:
        if self.active:
            if not self.matcher.consume_token(token):
                self.failed = True  # cannot happen for a token the mask allowed
            return
        if self.structure.after_open is None or self.failed:
            return
        self.ids.append(token)
        text = self.lm.detokenize(self.ids)
        at = text.find(self.structure.open_tag)
        if at >= 0:
            self._open(text[at + len(self.structure.open_tag) :])

    def _open(self, written: str) -> None:
        """The model opened a call: constrain the rest, starting after what it already wrote."""
        self.matcher = self._new(self.structure.after_open)
        if written and not self.matcher.consume_tokens(self.lm.tokenize(written)):
            self.failed = True  # the same token went past the tag into text no call can hold

    def allows_end(self) -> bool:
        return not self.active or self.matcher.is_accepting()


def expand_bitmask(bits: torch.Tensor, vocab: int) -> np.ndarray:
    """(B, W) int32 words (bit j of word w = token 32w + j) -> (B, vocab) bool array; positions past 32*W
    (padding rows of the LM head) are False. numpy's unpackbits: ~50x faster than torch shifts here."""
    allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little").astype(bool)  # (B, 32W)
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    return np.concatenate([allowed, np.zeros((bits.shape[0], vocab - allowed.shape[1]), dtype=bool)], axis=1)
