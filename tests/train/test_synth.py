"""The synthetic scene generator: determinism, coverage, exact answers, and pixels that match the words."""

from __future__ import annotations

import random
import re
import time

import numpy as np
import pytest

from vlchat.chat.messages import Image, Text
from vlchat.chat.template_lookup import get_template
from vlchat.errors import VlchatError
from vlchat.images import image_key
from vlchat.train import synth, synth_phrases, synth_questions
from vlchat.train.synth import (
    ANSWERS,
    COLOURS,
    HELD_OUT_SEEDS,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_SEEDS,
    WORDS,
    Scene,
    SceneObject,
    caption,
    caption_sample,
    make_scene,
    qa_sample,
    questions,
    render,
    synthetic_dataset,
)

SEEDS = range(500)
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene(s) for s in SEEDS]


def test_same_seed_same_scene_pixels_caption_and_questions():
    for seed in (0, 7, 123456):
        a, b = make_scene(seed), make_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
        assert caption(a) == caption(b) and caption(a, "zh") == caption(b, "zh")
        assert questions(a, random.Random(seed)) == questions(b, random.Random(seed))
        assert qa_sample(seed, turns=3).messages == qa_sample(seed, turns=3).messages


def test_different_seeds_differ():
    keys = {image_key(render(make_scene(s))) for s in range(50)}
    assert len(keys) == 50
    assert len({caption(make_scene(s)) for s in range(50)}) > 40


def test_vocabulary_is_covered(scenes):
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and len(SHAPES) >= 6
    assert {o.colour for o in objects} == set(COLOURS) and len(COLOURS) >= 8
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in scenes} == set(COLOURS)
    assert {s.word for s in scenes} - {None} == set(WORDS)


def test_scene_structure(scenes):
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    for s in scenes:
        positions = [o.position for o in s.objects]
        assert len(set(positions)) == len(positions)
        assert all(o.colour != s.background for o in s.objects)
    word_rate = sum(s.word is not None for s in scenes) / len(scenes)
    assert 0.22 < word_rate < 0.38


def test_scene_validation_rejects_bad_scenes():
    with pytest.raises(VlchatError):
        SceneObject("blob", "red", "small", "left")
    circle = SceneObject("circle", "red", "small", "left")
    with pytest.raises(VlchatError, match="share a position"):
        Scene((circle, circle), "white", None, 0)
    with pytest.raises(VlchatError, match="background"):
        Scene((circle,), "red", None, 0)
    with pytest.raises(VlchatError, match="at least one"):
        Scene((), "red", None, 0)
    top, bottom = SceneObject("star", "blue", "small", "top"), SceneObject("star", "blue", "small", "bottom")
    with pytest.raises(VlchatError, match="word"):
        Scene((top, bottom), "white", "CAT", 0)


def test_exists_questions_are_balanced(scenes):
    answers = [a for s in scenes for _, a, q in questions(s, random.Random(s.seed)) if q == "exists"]
    assert len(answers) == len(scenes)
    assert 0.42 < answers.count("yes") / len(answers) < 0.58


def test_training_exists_questions_add_hard_negatives_and_stay_balanced(scenes):
    """Training's "no" questions swap attributes between objects, or recolour a shape that is
    there, for two thirds of them; answers stay exact."""
    asked = [
        (s, q, a)
        for s in scenes
        for q, a, qtype in questions(s, random.Random(s.seed), askers=synth.TRAIN_ASK)
        if qtype == "exists"
    ]
    assert 0.42 < sum(a == "yes" for _, _, a in asked) / len(asked) < 0.58
    swapped = recoloured = 0
    for scene, question, answer in asked:
        named = [(c, sh) for c in COLOURS for sh in SHAPES if f" {c} {sh}?" in question]
        assert len(named) == 1, question
        colour, shape = named[0]
        assert answer == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in scene.objects) else "no")
        colours, shapes = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
        swapped += answer == "no" and colour in colours and shape in shapes
        recoloured += answer == "no" and colour not in colours and shape in shapes
    assert swapped > len(asked) / 12 and recoloured > len(asked) / 8, (swapped, recoloured, len(asked))
    # Evaluation's questions are unchanged by the training askers.
    assert questions(scenes[3], random.Random(3)) == questions(scenes[3], random.Random(3), askers=synth_questions._ASK)


