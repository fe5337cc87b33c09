"""Tools an agent can call: a `Tool` (name, description, JSON Schema of its parameters, the callable),
the schema derived from a Python function's signature and Google-style docstring, and a registry
that exports OpenAI-style function definitions.

Schema derivation (the idea after lagent's `tool_api` and OpenAI's function-calling format, written
here from scratch):

- type hints -> JSON Schema: str/int/float/bool -> string/integer/number/boolean, `X | None` ->
  X's type plus "null", `Literal[...]` -> enum, `list[X]` / `tuple[X, ...]` -> array of X,
  `tuple[X, X]` -> array of exactly 2, `dict` -> object, `Annotated[X, Schema(minimum=1)]` merges
  those keywords into X's schema;
- a parameter with a default is not required (its default is recorded when it is JSON);
- descriptions come from the docstring: the text before the first section is the tool's
  description, and the Google-style `Args:` section gives one per parameter
  (`name: text` or `name (type): text`, continuation lines indented deeper). Every parameter
  must be documented: a model calls tools better when each argument is explained.
- a parameter annotated `ToolContext` is not part of the schema: the executor passes its context
  (the conversation's images) there.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import re
import threading
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from PIL import Image

from vlchat.errors import VlchatError
from vlchat.images import image_key, load_image

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?|See Also):\s*$")
ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
PRIMITIVES: dict[type, str] = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


class Schema(dict):
    """JSON Schema keywords to merge into a parameter's derived schema: `Annotated[int, Schema(minimum=1)]`.

    A dict that hashes (typing needs hashable Annotated metadata when the hint sits in a Union)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


class ToolError(VlchatError):
    """A failure a tool reports in words (bad image name, offline service, code that raised).

    `data`, when given, is shown to the model beside the message (e.g. the stdout printed before
    the error)."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


@dataclass(frozen=True)
class ToolImage:
    """An image a tool made (zoom's crop), under the name tools and the model refer to it by."""

    name: str
    image: Image.Image

    @property
    def key(self) -> str:
        """Content hash (vlchat.images.image_key), the chat engine's cache key for an image."""
        return image_key(self.image)

    def png_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass
class ToolContext:
    """What tools may use besides their arguments: the conversation's images by name.

    The loop adds each user image with `add_image` ("image_1", "image_2", ...); tools that make
    images (zoom) add theirs the same way, so a later call can name them. `allow_files`: a name
    that is not an image here may be a local file path (for a trusted local user, never a server).
    """

    images: dict[str, Image.Image] = field(default_factory=dict)
    allow_files: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _added: list[str] = field(default_factory=list, repr=False)

    def add_image(self, image: Image.Image, name: str | None = None) -> str:
        with self._lock:
            name = name or f"image_{len(self.images) + 1}"
            while name in self.images:
                name = f"{name}_"
            self.images[name] = image
            self._added.append(name)
            return name

    def image(self, ref: str) -> Image.Image:
        """The image named `ref`, or (allow_files) the image file at that path."""
        if ref in self.images:
            return self.images[ref]
        if self.allow_files:
            return load_image(ref)
        known = ", ".join(sorted(self.images)) or "none yet"
        raise ToolError(f"no image named {ref!r}; images in this conversation: {known}")

    def added_since(self, mark: int) -> list[ToolImage]:
        """Images added after `mark` = len(added_names) taken before a call."""
        with self._lock:
            return [ToolImage(name, self.images[name]) for name in self._added[mark:]]

    @property
    def added_count(self) -> int:
        return len(self._added)


@dataclass(frozen=True)
class Tool:
    """One callable tool. `parameters` is a JSON Schema object; `timeout_s` None = the executor's default."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    context_parameter: str | None = None  # the parameter that receives the ToolContext
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not TOOL_NAME.match(self.name):
            raise ValueError(f"tool name must match {TOOL_NAME.pattern}, got {self.name!r}")
        if not self.description:
            raise ValueError(f"tool {self.name!r} needs a description")

    @classmethod
    def from_function(cls, function: Callable[..., Any], name: str | None = None, **kwargs: Any) -> Tool:
        """A tool whose schema and description come from `function`'s signature and docstring."""
        name = name or function.__name__
        description, parameters, context_parameter = schema_from_function(function, name)
        return cls(name, description, parameters, function, context_parameter, **kwargs)

    def openai(self) -> dict[str, Any]:
        """{"type": "function", "function": {"name", "description", "parameters"}} (OpenAI's tools list)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ToolRegistry:
    """Tools by name, in registration order."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool | Callable[..., Any]) -> Tool:
        """Add a Tool, or a documented function turned into one; a name may be registered once."""
        tool = tool if isinstance(tool, Tool) else Tool.from_function(tool)
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai() for tool in self]


