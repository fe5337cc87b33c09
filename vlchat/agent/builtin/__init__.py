"""The built-in offline tools (arxiv_search needs a network but fails cleanly without one).

`default_registry()` builds all five with their default configs; heavy parts (the OCR engine, the
image classifier) load on their first call, so building a registry costs nothing.
"""

from __future__ import annotations

from vlchat.agent.builtin.arxiv import ArxivClient, arxiv_search_tool
from vlchat.agent.builtin.labels import image_labels_tool
from vlchat.agent.builtin.ocr import read_text_tool
from vlchat.agent.builtin.sandbox import SandboxConfig, python_tool
from vlchat.agent.builtin.zoom import zoom_tool
from vlchat.agent.tools import ToolRegistry

BUILTIN_TOOLS = ("read_text", "image_labels", "zoom", "python", "arxiv_search")


def default_registry(
    sandbox: SandboxConfig | None = None, arxiv: ArxivClient | None = None, network: bool = True
) -> ToolRegistry:
    """All built-in tools; `network=False` leaves out arxiv_search."""
    tools = [read_text_tool(), image_labels_tool(), zoom_tool(), python_tool(sandbox)]
    if network:
        tools.append(arxiv_search_tool(client=arxiv))
    return ToolRegistry(tools)