def test_explained_exists_answers_give_the_shape_colours_then_the_same_verdict():
    """explain_yes_no: "is there a {colour} {shape}?" -> "The {shape} is {its colour}, so yes|no."
    (or "There is no {shape}" / "The {shape}s are a and b"); the questions and verdicts are the
    ones the plain sample asks and gives."""
    kinds = set()
    for seed in range(300):
        plain, explained = qa_sample(seed, "en", 6), qa_sample(seed, "en", 6, explain_yes_no=True)
        assert [m.parts[-1].text for m in plain.messages[::2]] == [m.parts[-1].text for m in explained.messages[::2]]
        scene = explained.meta["scene"]
        for qtype, bare, reasoned, question in zip(
            plain.meta["qtypes"], plain.meta["answers"], explained.meta["answers"], explained.messages[::2]
        ):
            if qtype != "exists":
                assert reasoned == bare
                continue
            assert reasoned.endswith(f", so {bare}.")
            shape = next(sh for sh in SHAPES if f" {sh}?" in question.parts[-1].text)
            colours = [o.colour for o in scene.objects if o.shape == shape]
            reason = reasoned.split(",")[0]
            if not colours:
                assert reason == f"There is no {shape}"
            elif len(colours) == 1:
                assert reason == f"The {shape} is {colours[0]}"
            else:
                assert reasoned.startswith(f"The {shape}") and all(c in reasoned for c in colours)
            kinds.add(min(len(colours), 2))
    assert kinds == {0, 1, 2}  # absent, one, several


def test_qtypes_asks_only_those_types_and_the_default_is_unchanged():
    for seed in range(40):
        focused = qa_sample(seed, "en", 6, qtypes=("exists",))
        assert focused.meta["qtypes"] == ["exists"] * 6
        assert len(set(m.parts[-1].text for m in focused.messages[::2])) > 1  # other pairs or phrasings
        two = qa_sample(seed, "zh", 6, qtypes=("position", "count"))
        assert len(two.meta["qtypes"]) == 6 and set(two.meta["qtypes"]) <= {"position", "count"}
        assert qa_sample(seed, "en", 6, qtypes=synth.QTYPES).messages == qa_sample(seed, "en", 6).messages
    with pytest.raises(VlchatError, match="unknown question types"):
        qa_sample(1, "en", 6, qtypes=("colour", "smell"))
    with pytest.raises(VlchatError, match="must include one of shape, count, exists"):
        qa_sample(1, "en", 6, qtypes=("word",))  # a scene without a word could ask nothing


def test_max_objects_limits_scenes_and_the_default_keeps_every_seed_s_scene():
    for seed in range(60):
        assert make_scene(seed, 4) == make_scene(seed)
        assert len(make_scene(seed, 1).objects) == 1 and len(make_scene(seed, 2).objects) <= 2
        lone = caption_sample(seed, "en", max_objects=1).meta["scene"]
        assert lone == make_scene(seed, 1)
        assert qa_sample(seed, "en", 6, max_objects=1).meta["scene"] == lone
    assert {len(make_scene(s, 2).objects) for s in range(60)} == {1, 2}
    assert {len(make_scene(s).objects) for s in range(60)} == {1, 2, 3, 4}
    for bad in (0, 5):
        with pytest.raises(VlchatError, match="max_objects must be 1 to 4"):
            make_scene(1, bad)


def test_explained_answers_are_english_only():
    with pytest.raises(VlchatError, match="explain_yes_no is for English questions only"):
        qa_sample(1, "zh", 6, explain_yes_no=True)


def test_shape_reason_names_every_colour_and_the_plural():
    two_crosses = Scene(
        (
            SceneObject("cross", "red", "small", "left"),
            SceneObject("cross", "blue", "large", "right"),
            SceneObject("star", "green", "small", "top"),
        ),
        "white",
        None,
        0,
    )
    assert synth.shape_reason(two_crosses, "cross") == "The crosses are red and blue"
    assert synth.shape_reason(two_crosses, "star") == "The star is green"
    assert synth.shape_reason(two_crosses, "heart") == "There is no heart"


