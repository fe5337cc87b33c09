"""What is said about a synthetic scene: its caption, and question-answer pairs by type (the
askers pick a target; `questions` phrases it in English or Chinese). Training and evaluation use
the same phrasing; training's "is there a ...?" askers add binding negatives and reasons.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from vlchat.errors import VlchatError
from vlchat.train.synth_phrases import EN_WHERE as _EN_WHERE
from vlchat.train.synth_phrases import PHRASES as _PHRASES
from vlchat.train.synth_phrases import ZH as _ZH
from vlchat.train.synth_scene import COLOURS, POSITIONS, SHAPES, SIZES, WORDS, Scene, SceneObject

QTYPES = ("colour", "shape", "count", "position", "exists", "word", "size")


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
        colour, shape = rng.choice(
            [(c, s) for c in COLOURS if c != scene.background for s in SHAPES if (c, s) not in present]
        )
    return {"colour": colour, "shape": shape}, "yes" if (colour, shape) in present else "no"


def _ask_exists_binding(scene: Scene, rng: random.Random) -> Asked:
    """Training's "is there a ...?": yes half the time as in `_ask_exists`; a third of the "no"
    questions pair one object's colour with another object's shape (a red circle and a blue star:
    "a red star?"), which only binding each colour to its shape can answer, and a third name a
    shape that is there in a colour it does not have ("a green circle?"), which only its colour
    answers: the held-out misses of the v4 model were mostly such questions answered "yes"."""
    present = {(o.colour, o.shape) for o in scene.objects}
    swapped = sorted({(a.colour, b.shape) for a in scene.objects for b in scene.objects} - present)
    recoloured = sorted({(c, o.shape) for o in scene.objects for c in COLOURS if c != scene.background} - present)
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
    colour, shape = rng.choice(
        [(c, s) for c in COLOURS if c != scene.background for s in SHAPES if (c, s) not in present]
    )
    return {"colour": colour, "shape": shape}, "no"


Asker = Callable[[Scene, random.Random], Asked | None]
_ASK: dict[str, Asker] = {
    "colour": _ask_about_shape("colour"),
    "shape": _ask_shape,
    "count": lambda scene, rng: ({}, str(len(scene.objects))),
    "position": _ask_position,
    "exists": _ask_exists,
    "word": lambda scene, rng: ({}, scene.word) if scene.word else None,
    "size": _ask_about_shape("size"),
}
# Training asks "is there ...?" with binding negatives; evaluation keeps `_ASK`, so held-out
# questions are the same as before this change.
TRAIN_ASK: dict[str, Asker] = {**_ASK, "exists": _ask_exists_binding}


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
    as easy-VQA's explain_yes_no does (docs/experiments.md); English only."""

    def explained(scene: Scene, rng: random.Random) -> Asked:
        fields, verdict = ask(scene, rng)
        return fields, f"{shape_reason(scene, fields['shape'])}, so {verdict}."

    return explained


TRAIN_ASK_EXPLAINED: dict[str, Asker] = {**TRAIN_ASK, "exists": _explained(_ask_exists_binding)}
# The held-out questions of `_ASK`, word for word, with "is there ...?" answered as a model trained
# with explain_yes_no answers it (the asker draws the same numbers): the training probe's targets.
HELD_OUT_ASK_EXPLAINED: dict[str, Asker] = {**_ASK, "exists": _explained(_ask_exists)}
# The types a training sample asks again once every type has been asked (the hardest ones).
FOCUS_QTYPES = ("colour", "position", "exists")
ALWAYS_ASKABLE = ("shape", "count", "exists")  # every scene answers these (others may not apply)


def _say(key: str, field: str, lang: str) -> str:
    """A vocabulary key in `lang`; counts and printed words stay as they are."""
    if lang == "zh":
        return _ZH.get(key, key)
    return _EN_WHERE[key] if field == "where" else key


def questions(
    scene: Scene,
    rng: random.Random,
    lang: str = "en",
    qtypes: tuple[str, ...] = QTYPES,
    askers: dict[str, Asker] = _ASK,
) -> list[tuple[str, str, str]]:
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

    return {
        "colour": names(COLOURS),
        "shape": names(SHAPES),
        "count": frozenset("1234"),
        "position": names(POSITIONS),
        "exists": names(("yes", "no")),
        "word": frozenset(WORDS),
        "size": names(SIZES),
    }


ANSWERS: dict[str, dict[str, frozenset[str]]] = {lang: _vocab(lang) for lang in ("en", "zh")}


def check_qtypes(qtypes: tuple[str, ...]) -> None:
    """Known question types, at least one of which every scene can answer."""
    unknown = [q for q in qtypes if q not in QTYPES]
    if unknown:
        raise VlchatError(f"unknown question types {unknown}; expected some of {', '.join(QTYPES)}")
    if not any(q in ALWAYS_ASKABLE for q in qtypes):
        raise VlchatError(
            f"qtypes {list(qtypes)} must include one of {', '.join(ALWAYS_ASKABLE)}, which every scene can answer"
        )
