"""Synthetic scenes: coloured shapes (and sometimes a word) with exact captions and QA pairs.

A scene is a pure function of its seed, so a seed range is a dataset that needs no files, and
the answers are known exactly, so evaluation can use exact match. The layout follows the vision
grid: 224 px -> 7x7 features, and each object sits in one cell of a 3x3 layout (left = middle
row, left cell; top = top row, middle cell; ...) at 1/8 or 1/4 of the side, about one or two
32-px feature cells across.

The scene model and seeds are in synth_scene.py, the caption and questions in
synth_questions.py; this module renders scenes and makes training samples, and re-exports both
as the one `synth` namespace the rest of vlchat uses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.images import image_key
from vlchat.train.samples import Sample
from vlchat.train.synth_phrases import INSTRUCTIONS
from vlchat.train.synth_questions import (  # noqa: F401  (re-exported: synth.questions, ...)
    ALWAYS_ASKABLE,
    ANSWERS,
    FOCUS_QTYPES,
    HELD_OUT_ASK_EXPLAINED,
    QTYPES,
    TRAIN_ASK,
    TRAIN_ASK_EXPLAINED,
    caption,
    check_qtypes,
    questions,
    shape_reason,
)
from vlchat.train.synth_scene import (  # noqa: F401
    COLOURS,
    HELD_OUT_SEEDS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_SEEDS,
    WORD_RATE,
    WORDS,
    Scene,
    SceneObject,
    make_scene,
)

_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "centre": (1, 1)}  # (col, row)
_SCALE = {"small": 1 / 8, "large": 1 / 4}  # bounding-box side / image side
_JITTER = 1 / 40  # max centre offset / image side; large + 2 jitter stays inside a 1/3 cell


# --- rendering -------------------------------------------------------------------------------


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        (
            (1 if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
            -(1 if i % 2 == 0 else inner) * math.cos(math.pi * i / points),
        )
        for i in range(2 * points)
    ]


def _heart(n: int = 40) -> list[tuple[float, float]]:
    # The classic parametric heart curve, flipped to y-down and stretched to fill [-1, 1]^2.
    ts = [2 * math.pi * i / n for i in range(n)]
    pts = [
        (math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
        for t in ts
    ]
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    return [(x, 2 * (y - lo) / (hi - lo) - 1) for x, y in pts]


_A = 1 / 3  # half-width of a cross arm
_POLYGONS: dict[str, list[tuple[float, float]]] = {  # unit shapes in [-1, 1]^2, y down
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _star(),
    "heart": _heart(),
    "cross": [
        (-_A, -1),
        (_A, -1),
        (_A, -_A),
        (1, -_A),
        (1, _A),
        (_A, _A),
        (_A, 1),
        (-_A, 1),
        (-_A, _A),
        (-1, _A),
        (-1, -_A),
        (-_A, -_A),
    ],
    "diamond": [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)],  # narrower than a rotated square
}


def cell_centre(position: str, side: int) -> tuple[float, float]:
    """(x, y) in px of the centre of a position's cell in a side x side image; an object drawn
    there is centred within `_JITTER * side` of it."""
    col, row = _CELLS[position]
    return (col + 0.5) * side / 3, (row + 0.5) * side / 3


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, rng: random.Random) -> None:
    jitter = _JITTER * side
    cx, cy = cell_centre(obj.position, side)
    cx += rng.uniform(-jitter, jitter)
    cy += rng.uniform(-jitter, jitter)
    half = _SCALE[obj.size] * side / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        draw.polygon([(cx + x * half, cy + y * half) for x, y in _POLYGONS[obj.shape]], fill=fill)


def _background(colour: str, side: int, rng: random.Random) -> PILImage.Image:
    """Plain half the time, else light grey noise or a soft gradient of the same colour."""
    base = np.array(COLOURS[colour], dtype=np.int16)
    style = rng.choice(("plain", "plain", "noise", "gradient"))
    if style == "plain":
        return PILImage.new("RGB", (side, side), COLOURS[colour])
    if style == "noise":
        noise = np.random.default_rng(rng.getrandbits(64)).integers(-12, 13, (side, side, 1), dtype=np.int16)
    else:
        ramp = np.linspace(-25, 25, side, dtype=np.float32).astype(np.int16)
        noise = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return PILImage.fromarray(np.broadcast_to(pixels, (side, side, 3)).copy(), "RGB")


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow >= 10.1 bundles a scalable default font (Aileron), so no font file is shipped.
    return ImageFont.load_default(size=px)


def _draw_word(draw: ImageDraw.ImageDraw, scene: Scene, side: int, rng: random.Random) -> None:
    """The word in bold capitals, centred in the top band if no object is at the top, else the bottom."""
    row = 0 if "top" not in {o.position for o in scene.objects} else 2
    r, g, b = COLOURS[scene.background]
    ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
    stroke = max(1, side // 112)  # the default font is regular weight; a same-colour stroke makes it bold
    jitter = _JITTER * side
    cx = side / 2 + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * side / 3 + rng.uniform(-jitter / 2, jitter / 2)
    draw.text(
        (cx, cy),
        scene.word,
        font=_font(round(0.16 * side)),
        fill=ink,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=ink,
    )


def render(scene: Scene, size: int = 224) -> PILImage.Image:
    """The scene as a size x size RGB image; jitter and background style follow `scene.seed`."""
    rng = random.Random(f"{scene.seed}:render")  # a stream apart from make_scene's
    image = _background(scene.background, size, rng)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, size, rng)
    if scene.word:
        _draw_word(draw, scene, size, rng)
    return image


# --- samples -----------------------------------------------------------------------------------


def _check_lang(lang: str) -> None:
    if lang not in ("en", "zh"):
        raise VlchatError(f"unknown language {lang!r}; expected en or zh")


def _image_sample(seed: int, max_objects: int) -> tuple[Scene, PILImage.Image, Image]:
    scene = make_scene(seed, max_objects)
    image = render(scene)
    return scene, image, Image(key=image_key(image))


def caption_sample(seed: int, lang: str = "en", max_objects: int = MAX_OBJECTS) -> Sample:
    """Stage 1: an instruction with the image, answered by the scene's caption."""
    _check_lang(lang)
    scene, image, part = _image_sample(seed, max_objects)
    instruction = random.Random(f"{seed}:instruction").choice(INSTRUCTIONS[lang])
    messages = [Message("user", [part, Text(instruction)]), Message.text_message("assistant", caption(scene, lang))]
    return Sample(messages, [image], source=f"synth:{seed}", meta={"lang": lang, "scene": scene})