# --- schema derivation -------------------------------------------------------------------------


def schema_from_function(function: Callable[..., Any], name: str) -> tuple[str, dict[str, Any], str | None]:
    """(description, parameters JSON Schema, name of the ToolContext parameter or None)."""
    description, arg_docs = parse_google_docstring(inspect.getdoc(function) or "")
    hints = typing.get_type_hints(function, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    context_parameter = None
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"tool {name!r}: *args/**kwargs cannot be described to a model ({param.name})")
        if param.name not in hints:
            raise ValueError(f"tool {name!r}: parameter {param.name!r} needs a type hint")
        if hints[param.name] is ToolContext:
            context_parameter = param.name
            continue
        if param.name not in arg_docs:
            raise ValueError(f"tool {name!r}: parameter {param.name!r} is not described in the docstring's Args:")
        schema = json_schema(hints[param.name])
        schema["description"] = arg_docs.pop(param.name)
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json(param.default):
            schema["default"] = param.default
        properties[param.name] = schema
    if arg_docs:
        raise ValueError(f"tool {name!r}: the docstring describes unknown parameters {sorted(arg_docs)}")
    if not description:
        raise ValueError(f"tool {name!r}: the docstring needs a summary line (the tool's description)")
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return description, parameters, context_parameter


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a type hint (see the module docstring for the mapping)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in PRIMITIVES:
        return {"type": PRIMITIVES[hint]}
    if hint is Any:
        return {}
    if origin is Annotated:
        schema = json_schema(args[0])
        for extra in args[1:]:
            if isinstance(extra, dict):
                schema.update(copy.deepcopy(dict(extra)))
        return schema
    if origin is Literal:
        kinds = {PRIMITIVES.get(type(value)) for value in args}
        schema = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if origin in (Union, types.UnionType):
        return _union_schema(args)
    if hint is list or origin is list:
        return {"type": "array", "items": json_schema(args[0])} if args else {"type": "array"}
    if hint is tuple or origin is tuple:
        return _tuple_schema(args)
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise ValueError(f"no JSON Schema for the type hint {hint!r}")


def _union_schema(args: tuple[Any, ...]) -> dict[str, Any]:
    members = [a for a in args if a is not type(None)]
    nullable = len(members) < len(args)
    if len(members) == 1:
        schema = json_schema(members[0])
        if nullable:
            if isinstance(schema.get("type"), str):
                schema["type"] = [schema["type"], "null"]
                if "enum" in schema:
                    schema["enum"] = [*schema["enum"], None]
            else:
                schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    options = [json_schema(a) for a in members] + ([{"type": "null"}] if nullable else [])
    return {"anyOf": options}


def _tuple_schema(args: tuple[Any, ...]) -> dict[str, Any]:
    if not args:
        return {"type": "array"}
    if len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": json_schema(args[0])}
    if len(set(args)) == 1:  # tuple[float, float, float, float]: a fixed-length array of one type
        return {"type": "array", "items": json_schema(args[0]), "minItems": len(args), "maxItems": len(args)}
    items = [json_schema(a) for a in args]
    return {"type": "array", "prefixItems": items, "minItems": len(args), "maxItems": len(args)}


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_json(v) for k, v in value.items())


def parse_google_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description = the text before the first section, {parameter: description} from `Args:`)."""
    description: list[str] = []
    args: dict[str, str] = {}
    section = None
    current = None
    arg_indent = None
    for line in doc.splitlines():
        stripped = line.strip()
        header = SECTION.match(stripped) if line == line.lstrip() else None
        if header:
            section, current, arg_indent = header.group(1), None, None
            continue
        if section is None:
            description.append(stripped)
        elif section in ("Args", "Arguments", "Parameters") and stripped:
            indent = len(line) - len(line.lstrip())
            arg_indent = indent if arg_indent is None else arg_indent
            found = ARG_LINE.match(stripped) if indent == arg_indent else None
            if found:
                current = found.group(1).lstrip("*")
                args[current] = found.group(3).strip()
            elif current is not None:  # a continuation line
                args[current] = f"{args[current]} {stripped}".strip()
    text = "\n".join(description).strip()
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text), args  # unwrap hard-wrapped lines, keep paragraphs
