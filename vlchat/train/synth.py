"""Synthetic scenes: coloured shapes (and sometimes a word) with exact captions and QA pairs.

A scene is a pure function of its seed, so a seed range is a dataset that needs no files, and
the answers are known exactly, so evaluation can use exact match. The layout follows the vision
grid: 224 px -> 7x7 features, and each object sits in one cell of a 3x3 layout (left = middle
row, left cell; top = top row, middle cell; ...) at 1/8 or 1/4 of the side, about one or two
32-px feature cells across.

Seeds: TRAIN_SEEDS and HELD_OUT_SEEDS never overlap, so no held-out image is ever rendered in
training. Small scenes can still coincide in *content* (one red circle on the left on white
exists in both ranges); the held-out set measures new renders (jitter, background noise), and
new compositions only for the larger scenes.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image as PILImage, ImageDraw, ImageFont

from vlchat.chat.messages import Image, Message, Text
from vlchat.errors import VlchatError
from vlchat.images import image_key
from vlchat.train.data import Sample
from vlchat.train.synth_phrases import EN_WHERE as _EN_WHERE, INSTRUCTIONS, PHRASES as _PHRASES, ZH as _ZH

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 215, 20),
    "purple": (130, 40, 170), "orange": (245, 130, 10), "black": (15, 15, 15), "white": (250, 250, 250),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
WORDS = ("CAT", "DOG", "SUN", "BOX", "TREE", "STOP", "HELLO", "MOON", "FISH", "BIRD", "CAKE", "RAIN")
QTYPES = ("colour", "shape", "count", "position", "exists", "word", "size")
TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(10_000_000, 10_100_000)  # disjoint from TRAIN_SEEDS (tested)

WORD_RATE = 0.3  # share of scenes with a printed word
_CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "centre": (1, 1)}  # (col, row)
_SCALE = {"small": 1 / 8, "large": 1 / 4}  # bounding-box side / image side
_JITTER = 1 / 40  # max centre offset / image side; large + 2 jitter stays inside a 1/3 cell


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, vocab in ((self.shape, SHAPES), (self.colour, COLOURS), (self.size, SIZES),
                             (self.position, POSITIONS)):
            if value not in vocab:
                raise VlchatError(f"unknown scene value {value!r}; expected one of {', '.join(vocab)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str  # a COLOURS name; the render style (plain/noise/gradient) follows the seed
    word: str | None
    seed: int

    def __post_init__(self) -> None:
        positions = [o.position for o in self.objects]
        if not positions:
            raise VlchatError("a scene needs at least one object")
        if len(set(positions)) != len(positions):
            raise VlchatError(f"scene objects share a position: {positions}")
        if self.background not in COLOURS or any(o.colour == self.background for o in self.objects):
            raise VlchatError(f"background {self.background!r} must be a colour no object has")
        if self.word and {"top", "bottom"} <= set(positions):
            raise VlchatError("a scene with a word needs the top or the bottom position free")


def make_scene(seed: int) -> Scene:
    """1-4 objects at distinct positions; ~30% of scenes also print a word in a free band."""
    rng = random.Random(seed)  # never the global RNG: a seed is the whole scene
    background = rng.choice(list(COLOURS))
    word = rng.choice(WORDS) if rng.random() < WORD_RATE else None
    band = rng.choice(("top", "bottom")) if word else None  # kept free for the word
    free = [p for p in POSITIONS if p != band]
    positions = rng.sample(free, rng.randint(1, 4))
    colours = [c for c in COLOURS if c != background]
    objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), p)
                    for p in positions)
    return Scene(objects, background, word, seed)


# --- rendering -------------------------------------------------------------------------------

def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1 if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             -(1 if i % 2 == 0 else inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def _heart(n: int = 40) -> list[tuple[float, float]]:
    # The classic parametric heart curve, flipped to y-down and stretched to fill [-1, 1]^2.
    ts = [2 * math.pi * i / n for i in range(n)]
    pts = [(math.sin(t) ** 3,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))) for t in ts]
    lo, hi = min(y for _, y in pts), max(y for _, y in pts)
    return [(x, 2 * (y - lo) / (hi - lo) - 1) for x, y in pts]


_A = 1 / 3  # half-width of a cross arm
_POLYGONS: dict[str, list[tuple[float, float]]] = {  # unit shapes in [-1, 1]^2, y down
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _star(),
    "heart": _heart(),
    "cross": [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1),
              (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)],
    "diamond": [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)],  # narrower than a rotated square
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, rng: random.Random) -> None:
    col, row = _CELLS[obj.position]
    jitter = _JITTER * side
    cx = (col + 0.5) * side / 3 + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * side / 3 + rng.uniform(-jitter, jitter)
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
    draw.text((cx, cy), scene.word, font=_font(round(0.16 * side)), fill=ink, anchor="mm",
              stroke_width=stroke, stroke_fill=ink)


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


# --- language ----------------------------------------------------------------------------------

def _articles(text: str) -> str:
    """English "a" before a vowel becomes "an" ("an orange star")."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def caption(scene: Scene, lang: str = "en") -> str:
    """A detailed description naming every object, the background and the word, if any."""
    if lang == "zh":
        parts = [f"{_ZH[o.position]}有一个{_ZH[o.size]}的{_ZH[o.colour]}{_ZH[o.shape]}" for o in scene.objects]
        text = "图中" + "，".join(parts) + f"，背景是{_ZH[scene.background]}。"
        return text + (f"图中写着单词“{scene.word}”。" if scene.word else "")
    parts = [f"a {o.size} {o.colour} {o.shape} {_EN_WHERE[o.position]}" for o in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = _articles(listed[0].upper() + listed[1:] + f", on a {scene.background} background.")
    return text + (f' The word "{scene.word}" is written in the image.' if scene.word else "")


def _unique(scene: Scene, key: Callable[[SceneObject], object]) -> list[SceneObject]:
    """Objects whose `key` no other object shares: the only ones a question may name by it."""
    keys = [key(o) for o in scene.objects]
    return [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]


# An asker picks a target and returns (template fields, answer) as English vocabulary keys, or
# None when the qtype does not apply; `questions` translates both.
Asked = tuple[dict[str, str], str]


def _ask_about_shape(attr: str) -> Callable[[Scene, random.Random], Asked | None]:
    """Colour or size of a shape named by its kind, so only shapes that appear once."""
    def ask(scene: Scene, rng: random.Random) -> Asked | None:
        objs = _unique(scene, lambda o: o.shape)
        return ({"shape": (o := rng.choice(objs)).shape}, getattr(o, attr)) if objs else None
    return ask


def _ask_shape(scene: Scene, rng: random.Random) -> Asked:
    o = rng.choice(scene.objects)  # positions are distinct, so a position names one object
    return {"where": o.position}, o.shape


def _ask_position(scene: Scene, rng: random.Random) -> Asked | None:
    objs = _unique(scene, lambda o: (o.colour, o.shape))
    return ({"colour": (o := rng.choice(objs)).colour, "shape": o.shape}, o.position) if objs else None


def _ask_exists(scene: Scene, rng: random.Random) -> Asked:
    """Yes or no with probability 1/2 each; absent pairs avoid the background colour."""
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice([(c, s) for c in COLOURS if c != scene.background for s in SHAPES
                                    if (c, s) not in present])
    return {"colour": colour, "shape": shape}, "yes" if (colour, shape) in present else "no"


def _ask_exists_binding(scene: Scene, rng: random.Random) -> Asked:
    """Training's "is there a ...?": yes half the time as in `_ask_exists`; a third of the "no"
    questions pair one object's colour with another object's shape (a red circle and a blue star:
    "a red star?"), which only binding each colour to its shape can answer, and a third name a
    shape that is there in a colour it does not have ("a green circle?"), which only its colour
    answers: the held-out misses of the v4 model were mostly such questions answered "yes"."""
    present = {(o.colour, o.shape) for o in scene.objects}
    swapped = sorted({(a.colour, b.shape) for a in scene.objects for b in scene.objects} - present)
    recoloured = sorted({(c, o.shape) for o in scene.objects for c in COLOURS if c != scene.background}
                        - present)
    kind = rng.random()
    if kind < 0.5:
        colour, shape = rng.choice(sorted(present))
    elif swapped and kind < 0.5 + 1 / 6:
        colour, shape = rng.choice(swapped)
    elif recoloured and kind < 0.5 + 2 / 6:
        colour, shape = rng.choice(recoloured)
    else:
        return _ask_exists_absent(scene, rng, present)
    return {"colour": colour, "shape": shape}, "yes" if (colour, shape) in present else "no"


def _ask_exists_absent(scene: Scene, rng: random.Random, present: set[tuple[str, str]]) -> Asked:
    colour, shape = rng.choice([(c, s) for c in COLOURS if c != scene.background for s in SHAPES
                                if (c, s) not in present])
    return {"colour": colour, "shape": shape}, "no"


Asker = Callable[[Scene, random.Random], Asked | None]
_ASK: dict[str, Asker] = {
    "colour": _ask_about_shape("colour"), "shape": _ask_shape,
    "count": lambda scene, rng: ({}, str(len(scene.objects))), "position": _ask_position,
    "exists": _ask_exists, "word": lambda scene, rng: ({}, scene.word) if scene.word else None,
    "size": _ask_about_shape("size"),
}
# Training asks "is there ...?" with binding negatives; evaluation keeps `_ASK`, so held-out
# questions are the same as before this change.
_TRAIN_ASK: dict[str, Asker] = {**_ASK, "exists": _ask_exists_binding}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def shape_reason(scene: Scene, shape: str) -> str:
    """What the image shows of `shape`: "The star is red", "The circles are red and blue",
    "There is no heart" (English; the reason an explained yes/no answer gives first)."""
    named = [o.colour for o in scene.objects if o.shape == shape]
    if not named:
        return f"There is no {shape}"
    if len(named) == 1:
        return f"The {shape} is {named[0]}"
    colours = list(dict.fromkeys(named))  # two red circles: "The circles are red"
    listed = colours[0] if len(colours) == 1 else ", ".join(colours[:-1]) + " and " + colours[-1]
    return f"The {_plural(shape)} are {listed}"


def _explained(ask: Asker) -> Asker:
    """An "is there a {colour} {shape}?" asker whose answer gives the reason first: "The star is
    red, so no." The LM then compares the question's colour with one it has just generated,
    as easy-VQA's explain_yes_no does (README, evaluation); English only."""
    def explained(scene: Scene, rng: random.Random) -> Asked:
        fields, verdict = ask(scene, rng)
        return fields, f"{shape_reason(scene, fields['shape'])}, so {verdict}."
    return explained


_TRAIN_ASK_EXPLAINED: dict[str, Asker] = {**_TRAIN_ASK, "exists": _explained(_ask_exists_binding)}
# The types a training sample asks again once every type has been asked (the hardest ones).
FOCUS_QTYPES = ("colour", "position", "exists")
ALWAYS_ASKABLE = ("shape", "count", "exists")  # every scene answers these (others may not apply)


def _say(key: str, field: str, lang: str) -> str:
    """A vocabulary key in `lang`; counts and printed words stay as they are."""
    if lang == "zh":
        return _ZH.get(key, key)
    return _EN_WHERE[key] if field == "where" else key


def questions(scene: Scene, rng: random.Random, lang: str = "en", qtypes: tuple[str, ...] = QTYPES,
              askers: dict[str, Asker] = _ASK) -> list[tuple[str, str, str]]:
    """One (question, answer, qtype) per qtype that applies to the scene, in a shuffled order."""
    out = []
    for qtype in qtypes:
        asked = askers[qtype](scene, rng)
        if asked:
            fields = {k: _say(v, k, lang) for k, v in asked[0].items()}
            question = rng.choice(_PHRASES[lang][qtype]).format(**fields)
            question = _articles(question) if lang == "en" else question
            out.append((question, _say(asked[1], "answer", lang), qtype))
    rng.shuffle(out)
    return out


def _vocab(lang: str) -> dict[str, frozenset[str]]:
    def names(values) -> frozenset[str]:
        return frozenset(_say(v, "answer", lang) for v in values)
    return {"colour": names(COLOURS), "shape": names(SHAPES), "count": frozenset("1234"),
            "position": names(POSITIONS), "exists": names(("yes", "no")), "word": frozenset(WORDS),
            "size": names(SIZES)}


ANSWERS: dict[str, dict[str, frozenset[str]]] = {lang: _vocab(lang) for lang in ("en", "zh")}


# --- samples -----------------------------------------------------------------------------------


def check_qtypes(qtypes: tuple[str, ...]) -> None:
    """Known question types, at least one of which every scene can answer."""
    unknown = [q for q in qtypes if q not in QTYPES]
    if unknown:
        raise VlchatError(f"unknown question types {unknown}; expected some of {', '.join(QTYPES)}")
    if not any(q in ALWAYS_ASKABLE for q in qtypes):
        raise VlchatError(f"qtypes {list(qtypes)} must include one of {', '.join(ALWAYS_ASKABLE)}, "
                          "which every scene can answer")


def _check_lang(lang: str) -> None:
    if lang not in ("en", "zh"):
        raise VlchatError(f"unknown language {lang!r}; expected en or zh")


def _image_sample(seed: int) -> tuple[Scene, PILImage.Image, Image]:
    scene = make_scene(seed)
    image = render(scene)
    return scene, image, Image(key=image_key(image))


def caption_sample(seed: int, lang: str = "en") -> Sample:
    """Stage 1: an instruction with the image, answered by the scene's caption."""
    _check_lang(lang)
    scene, image, part = _image_sample(seed)
    instruction = random.Random(f"{seed}:instruction").choice(INSTRUCTIONS[lang])
    messages = [Message("user", [part, Text(instruction)]),
                Message.text_message("assistant", caption(scene, lang))]
    return Sample(messages, [image], source=f"synth:{seed}", meta={"lang": lang, "scene": scene})


def qa_sample(seed: int, lang: str = "en", turns: int = 1, explain_yes_no: bool = False,
              qtypes: tuple[str, ...] = QTYPES) -> Sample:
    """Stage 2: `turns` question-answer pairs about one image (the image comes with the first),
    of the types `qtypes` (each once, then the hardest of them again). `explain_yes_no`
    (English): "is there a ...?" is answered with its reason first."""
    _check_lang(lang)
    check_qtypes(qtypes)
    if turns < 1:
        raise VlchatError(f"turns must be at least 1, got {turns}")
    if explain_yes_no and lang != "en":
        raise VlchatError(f"explain_yes_no is for English questions only, not lang {lang!r}")
    scene, image, part = _image_sample(seed)
    rng = random.Random(f"{seed}:qa:{lang}")
    askers = _TRAIN_ASK_EXPLAINED if explain_yes_no else _TRAIN_ASK
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
    meta = {"lang": lang, "qtypes": [q[2] for q in asked[:turns]], "answers": [q[1] for q in asked[:turns]],
            "scene": scene}
    return Sample(messages, [image], source=f"synth:{seed}", meta=meta)


def synthetic_dataset(kind: Literal["caption", "qa"], seeds: range, lang: str = "en",
                      turns: int = 1) -> Iterator[Sample]:
    """Samples for `seeds`; lang "both" gives English for even seeds and Chinese for odd ones."""
    if kind not in ("caption", "qa"):
        raise VlchatError(f"unknown synthetic dataset kind {kind!r}; expected caption or qa")
    if lang != "both":
        _check_lang(lang)
    for seed in seeds:
        seed_lang = ("en" if seed % 2 == 0 else "zh") if lang == "both" else lang
        yield caption_sample(seed, seed_lang) if kind == "caption" else qa_sample(seed, seed_lang, turns)
