"""Schema derivation from signatures and Google-style docstrings; the registry's OpenAI export."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from PIL import Image

from vlchat.agent.tools import (
    Schema,
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    json_schema,
    parse_google_docstring,
)


def search(
    query: str,
    ctx: ToolContext,
    limit: Annotated[int, Schema(minimum=1)] = 5,
    mode: Literal["fast", "exact"] = "fast",
    tags: list[str] | None = None,
    box: tuple[float, float, float, float] | None = None,
    weight: float = 1.0,
    strict: bool = False,
) -> dict:
    """Search the index for documents.

    Longer explanation that
    wraps lines.

    Args:
        query: the words to look for.
        limit (int): how many results,
            at most.
        mode: how to match.
        tags: only documents with all these tags.
        box: a region.
        weight: a weight.
        strict: refuse partial matches.

    Returns:
        the hits.
    """
    return {}


def test_schema_from_signature_and_docstring():
    tool = Tool.from_function(search)
    assert tool.name == "search"
    assert tool.description == "Search the index for documents.\n\nLonger explanation that wraps lines."
    assert tool.context_parameter == "ctx"
    params = tool.parameters
    assert params["type"] == "object" and params["additionalProperties"] is False
    assert params["required"] == ["query"]
    props = params["properties"]
    assert "ctx" not in props
    assert props["query"] == {"type": "string", "description": "the words to look for."}
    assert props["limit"] == {
        "type": "integer",
        "minimum": 1,
        "description": "how many results, at most.",
        "default": 5,
    }
    assert props["mode"] == {
        "enum": ["fast", "exact"],
        "type": "string",
        "description": "how to match.",
        "default": "fast",
    }
    assert props["tags"]["type"] == ["array", "null"] and props["tags"]["items"] == {"type": "string"}
    assert props["box"]["type"] == ["array", "null"]
    assert (props["box"]["minItems"], props["box"]["maxItems"]) == (4, 4)
    assert props["weight"]["type"] == "number" and props["strict"]["type"] == "boolean"


def test_json_schema_mapping():
    assert json_schema(int | str) == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert json_schema(Literal["a", None]) == {"enum": ["a", None]}
    assert json_schema(Literal["a", "b"] | None) == {"enum": ["a", "b", None], "type": ["string", "null"]}
    assert json_schema(tuple[int, ...]) == {"type": "array", "items": {"type": "integer"}}
    assert json_schema(tuple[int, str])["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert json_schema(dict[str, int]) == {"type": "object"}
    with pytest.raises(ValueError, match="no JSON Schema"):
        json_schema(set[int])


def test_docstring_parser_reads_google_args_with_types_and_continuations():
    description, args = parse_google_docstring("Do it.\n\nArgs:\n    a (int): first\n        more.\n    b: second\n")
    assert description == "Do it."
    assert args == {"a": "first more.", "b": "second"}


def _undocumented(x: int, y: int) -> int:
    """Add.

    Args:
        x: first.
    """
    return x + y


def _unhinted(x) -> int:  # noqa: ANN001 - the point of the test
    """Add.

    Args:
        x: first.
    """
    return x


def _varargs(*xs: int) -> int:
    """Add.

    Args:
        xs: numbers.
    """
    return sum(xs)


def _extra_doc(x: int) -> int:
    """Add.

    Args:
        x: first.
        z: not a parameter.
    """
    return x


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (_undocumented, "'y' is not described"),
        (_unhinted, "needs a type hint"),
        (_varargs, r"\*args"),
        (_extra_doc, "unknown parameters"),
    ],
)
def test_bad_tool_definitions_are_refused(function, message):
    with pytest.raises(ValueError, match=message):
        Tool.from_function(function)


def test_registry_openai_export_and_duplicates():
    registry = ToolRegistry([search])
    assert registry.names == ["search"] and "search" in registry and len(registry) == 1
    [exported] = registry.openai_tools()
    assert exported["type"] == "function"
    assert set(exported["function"]) == {"name", "description", "parameters"}
    assert exported["function"]["parameters"]["required"] == ["query"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(search)
    with pytest.raises(ValueError, match="tool name"):
        Tool.from_function(search, name="has space")


def test_context_names_images_and_refuses_unknown_ones():
    ctx = ToolContext()
    red = Image.new("RGB", (8, 8), "red")
    assert ctx.add_image(red) == "image_1"
    assert ctx.add_image(red) == "image_2"
    assert ctx.image("image_1") is red
    with pytest.raises(ToolError, match="no image named 'cat.jpg'; images in this conversation: image_1, image_2"):
        ctx.image("cat.jpg")
    assert [i.name for i in ctx.added_since(1)] == ["image_2"]
    assert ctx.added_since(1)[0].png_bytes().startswith(b"\x89PNG")
