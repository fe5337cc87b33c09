"""Tool-use training samples ("tools:KIND" sources): conversations rendered exactly as the agent
(vlchat/agent/loop.py) renders them at inference, for the tool-use part (configs/train/tool-use.yaml).

Every sample offers tools (`Sample.tools`): a subset of the five built-in tools' specs in their order,
made from `default_registry()` as `Agent.__init__` makes them, sometimes with user-defined
functions from the training pool (train/tool_functions.py). A question with an image gets the
agent's suffix "\\n(images for tools: image_1)" after the image part, as `Agent.ask` sends it.

Kinds (sample i of a source comes from seed `seed_offset + i`, the same every run):

    labels     "What animal is this?" -> image_labels {"image": "image_1"[, "top_k": k]} -> the
               observation -> "It is a {top label}." (label text exactly as the tool wrote it)
    read_text  "What does the sign say?" -> read_text {"image": "image_1"} -> "It says: {text}"
    python     "What is 37 times 43?" (no image) -> python {"code": "print(37 * 43)"} ->
               "37 × 43 = 1591."
    functions  a request for one of the offered user functions -> the call with its arguments
               (the sample ends at the call: the client runs it); or a request none of them fits
               -> a short direct reply
    qa         synthetic shape-scene questions (train/synth.py) answered directly with tools offered
    general    text-only prompts answered directly with the base LM's own reply
               (data/tool-use/base-replies.jsonl, train/base_replies.py)

Observations are made by the tools' own code: image_labels and read_text run through a
`ToolExecutor` with a stand-in classifier / OCR reader that returns fabricated but realistic
results (ImageNet label names, the lines drawn on the image), so their JSON is the tools' own;
python's is the sandbox tool's report ({"stdout", "result"}) of the printed value.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from vlchat.agent.builtin.labels import LabelsConfig, image_labels_tool, imagenet_labels
from vlchat.agent.builtin.ocr import OcrConfig, TextLine, read_text_tool
from vlchat.agent.executor import ToolExecutor, _to_text
from vlchat.agent.tools import ToolContext, ToolRegistry
from vlchat.chat.messages import Image, Message, Text, ToolCall
from vlchat.chat.tools import ToolSpec
from vlchat.errors import VlchatError
from vlchat.images import image_key
from vlchat.train.samples import Sample
from vlchat.train.tool_functions import FAMILIES

KINDS = ("labels", "read_text", "python", "functions", "qa", "general")
IMAGE_NAME = "image_1"  # the agent's name for the conversation's first image (ToolContext.add_image)
ZH_SHARE = 0.25  # Chinese questions among the labels, read_text, python and functions samples


def images_suffix(names: Sequence[str]) -> str:
    """What `Agent.ask` appends to a question when it has images (vlchat/agent/loop.py)."""
    return f"\n(images for tools: {', '.join(names)})"


@lru_cache(maxsize=1)
def builtin_specs() -> tuple[ToolSpec, ...]:
    """The built-in tools as the agent offers them (Agent.__init__: ToolSpec of each registry tool)."""
    from vlchat.agent.builtin import default_registry

    return tuple(ToolSpec(t.name, t.description, t.parameters) for t in default_registry())


def offered_tools(rng: random.Random, needed: str | None, user_functions: Sequence[ToolSpec] = ()) -> tuple:
    """A subset of the built-in specs that holds `needed` (40%: all five), in the registry's order (the
    order the agent always lists them in, so samples share a long prompt prefix: train/packing.py),
    then `user_functions` after them."""
    specs = builtin_specs()
    if rng.random() < 0.4:
        chosen = list(specs)
    else:
        others = [s for s in specs if s.name != needed]
        kept = {s.name for s in rng.sample(others, rng.randint(0 if needed else 1, len(others) - 1))} | {needed}
        chosen = [s for s in specs if s.name in kept]
    return tuple(chosen + list(user_functions))


def maybe_user_functions(rng: random.Random, share: float = 0.2) -> list[ToolSpec]:
    return [f.spec for f in rng.sample(FAMILIES, rng.randint(1, 2))] if rng.random() < share else []


def _call(seed: int, name: str, arguments: dict) -> ToolCall:
    return ToolCall(f"call_{seed:08d}", name, json.dumps(arguments, ensure_ascii=False))


def _image_question(image: PILImage.Image, question: str) -> tuple[Message, Image]:
    part = Image(key=image_key(image))
    return Message("user", [part, Text(question + images_suffix([IMAGE_NAME]))]), part


def _tool_turns(call: ToolCall, observation: str, answer: str) -> list[Message]:
    return [
        Message("assistant", [Text("")], tool_calls=(call,)),
        Message("tool", [Text(observation)], tool_call_id=call.id, name=call.name),
        Message.text_message("assistant", answer),
    ]


# --- labels ---------------------------------------------------------------------------------------

LABEL_QUESTIONS_EN = (
    "What animal is this?",
    "What is the main object in this picture?",
    "What is this?",
    "What is in this image?",
    "What does this photo show?",
    "Can you tell me what this is?",
    "What kind of object is this?",
    "Identify the object in the image.",
    "What am I looking at?",
    "What is shown in this picture?",
    "What animal is in the photo?",
    "Name the main thing in this image.",
)
LABEL_QUESTIONS_ZH = (
    "这是什么动物？",
    "图里是什么东西？",
    "这是什么？",
    "图片中的主要物体是什么？",
    "这张照片拍的是什么？",
    "这是什么东西？",
)


class _StandInClassifier:
    """ImageClassifier's interface with fabricated top-k results (image_labels_tool's `classifier`)."""

    config = LabelsConfig()

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def top_k(self, image: PILImage.Image, k: int) -> list[tuple[str, float]]:
        names = self.rng.sample(imagenet_labels(), k)
        left, probabilities = 1.0, []
        for i in range(k):
            share = self.rng.uniform(0.35, 0.95) if i == 0 else self.rng.uniform(0.1, 0.8)
            probabilities.append(round(left * share, 4))
            left -= probabilities[-1]
        return list(zip(names, sorted(probabilities, reverse=True)))  # most likely first, as topk gives them


def labels_sample(seed: int) -> Sample:
    rng = random.Random(f"tools:labels:{seed}")
    image = photo_like_image(rng, seed)
    zh = rng.random() < ZH_SHARE
    question = rng.choice(LABEL_QUESTIONS_ZH if zh else LABEL_QUESTIONS_EN)
    arguments: dict = {"image": IMAGE_NAME}
    if rng.random() < 0.3:
        arguments["top_k"] = rng.choice((3, 3, 5))
    tool = image_labels_tool(classifier=_StandInClassifier(rng))  # type: ignore[arg-type]
    observation = _observe(tool, image, arguments)
    top = observation.data["labels"][0]["label"]
    answer = f"这是{top}。" if zh else rng.choice(("It is {}.", "This is {}.", "It looks like {}.")).format(_a(top))
    user, _ = _image_question(image, question)
    call = _call(seed, "image_labels", arguments)
    tools = offered_tools(rng, "image_labels", maybe_user_functions(rng))
    meta = {"kind": "labels", "lang": "zh" if zh else "en", "answer": top}
    return Sample([user, *_tool_turns(call, observation.content, answer)], [image], f"tools:labels:{seed}", meta, tools)


def _a(label: str) -> str:
    return f"{'an' if label[:1].lower() in 'aeiou' else 'a'} {label}"


def _observe(tool, image: PILImage.Image, arguments: dict):
    """Run `tool` on `arguments` through the agent's executor with `image` as image_1."""
    context = ToolContext()
    context.add_image(image)
    observation = ToolExecutor(ToolRegistry([tool]), context).run(tool.name, json.dumps(arguments))
    if not observation.ok:
        raise VlchatError(f"the stand-in {tool.name} failed: {observation.content}")
    return observation


