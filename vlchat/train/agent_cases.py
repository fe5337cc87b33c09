"""The agent evaluation's cases (train/evaluate_agent.py runs and scores them).

- agent_photos: real photos that ship inside scikit-image (`skimage/data/*.png|jpg`) and scikit-learn
  (`sklearn/datasets/images/*.jpg`), read as files located with importlib.util.find_spec (nothing is
  imported; the `skimage.data` functions that download with pooch are never used), each in five
  variants (as is, centre crop, mirrored, JPEG quality 30, half size) with "What is the main object?".
  Without the packages, chelsea and coffee come from vlchat/examples (the same two photos).
- agent_signs: short English and Chinese texts (eval_data/signs.json) rendered as signs with the
  system's TrueType fonts other than DejaVu Sans (the font the training data uses).
- agent_math: integer arithmetic, English and Chinese phrasings, from a fixed seed.
- tool_selection: user-defined functions of families never used in training (eval_data/tool_selection.json).
- text_only: general prompts without an image (eval_data/text_prompts.json).
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

DATA = Path(__file__).resolve().parent / "eval_data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class Case:
    group: str  # e.g. "agent_photos/en", "tool_selection/zh"
    question: str
    expected: tuple[str, ...] = ()  # accepted answers: a reply containing any one is right
    image: Any = None  # PIL image or None
    meta: dict = field(default_factory=dict)  # what the report keeps beside the reply


# --- agent_photos ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    name: str
    package: str  # "skimage" | "sklearn"
    file: str  # inside the package
    accepted: tuple[str, ...]  # names of the main object (EN and ZH) a right answer contains
    imagenet: tuple[str, ...]  # ImageNet-1k labels that name it (empty: no class does)


PHOTOS = (
    Photo(
        "chelsea",
        "skimage",
        "data/chelsea.png",
        ("cat", "tabby", "kitten", "tiger cat", "猫"),
        ("tabby, tabby cat", "tiger cat", "Egyptian cat"),
    ),
    Photo(
        "coffee",
        "skimage",
        "data/coffee.png",
        ("coffee", "espresso", "cup", "mug", "咖啡", "杯"),
        ("espresso", "cup", "coffee mug"),
    ),
    Photo(
        "rocket",
        "skimage",
        "data/rocket.jpg",
        ("rocket", "missile", "spacecraft", "space shuttle", "火箭"),
        ("missile", "projectile, missile", "space shuttle"),
    ),
    Photo(
        "astronaut",
        "skimage",
        "data/astronaut.png",
        ("astronaut", "person", "woman", "man", "spacesuit", "宇航员", "航天员", "人"),
        (),
    ),
    Photo(
        "motorcycle",
        "skimage",
        "data/motorcycle_left.png",
        ("motorcycle", "motorbike", "moped", "scooter", "bike", "摩托"),
        ("moped", "motor scooter, scooter"),
    ),
    Photo(
        "china",
        "sklearn",
        "datasets/images/china.jpg",
        ("temple", "pagoda", "palace", "building", "roof", "寺", "庙", "宫", "建筑"),
        ("palace", "monastery"),
    ),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", ("flower", "blossom", "daisy", "dahlia", "花"), ()),
)
PHOTO_QUESTION = "What is the main object in this picture?"
PHOTO_QUESTIONS_ZH = ("这张图片里的主要物体是什么？", "图片中主要是什么东西？")
EXAMPLE_PHOTOS = {"chelsea": "chelsea.jpg", "coffee": "coffee.jpg"}  # shipped with vlchat


def package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def photo_file(photo: Photo) -> Path | None:
    found = package_file(photo.package, photo.file)
    if found is None and photo.name in EXAMPLE_PHOTOS:
        found = EXAMPLES / EXAMPLE_PHOTOS[photo.name]
    return found


def variants(image: Image.Image) -> dict[str, Image.Image]:
    """The photo as is and four changes a user's copy often has."""
    w, h = image.size
    small = image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=30)
    return {
        "original": image,
        "centre_crop": image.crop((w // 5, h // 5, w - w // 5, h - h // 5)),  # the middle 60%
        "flip": ImageOps.mirror(image),
        "jpeg30": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "half_size": small,
    }


def photo_cases() -> tuple[list[Case], list[str]]:
    """(cases, notes): every found photo in five variants (EN), and as is in Chinese."""
    cases, missing = [], []
    for index, photo in enumerate(PHOTOS):
        path = photo_file(photo)
        if path is None:
            missing.append(photo.name)
            continue
        image = Image.open(path).convert("RGB")
        meta = {"photo": photo.name, "imagenet_class": bool(photo.imagenet)}
        for variant, changed in variants(image).items():
            cases.append(Case("agent_photos/en", PHOTO_QUESTION, photo.accepted, changed, {**meta, "variant": variant}))
        zh = PHOTO_QUESTIONS_ZH[index % len(PHOTO_QUESTIONS_ZH)]
        cases.append(Case("agent_photos/zh", zh, photo.accepted, image, {**meta, "variant": "original"}))
    notes = [f"photos not found (install scikit-image / scikit-learn): {', '.join(missing)}"] if missing else []
    return cases, notes


# --- agent_signs -----------------------------------------------------------------------------------

SIGN_QUESTION = {"en": "What does the sign say?", "zh": "牌子上写的是什么？"}
SIGN_COLOURS = (
    ((200, 30, 30), (255, 255, 255)),
    ((20, 90, 170), (255, 255, 255)),
    ((250, 210, 40), (0, 0, 0)),
    ((30, 130, 60), (255, 255, 255)),
    ((245, 245, 240), (20, 20, 20)),
)  # (plate, letters)


@lru_cache(maxsize=1)
def system_fonts() -> tuple[tuple[str, str], ...]:
    """(file, languages "en|fr|...") of every font fontconfig knows; empty without fc-list."""
    try:
        listed = subprocess.run(
            ["fc-list", "--format", "%{file}\t%{lang}\n"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(sorted({tuple(line.split("\t", 1)) for line in listed.splitlines() if "\t" in line}))


def sign_fonts(lang: str) -> list[str]:
    """Upright font files that cover the language; fonts other than DejaVu (the training data renders
    with DejaVu Sans) when there are any, else DejaVu's others."""
    wanted = "zh-cn" if lang == "zh" else "en"
    upright = [
        file
        for file, langs in system_fonts()
        if wanted in langs.split("|")
        and file.endswith((".ttf", ".ttc", ".otf"))
        and not any(s in file for s in ("Italic", "Oblique", "Math"))
    ]
    others = [f for f in upright if "DejaVu" not in Path(f).name]
    return sorted(others or [f for f in upright if Path(f).name != "DejaVuSans.ttf"])


def render_sign(text: str, font_file: str, colours: tuple, size: int = 56) -> Image.Image:
    """The text centred on a plate with a border, on a grey wall: (width, 160) RGB."""
    font = ImageFont.truetype(font_file, size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    width = max(320, right - left + 80)
    image = Image.new("RGB", (width + 40, 200), (120, 120, 115))
    draw = ImageDraw.Draw(image)
    plate, letters = colours
    draw.rectangle((20, 20, width + 20, 180), fill=plate, outline=letters, width=5)
    x = 20 + (width - (right - left)) // 2 - left
    y = 100 - (bottom - top) // 2 - top
    draw.text((x, y), text, font=font, fill=letters)
    return image


def sign_cases() -> tuple[list[Case], list[str]]:
    texts = json.loads((DATA / "signs.json").read_text(encoding="utf-8"))
    cases, notes = [], []
    for lang in ("en", "zh"):
        fonts = sign_fonts(lang)
        if not fonts:
            notes.append(
                f"{lang} signs skipped: no font for them (fc-list; for Chinese: apt-get install fonts-wqy-zenhei)"
            )
            continue
        for i, text in enumerate(texts[lang]):
            font = fonts[i % len(fonts)]
            image = render_sign(text, font, SIGN_COLOURS[i % len(SIGN_COLOURS)])
            cases.append(Case(f"agent_signs/{lang}", SIGN_QUESTION[lang], (text,), image, {"font": Path(font).name}))
    return cases, notes


# --- agent_math ------------------------------------------------------------------------------------

MATH_EN = {
    "+": "What is {a} + {b}?",
    "-": "What is {a} - {b}?",
    "×": "What is {a} × {b}?",
    "÷": "What is {a} divided by {b}?",
}
MATH_ZH = {
    "+": "{a}加{b}等于多少？",
    "-": "{a}减{b}等于多少？",
    "×": "{a}乘以{b}等于多少？",
    "÷": "{a}除以{b}等于多少？",
}


def math_cases(count: int = 40, seed: int = 0) -> list[Case]:
    """Integer sums, differences, products and exact quotients; even places English, odd Chinese."""
    rng, cases = random.Random(seed), []
    for i in range(count):
        op = "+-×÷"[i % 4]
        if op == "÷":
            b, result = rng.randint(3, 30), rng.randint(4, 60)
            a = b * result
        else:
            a, b = rng.randint(12, 999), rng.randint(12, 999 if op != "×" else 99)
            result = {"+": a + b, "-": a - b, "×": a * b}[op]
        lang = "en" if i % 2 == 0 else "zh"
        question = (MATH_EN if lang == "en" else MATH_ZH)[op].format(a=a, b=b)
        cases.append(Case(f"agent_math/{lang}", question, (str(result),), None, {"op": op}))
    return cases


# --- tool_selection and text_only ------------------------------------------------------------------


def tool_selection_cases() -> tuple[list[Case], dict[str, dict]]:
    """(cases, functions by name); a case's meta: offered names, the expected call (or None), its arguments."""
    data = json.loads((DATA / "tool_selection.json").read_text(encoding="utf-8"))
    functions = {f["name"]: f for f in data["functions"]}
    cases = [
        Case(
            f"tool_selection/{r['lang']}",
            r["text"],
            (r["call"] or "",),
            None,
            {"offered": r["offered"], "call": r["call"], "arguments": r["arguments"]},
        )
        for r in data["requests"]
    ]
    return cases, functions


def text_cases() -> list[Case]:
    prompts = json.loads((DATA / "text_prompts.json").read_text(encoding="utf-8"))
    return [Case(f"text_only/{'zh' if any(ord(c) > 0x2E80 for c in p) else 'en'}", p) for p in prompts]


def spread(cases: list, limit: int | None) -> list:
    """At most `limit` cases, evenly spread (so a small limit still sees every kind)."""
    if not limit or limit >= len(cases):
        return cases
    step = len(cases) / limit
    return [cases[int(i * step)] for i in range(limit)]
