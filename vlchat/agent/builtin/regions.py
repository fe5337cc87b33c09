"""Regions of an image, shared by read_text, image_labels and zoom.

A box is [left, top, right, bottom] as FRACTIONS of the image's width and height (0..1, origin
top-left): [0, 0, 0.5, 0.5] is the top-left quarter whatever the resolution, so a model needs no
arithmetic on pixel sizes, and read_text's output boxes (also fractions of the whole image) can be
passed straight to zoom.
"""

from __future__ import annotations

from typing import Annotated

from PIL import Image

from vlchat.agent.tools import Schema, ToolError

# The JSON Schema of a box parameter: exactly four numbers in [0, 1].
Box = Annotated[
    list[float],
    Schema(items={"type": "number", "minimum": 0, "maximum": 1}, minItems=4, maxItems=4),
]
MIN_SIDE_PX = 4  # a smaller crop holds nothing a tool can read


def box_to_pixels(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Fractions -> (left, top, right, bottom) pixels, after checking the box is a real area."""
    left, top, right, bottom = box
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        raise ToolError(f"box {box} must be [left, top, right, bottom] fractions with left < right and top < bottom")
    pixels = (round(left * width), round(top * height), round(right * width), round(bottom * height))
    if pixels[2] - pixels[0] < MIN_SIDE_PX or pixels[3] - pixels[1] < MIN_SIDE_PX:
        raise ToolError(f"box {box} is smaller than {MIN_SIDE_PX} px on this {width}x{height} image")
    return pixels


def crop(image: Image.Image, box: list[float] | None) -> tuple[Image.Image, tuple[int, int]]:
    """(the region, or the whole image when box is None; the region's top-left corner in pixels)."""
    if box is None:
        return image, (0, 0)
    left, top, right, bottom = box_to_pixels(box, image.width, image.height)
    return image.crop((left, top, right, bottom)), (left, top)


def to_fractions(left: float, top: float, right: float, bottom: float, width: int, height: int) -> list[float]:
    """Pixels of the whole image -> a box in fractions, 4 decimals (0.1 px on a 1000 px side)."""
    return [round(left / width, 4), round(top / height, 4), round(right / width, 4), round(bottom / height, 4)]