@lru_cache(maxsize=1)
def _sample_photos() -> tuple[PILImage.Image, ...]:
    """matplotlib's bundled sample pictures (not scikit-image's or scikit-learn's: those are the eval's)."""
    try:
        import matplotlib
    except ImportError:
        return ()
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    names = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
    return tuple(PILImage.open(folder / n).convert("RGB") for n in names if (folder / n).is_file())


def photo_like_image(rng: random.Random, seed: int) -> PILImage.Image:
    """A varied picture: a synthetic scene, a crop of a matplotlib sample photo, noise or a gradient."""
    kind = rng.choice(("scene", "scene", "photo", "noise", "gradient"))
    photos = _sample_photos()
    if kind == "photo" and photos:
        photo = rng.choice(photos)
        w, h = photo.size
        side = rng.randint(min(w, h) // 2, min(w, h))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        return photo.crop((x, y, x + side, y + side)).resize((224, 224))
    if kind == "noise":
        pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
        return PILImage.fromarray(pixels).resize((224, 224), PILImage.NEAREST)
    if kind == "gradient":
        a, b = np.array([rng.randint(0, 255) for _ in range(3)]), np.array([rng.randint(0, 255) for _ in range(3)])
        t = np.linspace(0, 1, 224)[:, None, None]
        column = (a * (1 - t) + b * t).astype(np.uint8)  # (224, 1, 3)
        return PILImage.fromarray(np.repeat(column, 224, axis=1))
    from vlchat.train.synth import render
    from vlchat.train.synth_scene import make_scene

    return render(make_scene(900_000 + seed % 100_000))


# --- read_text -------------------------------------------------------------------------------------

TEXT_QUESTIONS_EN = (
    "What does the sign say?",
    "Read the text in this image.",
    "What is written here?",
    "What does it say?",
    "What text is in the picture?",
    "Can you read this for me?",
    "What are the words on this sign?",
    "Transcribe the text in the image.",
)
TEXT_QUESTIONS_ZH = ("图中的文字是什么？", "这个牌子上写着什么？", "读一下图片里的文字。", "上面写的是什么？")
SIGN_LINES_EN = (
    "OPEN 24 HOURS",
    "NO PARKING",
    "EXIT",
    "SALE 50% OFF",
    "WELCOME",
    "FRESH COFFEE",
    "PLEASE KNOCK",
    "STAFF ONLY",
    "CLOSED ON SUNDAYS",
    "WET FLOOR",
    "Main Street",
    "Platform 3",
    "Keep Left",
    "Free Wi-Fi",
    "Fire Exit",
    "Bakery",
    "Pharmacy",
    "Gate B12",
    "Push",
    "Pull",
    "No Smoking",
    "Room 204",
    "Library",
    "Hot Soup Today",
    "Car Wash $9.99",
    "Speed Limit 30",
    "Ticket Office",
    "Open 9am - 5pm",
    "Toilets",
    "Lost & Found",
)
SIGN_LINES_ZH = (
    "出口",
    "禁止吸烟",
    "欢迎光临",
    "营业中",
    "小心地滑",
    "停车场",
    "图书馆",
    "请勿打扰",
    "收银台",
    "安全出口",
)
SIGN_WORDS = (
    "open",
    "closed",
    "hours",
    "daily",
    "fresh",
    "bread",
    "coffee",
    "tea",
    "books",
    "sale",
    "new",
    "menu",
    "parking",
    "entrance",
    "office",
    "market",
    "garden",
    "station",
    "north",
    "south",
    "east",
    "west",
    "river",
    "hill",
    "park",
    "museum",
    "school",
    "bank",
    "post",
    "shop",
    "pizza",
    "noodles",
    "flowers",
    "repair",
    "bikes",
    "music",
    "art",
)


def sign_line(rng: random.Random) -> str:
    """A line of a sign: a stock one, or 1-3 words (and maybe a number) in upper, title or lower case."""
    if rng.random() < 0.4:
        return rng.choice(SIGN_LINES_EN)
    words = rng.sample(SIGN_WORDS, rng.randint(1, 3))
    if rng.random() < 0.3:
        words.insert(rng.randint(0, len(words)), str(rng.choice((rng.randint(1, 99), rng.randint(100, 9999)))))
    case = rng.choice((str.upper, str.title, str.capitalize))
    return case(" ".join(words))


LATIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"


@lru_cache(maxsize=32)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    for folder in ("/usr/share/fonts/truetype/dejavu", _matplotlib_fonts()):
        path = Path(folder) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _matplotlib_fonts() -> str:
    try:
        import matplotlib

        return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        return "."


@lru_cache(maxsize=8)
def _cjk_font(size: int) -> ImageFont.FreeTypeFont | None:
    return ImageFont.truetype(CJK_FONT, size) if Path(CJK_FONT).is_file() else None


def sign_image(rng: random.Random) -> tuple[PILImage.Image, list[TextLine]]:
    """A sign: 1-3 lines of text on a plain background; (image, the lines with their boxes)."""
    width, height = rng.choice(((320, 200), (400, 240), (300, 300), (480, 200)))
    background = (
        tuple(rng.randint(150, 255) for _ in range(3))
        if rng.random() < 0.6
        else (tuple(rng.randint(0, 90) for _ in range(3)))
    )
    ink = tuple(255 - c for c in background)
    image = PILImage.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    chinese = rng.random() < 0.15 and _cjk_font(20) is not None
    count = 1 if chinese else rng.choice((1, 1, 2, 2, 3))
    texts = rng.sample(SIGN_LINES_ZH, count) if chinese else [sign_line(rng) for _ in range(count)]
    size = rng.randint(22, 40) if count > 1 else rng.randint(28, 52)
    face = rng.choice(LATIN_FONTS)
    font = _cjk_font(size) if chinese else _font(face, size)
    while size > 12 and max(draw.textbbox((0, 0), t, font=font)[2] for t in texts) > width - 16:  # fit the width
        size -= 2
        font = _cjk_font(size) if chinese else _font(face, size)
    lines, y = [], rng.randint(10, max(10, height - count * (size + 12) - 10))
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = rng.randint(8, max(8, width - (right - left) - 8))
        draw.text((x - left, y - top), text, fill=ink, font=font)
        box = [
            round(x / width, 4),
            round(y / height, 4),
            round(min(width, x + right - left) / width, 4),
            round(min(height, y + bottom - top) / height, 4),
        ]
        lines.append(TextLine(text, box, round(rng.uniform(0.86, 0.999), 3)))
        y += bottom - top + rng.randint(8, 16)
    return image, lines


class _StandInReader:
    """TextReader's interface returning the lines drawn (read_text_tool's `reader`)."""

    config = OcrConfig()

    def __init__(self, lines: list[TextLine]) -> None:
        self.lines = lines

    def read(self, image: PILImage.Image, box: list[float] | None = None) -> list[TextLine]:
        return self.lines


def read_text_sample(seed: int) -> Sample:
    rng = random.Random(f"tools:read_text:{seed}")
    if rng.random() < 0.05:  # nothing to read
        image, lines = photo_like_image(rng, seed), []
    else:
        image, lines = sign_image(rng)
    zh = rng.random() < ZH_SHARE
    question = rng.choice(TEXT_QUESTIONS_ZH if zh else TEXT_QUESTIONS_EN)
    arguments = {"image": IMAGE_NAME}
    observation = _observe(read_text_tool(reader=_StandInReader(lines)), image, arguments)  # type: ignore[arg-type]
    text = "\n".join(line.text for line in lines)
    if not lines:
        answer = "图中没有找到文字。" if zh else "I could not find any text in this image."
    elif zh:
        answer = f"图中的文字是：{text}"
    else:
        answer = f"It says: {text}" if len(lines) == 1 else f"It says:\n{text}"
    user, _ = _image_question(image, question)
    tools = offered_tools(rng, "read_text", maybe_user_functions(rng))
    meta = {"kind": "read_text", "lang": "zh" if zh else "en", "answer": text}
    call = _call(seed, "read_text", arguments)
    return Sample(
        [user, *_tool_turns(call, observation.content, answer)], [image], f"tools:read_text:{seed}", meta, tools
    )


# --- python ----------------------------------------------------------------------------------------

# (code operator, English words, Chinese words, symbol in the answer)
OPERATIONS = (
    ("+", ("plus", "added to"), "加", "+"),
    ("-", ("minus",), "减", "-"),
    ("*", ("times", "multiplied by"), "乘以", "×"),
    ("/", ("divided by",), "除以", "÷"),
)
PYTHON_QUESTIONS_EN = (
    "What is {a} {w} {b}?",
    "Compute {a} {s} {b}.",
    "Calculate {a} {w} {b}.",
    "What's {a} {s} {b}?",
    "How much is {a} {w} {b}?",
    "Please work out {a} {s} {b}.",
)
PYTHON_QUESTIONS_ZH = ("{a}{w}{b}等于多少？", "计算{a}{s}{b}。", "{a}{w}{b}是多少？")


def python_sample(seed: int) -> Sample:
    rng = random.Random(f"tools:python:{seed}")
    op, words, zh_word, symbol = rng.choice(OPERATIONS)
    digits = rng.choice((2, 2, 3, 3, 4))
    a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(2, 10 ** rng.choice((2, 3, 4)) - 1)
    if op == "/" and rng.random() < 0.6:
        a = b * rng.randint(2, 999)  # a whole quotient most of the time
    zh = rng.random() < ZH_SHARE
    shown = {"*": "*", "/": "/"}.get(op, op)
    if zh:
        question = rng.choice(PYTHON_QUESTIONS_ZH).format(a=a, b=b, w=zh_word, s=shown)
    else:
        question = rng.choice(PYTHON_QUESTIONS_EN).format(a=a, b=b, w=rng.choice(words), s=shown)
    code = f"print({a} {op} {b})"
    printed = printed_value(a, op, b)
    observation = _to_text(
        {"stdout": printed + "\n", "result": None}
    )  # the python tool's report, as the executor writes it
    answer = f"{a} {symbol} {b} = {printed}" + ("。" if zh else ".")
    call = _call(seed, "python", {"code": code})
    tools = offered_tools(rng, "python", maybe_user_functions(rng))
    meta = {"kind": "python", "lang": "zh" if zh else "en", "answer": printed, "code": code}
    user = Message.text_message("user", question)
    return Sample([user, *_tool_turns(call, observation, answer)], [], f"tools:python:{seed}", meta, tools)


def printed_value(a: int, op: str, b: int) -> str:
    """What `print(a op b)` prints (Python's own str of the value)."""
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
    if isinstance(value, float) and not math.isfinite(value):
        raise VlchatError(f"{a} {op} {b} is not finite")
    return str(value)


# --- user-defined functions ------------------------------------------------------------------------

NO_FIT_REPLIES_EN = (
    "Sorry, none of the available functions can do that.",
    "I can't help with that using the functions I have.",
    "None of my tools can do that, sorry.",
)
NO_FIT_REPLIES_ZH = ("抱歉，现有的函数都做不到这一点。", "对不起，我没有能完成这个请求的工具。")


def functions_sample(seed: int) -> Sample:
    """A request for one offered user function -> its call; 20%: a request none of them fits -> a short reply."""
    rng = random.Random(f"tools:functions:{seed}")
    families = rng.sample(FAMILIES, rng.randint(2, 4))
    zh = rng.random() < ZH_SHARE
    fits = rng.random() >= 0.2
    asked = families[0] if fits else rng.choice([f for f in FAMILIES if f not in families])
    arguments, request = asked.make(rng, "zh" if zh else "en")
    offered = [f.spec for f in families]
    builtins = offered_tools(rng, None) if rng.random() < 0.3 else ()
    tools = tuple(rng.sample(offered, len(offered))) + builtins if rng.random() < 0.7 else builtins + tuple(offered)
    user = Message.text_message("user", request)
    if fits:
        answer = Message("assistant", [Text("")], tool_calls=(_call(seed, asked.spec.name, arguments),))
    else:
        answer = Message.text_message("assistant", rng.choice(NO_FIT_REPLIES_ZH if zh else NO_FIT_REPLIES_EN))
    meta = {
        "kind": "functions",
        "lang": "zh" if zh else "en",
        "function": asked.spec.name if fits else None,
        "arguments": arguments if fits else None,
    }
    return Sample([user, answer], [], f"tools:functions:{seed}", meta, tools)


# --- replay: synthetic scenes and general prompts --------------------------------------------------


def qa_sample(seed: int, lang: str = "en") -> Sample:
    """A synthetic shape-scene question answered directly (train/synth.py's answer) with tools offered."""
    from vlchat.train import synth

    sample = synth.qa_sample(seed, lang, 1, explain_yes_no=lang == "en")  # as stage2-reasons trained it
    rng = random.Random(f"tools:qa:{seed}")
    user = sample.messages[0]
    parts = [p if isinstance(p, Image) else Text(p.text + images_suffix([IMAGE_NAME])) for p in user.parts]
    messages = [Message("user", parts), *sample.messages[1:]]
    tools = offered_tools(rng, None, maybe_user_functions(rng))
    return Sample(messages, sample.images, f"tools:qa:{seed}", {**sample.meta, "kind": "qa"}, tools)


def general_sample(index: int, replies: Sequence[dict]) -> Sample:
    """A text-only prompt with tools offered, answered with the base LM's reply (cut to whole sentences)."""
    row = replies[index % len(replies)]
    rng = random.Random(f"tools:general:{index}")
    tools = offered_tools(rng, None, maybe_user_functions(rng, 0.3))
    messages = [Message.text_message("user", row["prompt"]), Message.text_message("assistant", row["reply"])]
    return Sample(messages, [], f"tools:general:{index}", {"kind": "general"}, tools)


def usable_replies(rows: Sequence[dict]) -> list[dict]:
    """Replies that ended on their own, or cut to their last whole sentence when they hit the token cap."""
    out = []
    for row in rows:
        reply = row["reply"].strip()
        if row.get("finish_reason") == "length":
            end = max(reply.rfind(mark) for mark in (".", "!", "?", "。", "！", "？", "\n"))
            reply = reply[: end + 1].strip() if end > len(reply) // 3 else ""
        if reply:
            out.append({**row, "reply": reply})
    return out


# --- the source -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSource:
    kind: str
    samples: int
    seed_offset: int = 0
    lang: str = "en"  # qa only: en | zh | both


class ToolSamples(Sequence):
    """Samples of one "tools:KIND" source by index (made on demand, deterministic)."""

    def __init__(self, source: ToolSource) -> None:
        if source.kind not in KINDS:
            raise VlchatError(f"unknown tool-use data 'tools:{source.kind}'; use tools:{', tools:'.join(KINDS)}")
        self.source = source
        self.replies = usable_replies(_committed_replies()) if source.kind == "general" else []

    def __len__(self) -> int:
        return self.source.samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        seed = self.source.seed_offset + index
        kind = self.source.kind
        if kind == "general":
            return general_sample(seed, self.replies)
        if kind == "qa":
            lang = self.source.lang if self.source.lang != "both" else ("en", "zh")[seed % 2]
            return qa_sample(seed, lang)
        return {
            "labels": labels_sample,
            "read_text": read_text_sample,
            "python": python_sample,
            "functions": functions_sample,
        }[kind](seed)


def _committed_replies() -> list[dict]:
    from vlchat.train.base_replies import read_replies

    return read_replies()
