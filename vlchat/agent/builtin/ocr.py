"""read_text: OCR of an image or a region, Chinese and English, with rapidocr-onnxruntime.

rapidocr-onnxruntime==1.4.4 ships PaddleOCR's PP-OCRv4 detection and recognition models and the
mobile v2.0 direction classifier as ONNX files inside the package: nothing is downloaded.
Detection runs with the longer side capped at `det_max_side` px (rapidocr's default instead
scales the SHORTER side up to 736 px, 8 s for a 640x200 image on 2 cores against 0.4 s here);
small text in a large photo is read by passing a box, which crops before scaling.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlchat.agent.builtin.regions import Box, crop, to_fractions
from vlchat.agent.tools import Tool, ToolContext, ToolError

REQUIREMENT = "rapidocr-onnxruntime==1.4.4"


@dataclass(frozen=True)
class OcrConfig:
    det_max_side: int = 960  # detection input: the longer side is scaled down to this
    min_confidence: float = 0.5  # lines recognised with less are dropped
    timeout_s: float = 60.0


@dataclass(frozen=True)
class TextLine:
    text: str
    box: list[float]  # [left, top, right, bottom], fractions of the whole image
    confidence: float


class TextReader:
    """One RapidOCR engine, built on first use (about 1 s) and shared by all calls."""

    def __init__(self, config: OcrConfig | None = None) -> None:
        self.config = config or OcrConfig()
        self._engine = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Any:
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError:
                raise ToolError(f"OCR needs the package {REQUIREMENT}: pip install {REQUIREMENT}") from None
            self._engine = RapidOCR(
                det_limit_type="max", det_limit_side_len=self.config.det_max_side, text_score=self.config.min_confidence
            )
        return self._engine

    def read(self, image: Image.Image, box: list[float] | None = None) -> list[TextLine]:
        """Text lines top to bottom, boxes mapped back to fractions of `image`."""
        region, (x0, y0) = crop(image, box)
        pixels = np.asarray(region.convert("RGB"))[:, :, ::-1]  # (H, W, 3) BGR, as rapidocr's cv2 code expects
        with self._lock:  # engine calls share mutable post-processing state
            found, _timings = self._get_engine()(np.ascontiguousarray(pixels))
        lines = []
        for polygon, text, score in found or []:
            xs = [p[0] + x0 for p in polygon]  # four corners, region px -> image px
            ys = [p[1] + y0 for p in polygon]
            fractions = to_fractions(min(xs), min(ys), max(xs), max(ys), image.width, image.height)
            lines.append(TextLine(text, fractions, round(float(score), 3)))
        return lines


def read_text_tool(config: OcrConfig | None = None, reader: TextReader | None = None) -> Tool:
    reader = reader or TextReader(config)

    def read_text(image: str, ctx: ToolContext, box: Box | None = None) -> dict[str, Any]:
        """Read the text in an image (OCR, Chinese and English): its lines, top to bottom.

        Args:
            image: an image name, e.g. "image_1".
            box: optional region [left, top, right, bottom], fractions of the image size.
        """
        picture = ctx.image(image)
        lines = reader.read(picture, box)
        return {
            "image": image,
            "size": [picture.width, picture.height],
            "lines": [{"text": ln.text, "box": ln.box, "confidence": ln.confidence} for ln in lines],
            "text": "\n".join(ln.text for ln in lines) or "(no text found)",
        }

    return Tool.from_function(read_text, timeout_s=reader.config.timeout_s)
