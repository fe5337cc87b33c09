"""Tests for vlchat.images: every fixture is built with PIL in tmp_path (no committed binaries)."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlchat.errors import VlchatError
from vlchat.images import DEFAULT_MAX_PIXELS, image_key, load_image, to_tensor

RED = (200, 30, 40)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def assert_refused(source, match: str, label: str, **kwargs) -> str:
    """load_image refuses with a one-line VlchatError naming the file; returns the message."""
    with pytest.raises(VlchatError, match=match) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert label in message and "\n" not in message
    return message


@pytest.fixture(autouse=True)
def no_pil_warnings():
    """No test may leak a warning (PIL's DecompressionBombWarning included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_truncated_images_are_not_globally_allowed():
    import vlchat.images  # noqa: F401  (importing must not flip PIL's global switch)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


FORMATS = [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp")]


@pytest.mark.parametrize("fmt, suffix", FORMATS)
def test_formats_load_as_rgb(tmp_path, fmt, suffix):
    path = save(Image.new("RGB", (32, 24), RED), tmp_path / f"red.{suffix}", format=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.abs(np.array(image.getpixel((16, 12))) - RED).max() <= 12  # lossy formats


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent red -> white background
        ("LA", (0, 0), (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, value, expected):
    image = load_image(save(Image.new(mode, (8, 8), value), tmp_path / f"{mode}.png"))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == expected


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    path = save(Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    assert load_image(path).getpixel((0, 0)) == (100, 100, 100)


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    image = load_image(save(palette, tmp_path / "p.png", transparency=0))
    assert image.getpixel((3, 3)) == (255, 255, 255)  # index 0 (red) is transparent
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path):
    image = load_image(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert image.mode == "RGB" and np.abs(np.array(image.getpixel((8, 8))) - (255, 0, 0)).max() <= 12


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = save(Image.new("RGB", (40, 20), RED), tmp_path / "rotated.jpg", exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20) and raw.getexif()[0x0112] == 6
    assert load_image(path).size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_bytes_input_and_name_in_messages(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 7), RED).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 7)
    assert_refused(b"hello", "not an image", "upload.png", name="upload.png")
    assert_refused(buffer.getvalue(), "too large", "upload.png", name="upload.png", max_bytes=10)


def test_image_key(tmp_path):
    base = Image.new("RGB", (8, 8), RED)
    other = base.copy()
    other.putpixel((0, 0), (0, 0, 0))
    assert image_key(base) == image_key(base.copy()) and len(image_key(base)) == 64
    assert image_key(base) != image_key(other)
    png, bmp = load_image(save(base, tmp_path / "a.png")), load_image(save(base, tmp_path / "a.bmp"))
    assert image_key(png) == image_key(bmp)
    assert image_key(base) != image_key(Image.new("RGB", (16, 4), RED))  # same bytes, other shape


def test_to_tensor_shape_and_range():
    image = Image.new("RGB", (30, 10), (255, 255, 255))
    image.putpixel((0, 0), (0, 0, 0))
    tensor = to_tensor(image, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.max().item() == pytest.approx((255 - 127) / 128)
    assert tensor.min().item() >= (0 - 127) / 128 - 1e-6
    assert to_tensor(Image.new("L", (4, 4), 127), 2).abs().max().item() == 0.0


def test_refuses_missing_directory_empty_and_text(tmp_path):
    assert_refused(tmp_path / "nope.png", "image not found", "nope.png")
    (tmp_path / "folder.png").mkdir()
    assert_refused(tmp_path / "folder.png", "directory", "folder.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_refused(tmp_path / "empty.png", "empty", "empty.png")
    (tmp_path / "notes.png").write_text("just some text\n" * 10)
    assert_refused(tmp_path / "notes.png", r"not an image \(or an unsupported format\)", "notes.png")


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_refuses_truncated(tmp_path, fmt, suffix):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = save(noise, tmp_path / f"full.{suffix}", format=fmt).read_bytes()
    (tmp_path / f"half.{suffix}").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path / f"half.{suffix}", "corrupt or truncated", f"half.{suffix}")


def test_refuses_too_many_pixels_and_bytes(tmp_path):
    path = save(Image.new("RGB", (100, 50), RED), tmp_path / "big.png")
    message = assert_refused(path, "too large", "big.png", max_pixels=4999)
    assert "100x50" in message and "4999" in message
    assert load_image(path, max_pixels=5000).size == (100, 50)
    assert_refused(path, "file too large", "big.png", max_bytes=path.stat().st_size - 1)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """1-bit PNGs of zeros: tiny files whose declared size is huge."""
    folder = tmp_path_factory.mktemp("bombs")
    return {
        name: save(Image.new("1", size), folder / f"{name}.png")
        for name, size in [("huge", (20000, 20000)), ("large", (12000, 12000))]
    }  # 400M (PIL's own error) / 144M (PIL warns)


@pytest.mark.parametrize("name, pixels", [("huge", "400000000"), ("large", "144000000")])
def test_refuses_bomb_without_decoding(bombs, monkeypatch, name, pixels):
    assert bombs[name].stat().st_size < 100_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    start = time.perf_counter()
    message = assert_refused(bombs[name], "too large", f"{name}.png")
    assert time.perf_counter() - start < 1.0
    assert pixels in message and str(DEFAULT_MAX_PIXELS) in message
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's global guard left in place
