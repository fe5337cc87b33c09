"""The base LM's own replies to text-only prompts, for the tool-use part's "tools:general" replay.

The tool-use part (configs/train/tool-use.yaml) offers tools on plain text prompts (poems,
explanations, greetings, advice) that must be answered directly. Their answers are what the
default model says to the same prompt in a plain text chat today: the language model with its
LoRA adapter OFF (a text-only prompt runs without it, model/language.py `adapter_on`), the
template's default system prompt, no tools, greedy decoding. Training on them teaches the adapter,
which is on whenever tools are offered, to keep the base LM's behaviour there.

The prompts are templates x topics (`general_prompts`), English and Chinese, never the eval's
list. Run once and commit the file (37 minutes on a busy 2-core AVX2 machine: one prompt at a time):

    python -m vlchat.train.base_replies [--out data/tool-use/base-replies.jsonl] [--max-new-tokens 80]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPLIES_FILE = Path(__file__).resolve().parents[2] / "data" / "tool-use" / "base-replies.jsonl"
PROMPT_COUNT = 120
MAX_NEW_TOKENS = 80

# (templates, topics): every template is filled with each of its topics; a seeded draw keeps PROMPT_COUNT.
EN_TEMPLATES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("Write a short poem about {}.", "Can you write a little poem about {}?", "Compose a four-line poem on {}."),
        ("the sea", "autumn leaves", "a rainy morning", "the moon", "friendship", "snow", "a city at night"),
    ),
    (
        ("Explain {} in simple words.", "Can you explain {} to a child?", "What is {}? Keep it short."),
        ("photosynthesis", "gravity", "electricity", "a volcano", "the water cycle", "a black hole", "inflation"),
    ),
    (
        ("Give me some advice on {}.", "Any tips for {}?", "How can I get better at {}?"),
        ("sleeping well", "learning a new language", "saving money", "staying focused", "cooking at home"),
    ),
    (
        ("Tell me a fun fact about {}.", "What is something interesting about {}?"),
        ("octopuses", "the Sun", "penguins", "honey bees", "elephants", "the ocean"),
    ),
    (
        ("Write a short story about {}.", "Tell me a bedtime story about {}."),
        ("a lost dog", "a brave mouse", "a robot who learns to paint", "a little boat"),
    ),
    (
        ("How do I {}?", "What is the best way to {}?"),
        ("boil an egg", "write a polite email", "start running", "make a cup of tea", "plan a trip"),
    ),
)
EN_GREETINGS: tuple[str, ...] = (
    "Hello!",
    "Hi there, how are you?",
    "Good morning!",
    "Thank you for your help.",
    "Who are you?",
    "Can you help me with something?",
    "Good night!",
    "Nice to meet you.",
    "What can you do?",
    "Hey!",
)
ZH_TEMPLATES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("写一首关于{}的短诗。", "请写几句关于{}的诗。"), ("大海", "秋天", "月亮", "春雨")),
    (("用简单的话解释{}。", "什么是{}？请简短回答。"), ("光合作用", "重力", "电", "火山")),
    (("给我一些关于{}的建议。",), ("睡个好觉", "学习外语", "省钱", "保持专注")),
    (("告诉我一个关于{}的有趣事实。",), ("章鱼", "太阳", "企鹅")),
)
ZH_GREETINGS: tuple[str, ...] = ("你好！", "早上好！", "谢谢你的帮助。", "你是谁？", "你能做什么？")
ZH_SHARE = 24  # Chinese prompts among PROMPT_COUNT


def general_prompts(count: int = PROMPT_COUNT, seed: int = 0) -> list[str]:
    """`count` prompts (ZH_SHARE of them Chinese) from the templates x topics and greetings, seeded."""
    english = [t.format(x) for ts, topics in EN_TEMPLATES for t in ts for x in topics] + list(EN_GREETINGS)
    chinese = [t.format(x) for ts, topics in ZH_TEMPLATES for t in ts for x in topics] + list(ZH_GREETINGS)
    rng = random.Random(f"general-prompts:{seed}")
    zh = min(ZH_SHARE, len(chinese), count)
    chosen = rng.sample(english, min(count - zh, len(english))) + rng.sample(chinese, zh)
    return chosen


def generate_replies(prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, model: str = "default") -> list[dict]:
    """[{"prompt", "reply", "finish_reason"}]: the model's greedy answer in a fresh text-only session each."""
    from vlchat.api import load
    from vlchat.config import GenerationConfig

    chat = load(model).engine  # chat.engine.Chat
    generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for prompt in prompts:
        session = chat.session()  # the template's default system prompt, no tools: the adapter stays off
        session.ask(prompt)
        reply = session.answer(generation)
        out.append({"prompt": prompt, "reply": reply, "finish_reason": session.last_finish_reason})
    return out


def read_replies(path: Path = REPLIES_FILE) -> list[dict]:
    """The committed replies ({"prompt", "reply", ...} per line)."""
    from vlchat.errors import VlchatError

    if not path.is_file():
        raise VlchatError(f"{path} not found; make it with: python -m vlchat.train.base_replies")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPLIES_FILE)
    parser.add_argument("--count", type=int, default=PROMPT_COUNT)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    start = time.monotonic()
    rows = generate_replies(general_prompts(args.count), args.max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} replies -> {args.out} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
