"""Run a tool call and turn whatever happens into an `Observation` the loop can show the model.

`ToolExecutor.run(name, arguments)` never raises: an unknown tool, arguments that are not JSON
or break the tool's schema (checked with jsonschema), an exception in the tool, a call past its
wall-clock limit -- each becomes an observation with ok=False and the reason in words. (The idea
of one executor between the model and its tools is lagent's ActionExecutor; this one is written
for vlchat's Tool/ToolContext.)

Timeouts: the call runs in a daemon thread that the executor stops waiting for at the limit. A
Python thread cannot be killed, so an in-process tool past its limit is abandoned and may still
finish in the background; at most `max_abandoned` such calls may be pending before the executor
refuses new ones. The `python` tool does not rely on this: it kills its own sandbox process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from vlchat.agent.tools import Tool, ToolContext, ToolError, ToolImage, ToolRegistry


@dataclass(frozen=True)
class ExecutorConfig:
    timeout_s: float = 60.0  # wall-clock limit for tools that set none
    max_output_chars: int = 8000  # the observation's content is cut beyond this
    max_abandoned: int = 4  # timed-out in-process calls still running before new calls are refused

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_output_chars < 100 or self.max_abandoned < 0:
            raise ValueError(f"invalid executor config {self}")


@dataclass
class Observation:
    """The outcome of one tool call.

    `content`: what the model reads -- the tool's text, or its result as JSON; on failure the
    error message followed by any partial output. `data`: the result as Python data (ok only).
    `images`: images the call added to the context (zoom), for the loop to show the model.
    """

    tool: str
    ok: bool
    content: str
    elapsed_s: float
    error: str | None = None
    data: Any = None
    images: list[ToolImage] = field(default_factory=list)
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (images by name and content key, not pixels)."""
        return {
            "tool": self.tool,
            "ok": self.ok,
            "content": self.content,
            "error": self.error,
            "elapsed_s": round(self.elapsed_s, 3),
            "images": [{"name": i.name, "key": i.key} for i in self.images],
            "truncated": self.truncated,
        }


class ToolExecutor:
    """Validates and runs calls to the tools of one registry, within one context."""

    def __init__(
        self, registry: ToolRegistry, context: ToolContext | None = None, config: ExecutorConfig | None = None
    ) -> None:
        self.registry = registry
        self.context = context if context is not None else ToolContext()
        self.config = config or ExecutorConfig()
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._abandoned: list[threading.Thread] = []

    def run(self, name: str, arguments: str | Mapping[str, Any] | None = None) -> Observation:
        """Call tool `name` with `arguments` (a JSON object as text, as a model writes it, or a dict)."""
        start = time.monotonic()
        mark = self.context.added_count
        try:
            tool = self._tool(name)
            kwargs = self._arguments(tool, arguments)
            result = self._call(tool, kwargs)
        except ToolError as err:
            return self._failure(name, str(err), start, mark, err.data)
        except Exception as err:  # a bug in a tool: its type and message, never a traceback
            return self._failure(name, f"{type(err).__name__}: {err}", start, mark)
        content, truncated = self._cap(_to_text(result))
        elapsed = time.monotonic() - start
        images = self.context.added_since(mark)
        return Observation(name, True, content, elapsed, data=result, images=images, truncated=truncated)

    def _tool(self, name: str) -> Tool:
        tool = self.registry.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(self.registry.names) or "none"
            raise ToolError(f"unknown tool {name!r}; available tools: {known}")
        return tool

    def _arguments(self, tool: Tool, arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise ToolError(f"arguments for {tool.name} are not valid JSON: {err}") from None
        if not isinstance(arguments, Mapping):
            raise ToolError(f"arguments for {tool.name} must be a JSON object, got {type(arguments).__name__}")
        errors = sorted(self._validator(tool).iter_errors(dict(arguments)), key=lambda e: list(e.absolute_path))
        if errors:
            reasons = "; ".join(_describe(e) for e in errors[:3])
            raise ToolError(f"invalid arguments for {tool.name}: {reasons}")
        return dict(arguments)

    def _validator(self, tool: Tool) -> jsonschema.protocols.Validator:
        if tool.name not in self._validators:
            cls = jsonschema.validators.validator_for(tool.parameters, default=jsonschema.Draft202012Validator)
            cls.check_schema(tool.parameters)
            self._validators[tool.name] = cls(tool.parameters)
        return self._validators[tool.name]

    def _call(self, tool: Tool, kwargs: dict[str, Any]) -> Any:
        """Run the tool in a daemon thread and wait at most its timeout."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= self.config.max_abandoned > 0:
            raise ToolError(f"{len(self._abandoned)} timed-out tool calls are still running; try again later")
        if tool.context_parameter:
            kwargs[tool.context_parameter] = self.context
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = tool.function(**kwargs)
            except BaseException as err:  # handed to the waiting thread
                outcome["error"] = err

        thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
        timeout = tool.timeout_s or self.config.timeout_s
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self._abandoned.append(thread)
            raise ToolError(f"{tool.name} did not finish within {timeout:g} s and was abandoned")
        if isinstance(outcome.get("error"), Exception):
            raise outcome["error"]
        if "error" in outcome:  # SystemExit, KeyboardInterrupt raised inside the tool
            raise ToolError(f"{tool.name} stopped with {type(outcome['error']).__name__}")
        return outcome.get("result")

    def _failure(self, name: str, message: str, start: float, mark: int, data: Any = None) -> Observation:
        text = message if data is None else f"{message}\n{_to_text(data)}"
        content, truncated = self._cap(text)
        images = self.context.added_since(mark)
        return Observation(
            name, False, content, time.monotonic() - start, error=message, images=images, truncated=truncated
        )

    def _cap(self, text: str) -> tuple[str, bool]:
        limit = self.config.max_output_chars
        if len(text) <= limit:
            return text, False
        return f"{text[:limit]}\n…[{len(text) - limit} more characters cut]", True


def _to_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message
