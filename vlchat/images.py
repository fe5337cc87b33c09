"""Load, validate and normalise images: the first box of the data path (file -> RGB -> tensor).

Every user-fixable problem (missing file, not an image, truncated data, too many pixels or bytes)
is raised as a one-line VlchatError that names the file. Pixel limits are checked from the header
that `Image.open` reads, before any pixel data is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlchat.errors import VlchatError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000 x 5000; refused before decoding (decompression bombs)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
WHITE = (255, 255, 255, 255)  # transparent areas are shown on white, as a browser page would

# Modes that carry an alpha channel; P/L/RGB may also carry a tRNS colour in `info["transparency"]`.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
) -> Image.Image:
    """A fully-loaded RGB image. `source` is a path or the raw file bytes (`name` names bytes in messages)."""
    label, data = _read_source(source, max_bytes, name)
    # Decoding warnings (DecompressionBombWarning, palette-transparency hints) are ours to handle,
    # not the caller's: each failure becomes a VlchatError below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as image:
                _check_pixels(image.size, max_pixels, label)
                image.load()  # decode now, while errors still map to this file
                return _to_rgb(ImageOps.exif_transpose(image))
        except VlchatError:
            raise
        except Image.DecompressionBombError as err:
            # PIL's own guard (2 x Image.MAX_IMAGE_PIXELS) fires inside Image.open, before our check.
            found = re.search(r"(\d+) pixels", str(err))
            size = f"{found.group(1)} pixels" if found else "too many pixels"
            raise VlchatError(f"image too large: {label} has {size}, limit is {max_pixels} pixels") from None
        except UnidentifiedImageError:
            raise VlchatError(f"not an image (or an unsupported format): {label}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL's decoding failures
            reason = " ".join(str(err).split()) or type(err).__name__
            raise VlchatError(f"corrupt or truncated image: {label} ({reason})") from None


def _read_source(source: str | os.PathLike | bytes, max_bytes: int, name: str | None) -> tuple[str, bytes]:
    """(label for messages, file bytes), after the existence and byte-size checks."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = name or "<image bytes>", bytes(source)
        size = len(data)
    else:
        label = os.fspath(source)
        if not os.path.exists(label):
            raise VlchatError(f"image not found: {label}")
        if os.path.isdir(label):
            raise VlchatError(f"image path is a directory, not a file: {label}")
        size, data = os.path.getsize(label), b""
    if size == 0:
        raise VlchatError(f"image file is empty: {label}")
    if size > max_bytes:
        raise VlchatError(f"image file too large: {label} is {size} bytes, limit is {max_bytes} bytes")
    if not data:
        with open(label, "rb") as f:  # size already checked, so reading it whole is bounded
            data = f.read()
    return label, data


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    """Refuse by the header's declared size, before decoding (a 20000x20000 PNG can be ~50 KB)."""
    width, height = size
    if width * height > max_pixels:
        pixels = f"{width}x{height} = {width * height} pixels"
        raise VlchatError(f"image too large: {label} is {pixels}, limit is {max_pixels} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit grey rescaled, CMYK/P/1/L converted."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    if image.mode.startswith("I"):
        # PIL's I;16 -> RGB clips at 255 (most 16-bit photos turn white); rescale 0..65535 -> 0..255.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")  # convert() always returns a loaded copy, detached from the file


def image_key(image: Image.Image) -> str:
    """sha256 hex of (mode, size, raw RGB bytes): a content hash used to cache embeddings."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to size x size (bicubic, no crop: the whole image is seen) -> float (3, size, size).

    Values are (x - 127) / 128, EfficientNet-Lite's input normalisation (range [-0.992, 1.0]).
    """
    if size <= 0:
        raise VlchatError(f"image size must be positive, got {size}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32))  # (H, W, 3), writable copy
    return (pixels.permute(2, 0, 1) - 127.0) / 128.0  # (3, H, W)