def qa_sample(
    seed: int,
    lang: str = "en",
    turns: int = 1,
    explain_yes_no: bool = False,
    qtypes: tuple[str, ...] = QTYPES,
    max_objects: int = MAX_OBJECTS,
) -> Sample:
    """Stage 2: `turns` question-answer pairs about one image (the image comes with the first),
    of the types `qtypes` (each once, then the hardest of them again). `explain_yes_no`
    (English): "is there a ...?" is answered with its reason first. `max_objects`: scenes hold
    1 to that many objects (make_scene)."""
    _check_lang(lang)
    check_qtypes(qtypes)
    if turns < 1:
        raise VlchatError(f"turns must be at least 1, got {turns}")
    if explain_yes_no and lang != "en":
        raise VlchatError(f"explain_yes_no is for English questions only, not lang {lang!r}")
    scene, image, part = _image_sample(seed, max_objects)
    rng = random.Random(f"{seed}:qa:{lang}")
    askers = TRAIN_ASK_EXPLAINED if explain_yes_no else TRAIN_ASK
    asked = questions(scene, rng, lang, qtypes, askers)
    again = tuple(q for q in FOCUS_QTYPES if q in qtypes)
    if not any(q in ALWAYS_ASKABLE for q in again):  # so that every round asks something
        again += tuple(q for q in qtypes if q in ALWAYS_ASKABLE)
    while len(asked) < turns:  # more turns than qtypes: other targets and phrasings
        asked += questions(scene, rng, lang, again, askers)
    messages = []
    for i, (question, answer, _) in enumerate(asked[:turns]):
        messages.append(Message("user", ([part] if i == 0 else []) + [Text(question)]))
        messages.append(Message.text_message("assistant", answer))
    meta = {
        "lang": lang,
        "qtypes": [q[2] for q in asked[:turns]],
        "answers": [q[1] for q in asked[:turns]],
        "scene": scene,
    }
    return Sample(messages, [image], source=f"synth:{seed}", meta=meta)


def synthetic_dataset(
    kind: Literal["caption", "qa"], seeds: range, lang: str = "en", turns: int = 1
) -> Iterator[Sample]:
    """Samples for `seeds`; lang "both" gives English for even seeds and Chinese for odd ones."""
    if kind not in ("caption", "qa"):
        raise VlchatError(f"unknown synthetic dataset kind {kind!r}; expected caption or qa")
    if lang != "both":
        _check_lang(lang)
    for seed in seeds:
        seed_lang = ("en" if seed % 2 == 0 else "zh") if lang == "both" else lang
        yield caption_sample(seed, seed_lang) if kind == "caption" else qa_sample(seed, seed_lang, turns)
