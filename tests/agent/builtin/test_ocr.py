"""read_text on text rendered here with PIL: English with Pillow's bundled font, Chinese with a
CJK font found by fc-list (fonts-wqy-zenhei, installed by `make browser`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw, ImageFont

from vlchat.agent.builtin.ocr import read_text_tool
from vlchat.agent.executor import ToolExecutor
from vlchat.agent.tools import ToolContext, ToolRegistry


def render(lines: list[str], font: ImageFont.FreeTypeFont, size=(720, 240)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        draw.text((30, 30 + 90 * i), text, fill="black", font=font)
    return image


def cjk_font_file() -> str | None:
    if not shutil.which("fc-list"):
        return None
    listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True).stdout.split()
    return listed[0].rstrip(":") if listed else None


@pytest.fixture(scope="module")
def executor() -> ToolExecutor:
    return ToolExecutor(ToolRegistry([read_text_tool()]), ToolContext())


def read(executor: ToolExecutor, image: Image.Image, **arguments) -> dict:
    name = executor.context.add_image(image)
    obs = executor.run("read_text", {"image": name, **arguments})
    assert obs.ok, obs.error
    return obs.data


def test_reads_english_lines_exactly_with_boxes_and_confidences(executor):
    data = read(executor, render(["Open the door", "Total 42.50 EUR"], ImageFont.load_default(size=40)))
    assert [line["text"] for line in data["lines"]] == ["Open the door", "Total 42.50 EUR"]
    assert data["text"] == "Open the door\nTotal 42.50 EUR" and data["size"] == [720, 240]
    first, second = (line["box"] for line in data["lines"])
    assert 0 < first[0] < first[2] < 1 and first[3] <= second[1]  # fractions; line 1 above line 2
    assert all(line["confidence"] > 0.8 for line in data["lines"])


def test_reads_chinese_lines_exactly(executor):
    font_file = cjk_font_file()
    if font_file is None:
        pytest.skip("no CJK font on this machine (make browser installs fonts-wqy-zenhei)")
    data = read(executor, render(["你好世界", "中国的首都是北京"], ImageFont.truetype(font_file, 44)))
    assert [line["text"] for line in data["lines"]] == ["你好世界", "中国的首都是北京"]


def test_a_box_reads_only_that_region_and_maps_boxes_back(executor):
    image = Image.new("RGB", (800, 200), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    draw.text((30, 70), "LEFT", fill="black", font=font)
    draw.text((480, 70), "RIGHT", fill="black", font=font)
    data = read(executor, image, box=[0.5, 0, 1, 1])
    assert [line["text"] for line in data["lines"]] == ["RIGHT"]
    left, top, right, bottom = data["lines"][0]["box"]  # fractions of the WHOLE image
    assert 0.55 < left < 0.62 and 0.7 < right < 0.8 and 0.3 < top < bottom < 0.65


def test_blank_image_and_bad_box_are_clear(executor):
    assert read(executor, Image.new("RGB", (300, 100), "white"))["text"] == "(no text found)"
    executor.context.add_image(Image.new("RGB", (300, 100), "white"), name="blank")
    obs = executor.run("read_text", {"image": "blank", "box": [0.6, 0, 0.4, 1]})
    assert not obs.ok and "left < right" in obs.error
    obs = executor.run("read_text", {"image": "blank", "box": [0, 0, 2, 1]})
    assert not obs.ok and "invalid arguments for read_text: box/2: 2 is greater than the maximum of 1" in obs.error
