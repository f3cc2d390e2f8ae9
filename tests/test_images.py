"""Decoding every image mode to correct RGB, and the centre-cropped squares of an image set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deft_clean.config import DataConfig
from deft_clean.data import load_manifest
from deft_clean.errors import DataError
from deft_clean.image_cache import build_image_cache
from deft_clean.images import open_image, pixel_limit

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _stripes(colors: list[tuple[int, int, int]], width: int, height: int, vertical: bool) -> Image.Image:
    """Equal stripes of ``colors``: left-to-right when ``vertical``, else top-to-bottom."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    n = len(colors)
    for k, color in enumerate(colors):
        if vertical:
            pixels[:, k * width // n : (k + 1) * width // n] = color
        else:
            pixels[k * height // n : (k + 1) * height // n, :] = color
    return Image.fromarray(pixels)


def _framed(width: int, height: int) -> Image.Image:
    """Green with red/blue bands on the long sides' ends (1/12 each): outside the centre square."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = GREEN
    band = max(width, height) // 12
    ends = (np.s_[:, :band], np.s_[:, -band:]) if width > height else (np.s_[:band], np.s_[-band:])
    pixels[ends[0]], pixels[ends[1]] = RED, BLUE
    return Image.fromarray(pixels)


def test_grayscale_and_palette_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    palette = _stripes([RED, GREEN, BLUE], 6, 3, vertical=True).convert("P")
    palette.save(tmp_path / "pal.png")
    gray = open_image(tmp_path / "gray.png")
    assert gray.mode == "RGB" and gray.size == (5, 4)
    assert np.all(np.asarray(gray) == 77)
    pal = np.asarray(open_image(tmp_path / "pal.png"))
    assert pal[0, 0].tolist() == list(RED) and pal[0, 5].tolist() == list(BLUE)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    transparent_gif = Image.new("P", (2, 2), 0)
    transparent_gif.putpalette([10, 20, 30] * 256)
    transparent_gif.save(tmp_path / "t.gif", transparency=0)
    out = np.asarray(open_image(tmp_path / "rgba.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent red -> white, not red or black
    assert out[0, 1].tolist() == [0, 0, 255]
    assert np.all(np.abs(out[0, 2] - 127) <= 1)
    assert np.all(np.asarray(open_image(tmp_path / "la.png")) == 255)
    assert np.all(np.asarray(open_image(tmp_path / "t.gif")) == 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    out = open_image(tmp_path / "cmyk.jpg")
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out)[4, 4].astype(int) - np.array(RED)).max() <= 8


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = np.asarray(open_image(tmp_path / "16.png"))
    assert out[0, :, 0].tolist() == [0, 100, 255, 4]  # 1000/257 = 3.9; clipping would give 255 for 25700
    assert np.all(out[..., 0] == out[..., 2])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = _stripes([RED, BLUE], 40, 20, vertical=True)  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = open_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # portrait after the rotation
    pixels = np.asarray(out).astype(int)
    assert np.abs(pixels[5, 10] - RED).max() < 40 and np.abs(pixels[35, 10] - BLUE).max() < 40


def test_unreadable_file_raises_data_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError) as info:
        open_image(tmp_path / "x.jpg")
    (problem,) = info.value.problems
    assert problem.kind == "unreadable" and problem.path == str(tmp_path / "x.jpg")


def test_pixel_limit_makes_the_warning_an_error_and_restores_pil(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    with pixel_limit(7_000), pytest.raises(DataError) as info:  # 10,000 px: PIL would only warn
        open_image(tmp_path / "big.png")
    assert info.value.problems[0].kind == "too_large" and "big.png" in info.value.problems[0].path
    assert Image.MAX_IMAGE_PIXELS == before
    with pixel_limit(None):
        assert open_image(tmp_path / "big.png").size == (100, 100)


@pytest.fixture
def striped_set(tmp_path: Path) -> Path:
    """ImageFolder whose centre squares are pure green: the cache must hold only green there."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _framed(96, 48).save(root / "a" / "wide.png")  # squashing instead of cropping would show red/blue
    _framed(48, 96).save(root / "a" / "tall.png")
    Image.new("RGB", (4, 4), GREEN).save(root / "b" / "small.png")  # upscaled
    Image.new("RGB", (30, 30), GREEN).save(root / "b" / "big.jpg", quality=100)
    (root / "b" / "broken.png").write_bytes(b"nope")
    return root


def test_cache_holds_centre_crops_in_input_order(striped_set: Path) -> None:
    manifest = load_manifest(striped_set, config=DataConfig(on_bad_image="skip"))
    assert manifest.paths == ["a/tall.png", "a/wide.png", "b/big.jpg", "b/broken.png", "b/small.png"]
    cache = build_image_cache(manifest.files(), 6, readable=manifest.readable, in_memory=True)
    assert cache.shape == (5, 3, 6, 6) and cache.dtype == torch.uint8 and cache.device.type == "cpu"
    green = torch.tensor(GREEN, dtype=torch.int32).view(3, 1, 1)
    for i in (0, 1, 4):
        assert torch.equal(cache[i].int(), green.expand(3, 6, 6)), manifest.paths[i]
    assert (cache[2].int() - green).abs().max() <= 3  # JPEG
    assert cache[3].sum() == 0  # unreadable row -> zeros
