"""image_labels: the encoder's own ImageNet head on real photos, names from timm's data files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlchat.agent.builtin.labels import image_labels_tool, imagenet_labels
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.tools import ToolContext, ToolRegistry
from vlchat.images import load_image

EXAMPLES = Path(__file__).resolve().parents[3] / "vlchat" / "examples"
CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}


@pytest.fixture(scope="module")
def executor() -> ToolExecutor:
    context = ToolContext()
    context.add_image(load_image(EXAMPLES / "chelsea.jpg"), name="cat")
    context.add_image(load_image(EXAMPLES / "coffee.jpg"), name="coffee")
    return ToolExecutor(ToolRegistry([image_labels_tool()]), context)


def test_label_names_are_the_1000_imagenet_classes_in_index_order():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[281] == "tabby, tabby cat" and labels[967] == "espresso"


def test_chelsea_is_a_cat_and_coffee_is_coffee(executor):
    cat = executor.run("image_labels", {"image": "cat"})
    assert cat.ok, cat.error
    labels = cat.data["labels"]
    assert len(labels) == 5 and labels[0]["label"] in CAT_CLASSES, labels
    assert labels[0]["probability"] >= labels[1]["probability"] > 0
    coffee = executor.run("image_labels", {"image": "coffee", "top_k": 2})
    assert coffee.data["labels"][0]["label"] in {"espresso", "cup", "coffee mug"}, coffee.data
    assert len(coffee.data["labels"]) == 2


def test_a_box_classifies_the_region(executor):
    obs = executor.run("image_labels", {"image": "cat", "box": [0.2, 0.1, 0.8, 0.9], "top_k": 1})
    assert obs.ok and obs.data["labels"][0]["label"] in CAT_CLASSES


def test_top_k_out_of_range_is_refused(executor):
    obs = executor.run("image_labels", {"image": "cat", "top_k": 0})
    assert not obs.ok and "0 is less than the minimum of 1" in obs.error


def test_unknown_image_name(executor):
    obs = executor.run("image_labels", {"image": "dog.png"})
    assert not obs.ok and obs.error == "no image named 'dog.png'; images in this conversation: cat, coffee"


def test_labels_of_a_plain_image_are_still_a_distribution(executor):
    executor.context.add_image(Image.new("RGB", (64, 64), "gray"), name="gray")
    obs = executor.run("image_labels", {"image": "gray", "top_k": 20})
    assert obs.ok and len(obs.data["labels"]) == 20
    assert 0 < sum(label["probability"] for label in obs.data["labels"]) <= 1.0001
