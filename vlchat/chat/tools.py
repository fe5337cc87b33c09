"""Function calling in the prompt text: tool definitions, how each template family writes calls and
results, and lenient parsers for what a model wrote (whole answers and streams).

Formats (one `ToolFormat` per family, named by `Template.tool_format`):

- "hermes" (ChatML: SmolLM2, Qwen): tools listed inside `<tools></tools>` at the end of the system
  turn; a call is `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>` after the answer's
  text; results go back in a user turn, each inside `<tool_response>\\n...\\n</tool_response>`.
- "internlm2" (InternLM2 / lagent): tools in their own `<|im_start|>system name=<|plugin|>` turn;
  a call is `<|action_start|><|plugin|>\\n{"name": N, "parameters": {...}}<|action_end|>`; each
  result is an `<|im_start|>environment name=<|plugin|>` turn.
- "generic" (every other template): the Hermes tags inside the template's own role markers.

Parsers never raise: text that holds no well-formed call is plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlchat.chat.messages import Message, ToolCall
from vlchat.errors import VlchatError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolError(VlchatError):
    """A bad tool definition or choice; `param` names the request field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call; `parameters` is the JSON Schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function if self.description else _drop(function, "description")}


def _drop(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def check_tools(tools: Sequence[ToolSpec], param: str = "tools") -> None:
    """Refuse invalid or duplicate names and non-object parameter schemas (ToolError)."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool.name, str) or not NAME_PATTERN.match(tool.name):
            raise ToolError(
                f"{where}: function name {tool.name!r} is invalid; use 1-64 letters, digits, '_' or '-'", where
            )
        if tool.name in seen:
            raise ToolError(f"{where}: duplicate function name {tool.name!r}", where)
        seen.add(tool.name)
        if not isinstance(tool.parameters, dict):
            raise ToolError(f"{where}: parameters must be a JSON Schema object", where)
        kind = tool.parameters.get("type", "object")
        if kind != "object":
            raise ToolError(f"{where}: parameters must describe an object (type 'object'), got {kind!r}", where)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- formats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    name: str
    call_open: str  # written before a call's JSON
    call_close: str  # written after it
    arguments_key: str  # "arguments" (Hermes) | "parameters" (lagent)
    result_open: str = ""  # around each result's text
    result_close: str = ""
    # A result turn's own role markers; None: the template's user markers (Hermes, generic).
    result_prefix: str | None = None
    result_suffix: str | None = None
    merge_results: bool = True  # consecutive results share one turn, joined by "\n"
    # Tools in a turn of their own (prefix, suffix); None: appended to the system prompt.
    tools_turn: tuple[str, str] | None = None

    @property
    def open_tag(self) -> str:
        return self.call_open.strip()

    @property
    def close_tag(self) -> str:
        return self.call_close.strip()

    def tools_text(self, tools: Sequence[ToolSpec], after_text: bool) -> str:
        """The tool list as the model reads it (inside the system prompt or its own turn)."""
        if self.tools_turn is not None:
            listed = json.dumps([t.as_openai()["function"] for t in tools], ensure_ascii=False)
            return (
                "You can call the functions below. To call one, write <|action_start|><|plugin|>, "
                f'then {{"name": <name>, "parameters": <arguments object>}}, then <|action_end|>.\n{listed}'
            )
        listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
        return (
            ("\n\n" if after_text else "")
            + "# Tools\n\nYou may call one or more functions to answer. Their signatures are inside "
            + f"<tools></tools>:\n<tools>\n{listed}\n</tools>\n\nTo call a function, answer with a JSON "
            + "object holding its name and arguments inside <tool_call></tool_call> tags:\n"
            + '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>'
        )

    def call_json(self, name: str, arguments: str) -> str:
        """A call's JSON as the grammar makes the model write it (json.dumps separators)."""
        try:
            value = json.loads(arguments)
        except ValueError:
            value = arguments
        return json.dumps({"name": name, self.arguments_key: value}, ensure_ascii=False)

    def calls_text(self, calls: Sequence[ToolCall], after_text: bool) -> str:
        """An assistant message's calls as written after its text."""
        return "".join(
            ("\n" if after_text or i else "") + self.call_open + self.call_json(c.name, c.arguments) + self.call_close
            for i, c in enumerate(calls)
        )


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "<tool_response>\n", "\n</tool_response>")
FORMATS: dict[str, ToolFormat] = {
    "hermes": HERMES,
    "generic": ToolFormat(
        "generic", "<tool_call>\n", "\n</tool_call>", "arguments", "<tool_response>\n", "\n</tool_response>"
    ),
    "internlm2": ToolFormat(
        "internlm2",
        "<|action_start|><|plugin|>\n",
        "<|action_end|>",
        "parameters",
        result_prefix="<|im_start|>environment name=<|plugin|>\n",
        result_suffix="<|im_end|>\n",
        merge_results=False,
        tools_turn=("<|im_start|>system name=<|plugin|>\n", "<|im_end|>\n"),
    ),
}