def test_training_samples_ask_the_hardest_types_again():
    qtypes = [q for seed in range(100) for q in qa_sample(seed, "en", turns=10).meta["qtypes"]]
    focus = sum(q in synth.FOCUS_QTYPES for q in qtypes) / len(qtypes)
    assert focus > 0.6  # a first round of every type, then colour/position/exists only


def test_colour_questions_only_name_unique_shapes(scenes):
    asked = 0
    for s in scenes:
        for lang in ("en", "zh"):
            for question, answer, qtype in questions(s, random.Random(s.seed), lang):
                if qtype != "colour":
                    continue
                named = [o for o in s.objects if (o.shape if lang == "en" else synth_phrases.ZH[o.shape]) in question]
                assert len(named) == 1, question
                assert answer == (named[0].colour if lang == "en" else synth_phrases.ZH[named[0].colour])
                asked += 1
    assert asked > 400


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_answers_are_in_the_declared_vocabulary(scenes, lang):
    seen_types = set()
    for s in scenes:
        for _, answer, qtype in questions(s, random.Random(s.seed), lang):
            assert answer in ANSWERS[lang][qtype], (qtype, answer)
            # exact match after lower-casing and stripping punctuation must keep the answer whole
            assert re.sub(r"[^\w]", "", answer.lower()) == answer.lower()
            seen_types.add(qtype)
    assert seen_types == set(synth.QTYPES)


def test_answers_are_correct_for_a_known_scene():
    objs = (
        SceneObject("circle", "red", "large", "left"),
        SceneObject("square", "blue", "small", "top"),
        SceneObject("circle", "green", "small", "right"),
    )
    scene = Scene(objs, "white", "CAT", 3)
    found = {}
    for i in range(40):
        for q, a, t in questions(scene, random.Random(i)):
            found.setdefault(t, set()).add((q, a))
    assert {a for _, a in found["colour"]} == {"blue"}  # the circle appears twice: never asked
    assert {a for _, a in found["count"]} == {"3"}
    assert {a for _, a in found["word"]} == {"CAT"}
    assert {a for _, a in found["position"]} == {"left", "top", "right"}
    assert ("What shape is on the left?", "circle") in found["shape"] or any(
        "left" in q and a == "circle" for q, a in found["shape"]
    )
    assert all(
        a == ("yes" if ("red circle" in q or "blue square" in q or "green circle" in q) else "no")
        for q, a in found["exists"]
    )


def test_captions_in_both_languages():
    objs = (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "small", "top"))
    scene = Scene(objs, "white", "CAT", 0)
    assert caption(scene) == (
        "A large red circle on the left and a small blue square at the top, "
        'on a white background. The word "CAT" is written in the image.'
    )
    assert (
        caption(scene, "zh") == "图中左边有一个大的红色圆形，上面有一个小的蓝色正方形，背景是白色。图中写着单词“CAT”。"
    )
    assert caption(Scene(objs[:1], "orange", None, 0)).endswith("on an orange background.")


def test_english_questions_use_an_before_vowels(scenes):
    for s in scenes:
        for q, _, _ in questions(s, random.Random(s.seed)):
            assert not re.search(r"\ba [aeiou]", q), q


def test_word_in_caption_iff_present(scenes):
    for s in scenes:
        for lang in ("en", "zh"):
            text = caption(s, lang)
            assert (s.word is not None) == any(w in text for w in WORDS)
            if s.word:
                assert s.word in text


def test_chinese_text_has_cjk(scenes):
    for s in scenes[:50]:
        assert CJK.search(caption(s, "zh"))
        for q, a, qtype in questions(s, random.Random(s.seed), "zh"):
            assert CJK.search(q)
            if qtype not in ("count", "word"):
                assert CJK.search(a)


def _cells(image) -> dict[str, np.ndarray]:
    """The pixels of each position's cell of the 3x3 layout, as (N, 3) float arrays."""
    pixels = np.asarray(image, dtype=np.float32)
    third = pixels.shape[0] // 3
    return {
        p: pixels[r * third : (r + 1) * third, c * third : (c + 1) * third].reshape(-1, 3)
        for p, (c, r) in synth._CELLS.items()
    }


