"""System-prompt presets."""

from __future__ import annotations

import pytest

from vlchat.chat.personas import PERSONAS, get_persona
from vlchat.errors import VlchatError


def test_presets() -> None:
    assert set(PERSONAS) == {"assistant", "zhubajie", "chinese"}
    assert all(isinstance(text, str) and text.strip() for text in PERSONAS.values())
    assert "猪八戒" in get_persona("zhubajie")
    assert "中文" in get_persona("chinese")
    assert get_persona("assistant") == PERSONAS["assistant"]


def test_unknown_persona_lists_the_names() -> None:
    with pytest.raises(VlchatError, match=r"unknown persona 'x'; choose one of: assistant, zhubajie, chinese"):
        get_persona("x")
