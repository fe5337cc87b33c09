"""zoom: crop a region of an image into a new image of the conversation.

The crop is added to the ToolContext under a new name ("image_2", ...), so later calls can read
or label it, and the executor's Observation carries it (name, PIL image, content key, PNG bytes)
for the loop to show the model. Small crops are enlarged (bicubic) so the longer side is at least
`min_side` px, the size the vision encoder and OCR work well at; none is enlarged more than 8x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlchat.agent.builtin.regions import Box, crop
from vlchat.agent.tools import Tool, ToolContext

MAX_ENLARGE = 8


@dataclass(frozen=True)
class ZoomConfig:
    min_side: int = 448  # px; a crop whose longer side is shorter is enlarged up to this
    timeout_s: float = 10.0


def zoom_image(image: Image.Image, box: list[float], min_side: int) -> Image.Image:
    region, _ = crop(image, box)
    longer = max(region.size)
    if longer >= min_side:
        return region.copy()
    factor = min(min_side / longer, MAX_ENLARGE)
    size = (round(region.width * factor), round(region.height * factor))
    return region.resize(size, Image.Resampling.BICUBIC)


def zoom_tool(config: ZoomConfig | None = None) -> Tool:
    config = config or ZoomConfig()

    def zoom(image: str, box: Box, ctx: ToolContext) -> dict[str, Any]:
        """Crop a region of an image to look closer; the crop becomes a new image.

        Args:
            image: an image name, e.g. "image_1".
            box: [left, top, right, bottom], fractions of the image size; [0, 0, 0.5, 0.5] is the top-left quarter.
        """
        source = ctx.image(image)
        zoomed = zoom_image(source, box, config.min_side)
        name = ctx.add_image(zoomed)
        return {"image": name, "source": image, "box": box, "size": [zoomed.width, zoomed.height]}

    return Tool.from_function(zoom, timeout_s=config.timeout_s)