def get_format(name: str) -> ToolFormat:
    return FORMATS[name]


# --- parsing a whole answer ------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def parse_answer(text: str, fmt: ToolFormat) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of an answer. Lenient: a missing close tag, "parameters" for "arguments",
    a list of calls in one block, arguments given as a JSON string. Junk: ([text], no calls)."""
    open_tag, close_tag = fmt.open_tag, fmt.close_tag
    start = text.find(open_tag)
    if start < 0:
        return text, []
    content, calls, rest, tail = text[:start], [], text[start:], ""
    while rest.startswith(open_tag):
        body = rest[len(open_tag) :]
        end = body.find(close_tag)
        block, rest = (body, "") if end < 0 else (body[:end], body[end + len(close_tag) :].lstrip())
        found = parse_block(block)
        if not found:
            return text, []
        calls += found
        if not rest.startswith(open_tag):
            tail = rest
    content = (content.rstrip() + ("\n" + tail.strip() if tail.strip() else "")).strip()
    return content, calls


def parse_block(block: str) -> list[ParsedCall]:
    """The call(s) in one tag's JSON, or [] when it is not a well-formed call."""
    raw = block.strip()
    try:
        value = json.loads(raw)
    except ValueError:
        try:
            value, _ = json.JSONDecoder().raw_decode(raw)
        except ValueError:
            return []
    items = value if isinstance(value, list) else [value]
    calls = [call_of(item, raw if len(items) == 1 else None) for item in items]
    return calls if calls and all(calls) else []


