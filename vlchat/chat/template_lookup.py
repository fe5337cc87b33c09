"""Templates by name: the built-in registry (chat/templates.py TEMPLATES) or a checkpoint's own
chat template (`hf:<dir>`, chat/hf_template.py). Its own module so that hf_template can build on
templates.py without templates.py importing it back."""

from __future__ import annotations

from vlchat.chat.hf_template import checkpoint_template
from vlchat.chat.templates import TEMPLATES, Template
from vlchat.errors import VlchatError


def get_template(name: str) -> Template:
    """The template registered under `name`, or a checkpoint's own ("hf:<dir>", chat/hf_template.py);
    VlchatError listing the names if there is none."""
    if name.startswith("hf:"):
        return checkpoint_template(name[len("hf:") :])
    try:
        return TEMPLATES[name]
    except KeyError:
        raise VlchatError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None
