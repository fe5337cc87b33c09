"""What a request constrains, as one `Structure` (chat/grammar.py): tools under a tool_choice,
a JSON Schema for the answer, or both. Shared by the chat engine (CLI) and the server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlchat.chat.grammar import Structure, json_structure, tool_structure
from vlchat.chat.tools import ToolError, ToolFormat, ToolSpec, check_tools, get_format

CHOICES = ("none", "auto", "required")
# The CLI and the agent ask for one call per answer (the API: unless `parallel_tool_calls: true`):
# offered more, a small model repeats the same call until it runs out of tokens.
PARALLEL_CALLS = False


def build_structure(
    tools: Sequence[ToolSpec],
    tool_choice: str,
    parallel: bool,
    json_schema: dict[str, Any] | None,
    fmt: ToolFormat,
    tokenizer,
) -> Structure | None:
    """The constraint for a request, or None. tool_choice: "none" | "auto" | "required" | a
    function name. Raises ToolError (GrammarError) for bad tools, choices and schemas."""
    check_tools(tools)
    if tool_choice not in CHOICES and tool_choice not in {t.name for t in tools}:
        known = ", ".join(t.name for t in tools) or "none"
        raise ToolError(
            f"tool_choice names the function {tool_choice!r}, which is not among the tools ({known})", "tool_choice"
        )
    if tool_choice != "none" and tool_choice not in CHOICES:
        tools, tool_choice, parallel = [t for t in tools if t.name == tool_choice], "required", False
    if tool_choice == "required" and not tools:
        raise ToolError('tool_choice "required" needs at least one tool', "tool_choice")
    calling = list(tools) if tool_choice != "none" else []
    if json_schema is not None:
        if tool_choice == "required":
            return tool_structure(calling, fmt, tokenizer, "required", parallel)
        return json_structure(json_schema, tokenizer, "response_format", calling, fmt)
    if not calling:
        return None
    return tool_structure(calling, fmt, tokenizer, tool_choice, parallel)


def session_structure(session) -> Structure | None:
    if not session.tools and session.json_schema is None:
        return None
    fmt = get_format(session.template.tool_format)
    tokenizer = session.chat.model.lm.tokenizer
    tools = session.grammar_tools if session.grammar_tools is not None else session.tools
    return build_structure(tools, session.tool_choice, PARALLEL_CALLS, session.json_schema, fmt, tokenizer)