ARGS_PREFIX = re.compile(r'^\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def call_of(item: Any, raw: str | None) -> ParsedCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
        item = item["function"]
    name = item.get("name")
    args = item.get("arguments", item.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):  # arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(name, raw_arguments(raw, args) or json.dumps(args, ensure_ascii=False))


def raw_arguments(raw: str | None, args: dict) -> str | None:
    """The arguments exactly as the model wrote them, when that text is the parsed object."""
    match = ARGS_PREFIX.match(raw or "")
    if not match:
        return None
    body = raw[match.end() :].rstrip()
    if not body.endswith("}"):
        return None
    body = body[:-1].rstrip()
    try:
        return body if json.loads(body) == args else None
    except ValueError:
        return None


def to_tool_calls(calls: Sequence[ParsedCall]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(new_call_id(), c.name, c.arguments) for c in calls)


def answer_message(text: str, fmt: ToolFormat | None) -> Message:
    """An assistant message from generated text (calls split off when `fmt` is given)."""
    from vlchat.chat.messages import Text

    content, calls = parse_answer(text, fmt) if fmt is not None else (text, [])
    return Message("assistant", [Text(content.strip())], tool_calls=to_tool_calls(calls))


# --- parsing a stream ------------------------------------------------------------------------


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


StreamEvent = ContentDelta | CallStart | ArgumentsDelta


class CallStream:
    """Text deltas in, OpenAI-style stream events out: content until a call opens, then per call its
    name once and its arguments in fragments. The fragments joined equal `parse_answer`'s arguments
    for well-formed (grammar-made) calls."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.buffer = ""  # text not yet turned into events
        self.in_call = False
        self.calls: list[CallStart] = []
        self.sent_args: list[str] = []  # per call, the argument text sent so far
        self.current: int | None = None  # the call being read, once its name was sent

    def feed(self, delta: str) -> list[StreamEvent]:
        self.buffer += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        return self._drain(final=True)

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            if not self.in_call:
                start = self.buffer.find(self.fmt.open_tag)
                if start < 0:  # text; trailing whitespace and a possible open-tag start wait
                    keep = 0 if final else held_back(self.buffer, self.fmt.open_tag)
                    upto = len(self.buffer[: len(self.buffer) - keep].rstrip())
                    if upto:
                        events.append(ContentDelta(self.buffer[:upto]))
                    self.buffer = "" if final else self.buffer[upto:]
                    return events
                if self.buffer[:start].strip():
                    events.append(ContentDelta(self.buffer[:start].rstrip()))
                self.buffer, self.in_call = self.buffer[start + len(self.fmt.open_tag) :], True
            end = self.buffer.find(self.fmt.close_tag)
            if end < 0 and not final:
                events += self._partial_call(self.buffer)
                return events
            block = self.buffer if end < 0 else self.buffer[:end]
            events += self._complete_call(block)
            self.buffer = "" if end < 0 else self.buffer[end + len(self.fmt.close_tag) :]
            self.in_call = False
            if end < 0:
                return events

    def _partial_call(self, text: str) -> list[StreamEvent]:
        """Name once it is known, then the arguments written so far minus a tail that may be the
        call's closing brace or the start of the close tag."""
        match = ARGS_PREFIX.match(text.lstrip())
        if not match:
            return []
        events: list[StreamEvent] = []
        if self.current is None:
            self.current = self._start(json.loads(f'"{match.group(1)}"'), events)
        rest = text.lstrip()[match.end() :]
        rest = rest[: len(rest) - held_back(rest, self.fmt.close_tag)].rstrip()
        rest = rest[:-1].rstrip() if rest.endswith("}") else rest
        self._send(self.current, rest, events)
        return events

    def _complete_call(self, block: str) -> list[StreamEvent]:
        events = self._partial_call(block)
        current, self.current = self.current, None
        found = parse_block(block)
        if not found and current is None:
            events.append(ContentDelta(self.fmt.open_tag + block))
        for k, call in enumerate(found):
            index = current if k == 0 and current is not None else self._start(call.name, events)
            self._send(index, call.arguments, events)
        return events

    def _start(self, name: str, events: list[StreamEvent]) -> int:
        self.calls.append(CallStart(len(self.calls), new_call_id(), name))
        self.sent_args.append("")
        events.append(self.calls[-1])
        return len(self.calls) - 1

    def _send(self, index: int, arguments: str, events: list[StreamEvent]) -> None:
        """Send what `arguments` adds to the text already sent for call `index` (only ever appends)."""
        sent = self.sent_args[index]
        if len(arguments) > len(sent) and arguments.startswith(sent):
            events.append(ArgumentsDelta(index, arguments[len(sent) :]))
            self.sent_args[index] = arguments


def held_back(text: str, tag: str) -> int:
    """How many trailing characters of `text` could be the start of `tag` (kept until known)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


# --- files (the CLI's --tools and --json-schema) -----------------------------------------------


def read_json_file(path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise VlchatError(f"cannot read {what} {path}: {error}") from None


def load_tools(path) -> tuple[ToolSpec, ...]:
    """A JSON list of OpenAI tools ({"type": "function", "function": {...}}) or bare functions."""
    data = read_json_file(path, "tools file")
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data) or not data:
        raise VlchatError(f"{path}: expected a non-empty JSON list of tools like OpenAI's 'tools' field")
    specs = []
    for i, item in enumerate(data):
        function = item.get("function", item)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise VlchatError(f"{path}: tool {i} has no function name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        specs.append(ToolSpec(function["name"], str(function.get("description") or ""), parameters))
    check_tools(specs, "tools file")
    return tuple(specs)


def calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Calls as printed by the CLI: {"id", "name", "arguments": <the parsed object>}."""
    return [{"id": c.id, "name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
