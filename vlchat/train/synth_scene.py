"""Synthetic scenes as data: the vocabulary, and a scene as a pure function of its seed.

Seeds: TRAIN_SEEDS and HELD_OUT_SEEDS never overlap, so no held-out image is ever rendered in
training. Small scenes can still coincide in *content* (one red circle on the left on white
exists in both ranges); the held-out set measures new renders (jitter, background noise), and
new compositions only for the larger scenes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlchat.errors import VlchatError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 10),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
WORDS = ("CAT", "DOG", "SUN", "BOX", "TREE", "STOP", "HELLO", "MOON", "FISH", "BIRD", "CAKE", "RAIN")
TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(10_000_000, 10_100_000)  # disjoint from TRAIN_SEEDS (tested)

WORD_RATE = 0.3  # share of scenes with a printed word


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, vocab in (
            (self.shape, SHAPES),
            (self.colour, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
        ):
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


MAX_OBJECTS = 4


def make_scene(seed: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """1-`max_objects` objects at distinct positions; ~30% of scenes also print a word in a free
    band. The default draws exactly as before the limit existed, so seeds keep their scenes."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise VlchatError(f"max_objects must be 1 to {MAX_OBJECTS}, got {max_objects}")
    rng = random.Random(seed)  # never the global RNG: a seed is the whole scene
    background = rng.choice(list(COLOURS))
    word = rng.choice(WORDS) if rng.random() < WORD_RATE else None
    band = rng.choice(("top", "bottom")) if word else None  # kept free for the word
    free = [p for p in POSITIONS if p != band]
    positions = rng.sample(free, rng.randint(1, max_objects))
    colours = [c for c in COLOURS if c != background]
    objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), p) for p in positions)
    return Scene(objects, background, word, seed)
