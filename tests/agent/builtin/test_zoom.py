"""zoom: a crop becomes a new named image of the conversation, reported in the Observation."""

from __future__ import annotations

from PIL import Image

from vlchat.agent.builtin.zoom import ZoomConfig, zoom_tool
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.tools import ToolContext, ToolRegistry


def quadrants() -> Image.Image:
    """400x200: red top-left, green top-right, blue bottom-left, white bottom-right."""
    image = Image.new("RGB", (400, 200), "white")
    image.paste((255, 0, 0), (0, 0, 200, 100))
    image.paste((0, 255, 0), (200, 0, 400, 100))
    image.paste((0, 0, 255), (0, 100, 200, 200))
    return image


def make_executor(min_side: int = 448) -> ToolExecutor:
    context = ToolContext()
    context.add_image(quadrants())
    return ToolExecutor(ToolRegistry([zoom_tool(ZoomConfig(min_side=min_side))]), context)


def test_zoom_crops_enlarges_and_adds_a_named_image():
    executor = make_executor()
    obs = executor.run("zoom", {"image": "image_1", "box": [0.5, 0, 1, 0.5]})
    assert obs.ok, obs.error
    assert obs.data == {"image": "image_2", "source": "image_1", "box": [0.5, 0, 1, 0.5], "size": [448, 224]}
    [made] = obs.images
    assert made.name == "image_2" and made.image.size == (448, 224)
    assert made.image.getpixel((224, 112)) == (0, 255, 0)  # the green quadrant
    assert executor.context.image("image_2") is made.image
    assert made.png_bytes()[:4] == b"\x89PNG"


def test_a_large_crop_keeps_its_pixels():
    executor = make_executor(min_side=64)
    obs = executor.run("zoom", {"image": "image_1", "box": [0, 0.5, 0.5, 1]})
    assert obs.data["size"] == [200, 100]
    assert obs.images[0].image.getpixel((10, 10)) == (0, 0, 255)


def test_bad_boxes_are_observations():
    executor = make_executor()
    assert "is smaller than 4 px" in executor.run("zoom", {"image": "image_1", "box": [0, 0, 0.001, 1]}).error
    assert "box: [] is too short" in executor.run("zoom", {"image": "image_1", "box": []}).error
    missing = executor.run("zoom", {"image": "image_1"})
    assert not missing.ok and "'box' is a required property" in missing.error
