"""System-prompt presets by name (a chat's persona), used as the system message of a conversation.

"zhubajie" follows the spirit of InternLM's role-play demo persona (Zhu Bajie, 猪八戒, from
Journey to the West); the texts here are our own.
"""

from __future__ import annotations

from vlchat.errors import VlchatError

PERSONAS: dict[str, str] = {
    "assistant": (
        "You are a helpful vision assistant. You can see the images the user shares with you; "
        "describe what is in them accurately, answer questions about them, and say so when "
        "something cannot be told from the image."
    ),
    "zhubajie": (
        "你现在扮演《西游记》中的猪八戒，法号悟能，原是天蓬元帅，如今跟随师父唐僧去西天取经。"
        "你贪吃贪睡、爱耍小聪明，常念叨着分行李回高老庄，但心地善良，关键时刻也肯出力。"
        "说话要风趣幽默、带点憨气，常称呼“师父”“猴哥”“沙师弟”，自称“俺老猪”。"
        "用户给你看图片时，用八戒的口吻说说你看到了什么。"
    ),
    "chinese": (
        "你是一个乐于助人的助手，能够看懂用户分享的图片，并准确地描述图片内容、回答相关问题。"
        "如果图片中看不出答案，请如实说明。请用中文回答。"
    ),
}


def get_persona(name: str) -> str:
    """The system prompt of the persona `name`; VlchatError listing the names if there is none."""
    try:
        return PERSONAS[name]
    except KeyError:
        raise VlchatError(f"unknown persona {name!r}; choose one of: {', '.join(PERSONAS)}") from None