@pytest.mark.parametrize("shape", ["circle", "square", "star", "heart"])
@pytest.mark.parametrize("position", POSITIONS)
def test_object_colour_is_drawn_in_its_cell(shape, position):
    for seed, colour in enumerate(["red", "green", "blue", "purple", "orange"]):
        scene = Scene((SceneObject(shape, colour, "large", position),), "white", None, seed)
        target = np.array(COLOURS[colour], dtype=np.float32)
        cells = _cells(render(scene))
        distance = {p: np.linalg.norm(px.mean(0) - target) for p, px in cells.items()}
        assert min(distance, key=distance.get) == position
        # pixels of the object's colour: a real share of its cell (a star covers ~20%), none elsewhere
        share = {p: (np.linalg.norm(px - target, axis=1) < 30).mean() for p, px in cells.items()}
        assert share[position] > 0.15
        assert all(share[p] == 0 for p in share if p != position)


def test_word_is_drawn_in_a_free_band():
    obj = SceneObject("circle", "red", "small", "top")
    plain = render(Scene((obj,), "white", None, 5))
    worded = np.asarray(render(Scene((obj,), "white", "HELLO", 5)), dtype=np.int32)
    changed = np.abs(worded - np.asarray(plain, dtype=np.int32)).sum(-1) > 0
    rows = np.nonzero(changed.any(1))[0]
    assert rows.min() >= 224 * 2 // 3 - 1  # top is taken, so the word goes to the bottom band
    assert (worded[changed] < 60).all(axis=-1).mean() > 0.5  # dark ink on a light background


def test_seed_ranges_do_not_overlap():
    assert TRAIN_SEEDS.stop <= HELD_OUT_SEEDS.start
    assert not set(range(TRAIN_SEEDS.stop - 10, TRAIN_SEEDS.stop)) & set(HELD_OUT_SEEDS)


def _check_sample(sample, n_user: int) -> None:
    messages = sample.messages
    assert [m.role for m in messages] == ["user", "assistant"] * n_user
    assert isinstance(messages[0].parts[0], Image) and isinstance(messages[0].parts[1], Text)
    assert messages[0].parts[0].key == image_key(sample.images[0])
    assert all(not m.images for m in messages[1:])
    assert sample.images[0].mode == "RGB" and sample.images[0].size == (224, 224)
    segments = get_template("chatml").segments(messages, add_generation_prompt=False)
    trainable = "".join(s.text for s in segments if s.trainable and s.is_content)
    assert trainable == "".join(m.content for m in messages if m.role == "assistant")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_caption_sample(lang):
    sample = caption_sample(42, lang)
    _check_sample(sample, 1)
    assert sample.messages[0].parts[1].text in synth.INSTRUCTIONS[lang]
    assert sample.messages[1].content == caption(sample.meta["scene"], lang)
    assert sample.meta["lang"] == lang and sample.meta["scene"] == make_scene(42)
    assert len({caption_sample(s, lang).messages[0].parts[1].text for s in range(60)}) > 3


@pytest.mark.parametrize("turns", [1, 3, 10])
def test_qa_sample(turns):
    sample = qa_sample(9, "en", turns)
    _check_sample(sample, turns)
    assert len(sample.meta["qtypes"]) == len(sample.meta["answers"]) == turns
    assert [m.content for m in sample.messages[1::2]] == sample.meta["answers"]
    if turns == 3:
        assert len(set(sample.meta["qtypes"])) == 3  # the first round asks distinct qtypes
    with pytest.raises(VlchatError):
        qa_sample(9, "en", 0)


def test_synthetic_dataset_languages_and_errors():
    both = list(synthetic_dataset("qa", range(4), "both", turns=2))
    assert [s.meta["lang"] for s in both] == ["en", "zh", "en", "zh"]
    assert all(len(s.messages) == 4 for s in both)
    captions = list(synthetic_dataset("caption", range(10, 13), "zh"))
    assert all(CJK.search(s.messages[1].content) for s in captions)
    with pytest.raises(VlchatError):
        next(synthetic_dataset("vqa", range(1), "en"))
    with pytest.raises(VlchatError):
        next(synthetic_dataset("qa", range(1), "fr"))


def test_rendering_is_fast():
    scenes = [make_scene(s) for s in range(100)]
    start = time.perf_counter()
    for s in scenes:
        render(s)
    assert time.perf_counter() - start < 1.5
